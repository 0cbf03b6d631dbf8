"""The alignment tasks built from the standard library's docstrings: preference pairs (chosen != rejected, each
rejection kind present, held out by module like the instruction data) and the verifiable "which module defines"
task with its exact-match reward."""

import pytest

from alignment.data import (
    ARITHMETIC_KINDS,
    MODULE_QUESTION,
    REJECTION_KINDS,
    arithmetic_dataset,
    digit_reward,
    docstring_pairs,
    exact_match_reward,
    extract_answer,
    instruction_dataset,
    load_chat_dataset,
    partial_credit_reward,
    preference_dataset,
    verifiable_dataset,
)


def test_preference_pairs_are_deterministic_distinct_and_held_out_like_sft(small_stdlib):
    ds = preference_dataset(val_fraction=0.3, stdlib_dir=str(small_stdlib))
    again = preference_dataset(val_fraction=0.3, stdlib_dir=str(small_stdlib))
    assert ds["train"]["rejected"] == again["train"]["rejected"]
    sft = instruction_dataset(val_fraction=0.3, stdlib_dir=str(small_stdlib))
    assert set(ds["validation"]["module"]) == set(sft["validation"]["module"])
    assert not set(ds["train"]["module"]) & set(ds["validation"]["module"])
    pairs = docstring_pairs(str(small_stdlib))
    answers = {p["name"]: p["answer"] for p in pairs}
    kinds = set()
    for row in ds["train"]:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert chosen == answers[row["id"]] and rejected != chosen
        if row["kind"] == "truncated":
            assert chosen.startswith(rejected) and len(rejected) < len(chosen)
        elif row["kind"] == "repetitive":
            opening = " ".join(chosen.split()[:3])
            assert rejected == " ".join([opening] * 4)
        else:
            # another module's object's real summary: a sibling's could be just as right
            assert any(p["answer"] == rejected and p["module"] != row["module"] for p in pairs), row
        kinds.add(row["kind"])
    assert kinds == set(REJECTION_KINDS)


def test_verifiable_questions_have_one_right_answer(small_stdlib):
    ds = verifiable_dataset(val_fraction=0.3, stdlib_dir=str(small_stdlib))
    rows = list(ds["train"]) + list(ds["validation"])
    assert ds["validation"].num_rows and not set(ds["train"]["id"]) & set(ds["validation"]["id"])
    assert set(ds["validation"]["kind"]) == {"module", "arithmetic"}
    sums = [row for row in rows if row["kind"] == "arithmetic"]
    assert len(sums) == 31 * 31 and all(row["prompt"][0]["content"].startswith("What is ") for row in sums)
    assert next(row for row in sums if row["id"] == "add/17+25")["answer"] == "42"
    rows = [row for row in rows if row["kind"] == "module"]
    short_names = [row["id"].rsplit(".", 1)[1] for row in rows]
    assert len(short_names) == len(set(short_names))  # a name two modules define is never asked
    dumps = next(row for row in rows if row["id"] == "json.dumps")
    assert dumps["prompt"][0]["content"] == MODULE_QUESTION.format(name="dumps") and dumps["answer"] == "json"
    assert exact_match_reward([dumps["completion"]], [dumps["answer"]]) == [1.0]


@pytest.mark.parametrize(
    ("text", "module"),
    [
        ("`json`", "json"),
        ("json.decoder, I think.", "json.decoder"),
        ("It is json.", "It"),
        ("", None),
        ("42.", "42"),
        ("-3 apples", "-3"),
        ("1 2 5 8", "1258"),
        ("12 13", "12"),
    ],
)
def test_extract_answer_takes_the_first_name_or_number(text, module):
    assert extract_answer(text) == module


def test_exact_match_reward_scores_strings_and_conversations():
    completions = ["`email.utils`", [{"role": "assistant", "content": "json"}], "The json module", "???", "42"]
    assert exact_match_reward(completions, ["email.utils", "json", "json", "json", "42"]) == [1, 1, 0, 0, 1]
    with pytest.raises(ValueError):
        exact_match_reward(["json"], ["json", "csv"])  # one answer per completion


def test_partial_credit_reward_ranks_near_misses_between_wrong_and_right():
    completions = ["42", "41", "`32`", "8", "`xml.dom`", "`json`", "", [{"role": "assistant", "content": "xml.sax"}]]
    answers = ["42", "42", "42", "42", "xml.sax", "xml.sax", "42", "xml.sax"]
    assert partial_credit_reward(completions, answers) == pytest.approx([1.0, 0.9, 0.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    # exact answers score as exact_match does; everything else scores less than an exact answer
    assert [s == 1.0 for s in partial_credit_reward(completions, answers)] == [
        s == 1.0 for s in exact_match_reward(completions, answers)
    ]


def test_sft_data_mixes_docs_and_the_verifiable_answer_format(small_stdlib):
    from alignment.data import embedded_chat_dataset

    ds = embedded_chat_dataset(val_fraction=0.3, stdlib_dir=str(small_stdlib))
    for split in ("train", "validation"):
        assert set(ds[split]["task"]) == {"docs", "verifiable"}, split
    row = next(r for r in ds["train"] if r["task"] == "verifiable")
    assert row["messages"][-1] == {"role": "assistant", "content": f"`{row['module']}`"}
    verifiable = verifiable_dataset(stdlib_dir=str(small_stdlib))
    assert sorted(r["id"] for r in ds["validation"] if r["task"] == "verifiable") == sorted(
        verifiable["validation"]["id"]
    )


def test_arithmetic_questions_are_right_deterministic_and_held_out_by_question():
    ds = arithmetic_dataset(train_size=600, held_out_size=300)
    assert len(ds["train"]) == 600 and len(ds["validation"]) == 300
    assert ds["train"]["id"] == arithmetic_dataset(train_size=600, held_out_size=300)["train"]["id"]
    assert not set(ds["train"]["id"]) & set(ds["validation"]["id"])
    assert set(ds["validation"]["kind"]) == set(ARITHMETIC_KINDS)
    for row in ds["train"]:
        kind, a, b = row["id"].split("/")
        assert int(row["answer"]) == ARITHMETIC_KINDS[kind][1](int(a), int(b)) >= 0
        # spaced digits in the question and the answer; the reward reads the answer back whole
        assert " ".join(a) in row["prompt"][0]["content"] and " ".join(b) in row["prompt"][0]["content"]
        assert exact_match_reward([row["completion"]], [row["answer"]]) == [1.0]


def test_arithmetic_task_spec_picks_kinds_and_feeds_sft():
    ds = arithmetic_dataset("arithmetic:cmp", train_size=50, held_out_size=20)
    assert set(ds["train"]["kind"]) == {"cmp"}
    chats = load_chat_dataset("arithmetic:add,sub", max_examples=40)
    row = chats["train"][0]
    assert row["task"] == "verifiable" and [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["module"] == str(int(row["messages"][1]["content"].replace(" ", "")))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: arithmetic_dataset("arithmetic:add,mul"), r"kind 'mul' is not one of \['add', 'sub', 'cmp'\]"),
        (lambda: arithmetic_dataset("arithmetic:"), "kind '' is not one of"),
        (lambda: arithmetic_dataset(held_out_size=0), "held_out_size=0 must both be >= 1"),
        (lambda: arithmetic_dataset(max_value=9, held_out_size=100), "held_out_size=100 is over 10 .*raise max_value"),
    ],
)
def test_bad_arithmetic_specs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_digit_reward_credits_places_and_is_one_only_when_exact():
    completions = ["9 1", "9 2", "1 9", "1 0 1", "7", "json", ""]
    assert digit_reward(completions, ["91", "91", "91", "91", "91", "91", "91"]) == [1.0, 0.5, 0.0, 1 / 3, 0.0, 0, 0]
    assert digit_reward(["`json`", "os"], ["json", "json"]) == [1.0, 0.0]
