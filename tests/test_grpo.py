"""GRPO and RLOO with TRL on a tiny model: a few steps with the exact-match reward plus another python reward (and a
reward model), full and LoRA; the tied-group share is reported; bad arguments fail before anything loads."""

import json

import pytest
import torch
from conftest import check_stage_record
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignment import grpo
from alignment.data import MODULE_QUESTION
from tiny_hf.chat import end_of_turn_ids

NAMES = [
    ("dumps", "json"),
    ("dedent", "textwrap"),
    ("copyfile", "shutil"),
    ("bisect_left", "bisect"),
    ("heappush", "heapq"),
    ("reader", "csv"),
    ("getLogger", "logging"),
    ("urlopen", "urllib.request"),
]


def length_reward(completions, **kwargs) -> list[float]:
    """A python reward that varies between samples (a random model never gets the module right): shorter = better."""
    return [-len(c[-1]["content"]) / 50 for c in completions]


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": MODULE_QUESTION.format(name=name)}], "answer": module}
        for name, module in NAMES * 3
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def with_length_reward(monkeypatch):
    monkeypatch.setitem(grpo.REWARD_FUNCS, "length", length_reward)


def run(model_dir, data, out, *extra):
    return grpo.main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--num-generations",
            "4",
            "--per-device-train-batch-size",
            "8",
            "--max-completion-length",
            "8",
            "--logging-steps",
            "1",
            "--learning-rate",
            "1e-3",
            "--eval-examples",
            "4",
            *extra,
        ]
    )


@pytest.mark.parametrize(("algo", "lora"), [("grpo", False), ("rloo", False), ("grpo", True)])
def test_grpo_and_rloo_train_with_python_rewards(tiny_lm_dir, questions, tmp_path, with_length_reward, algo, lora):
    out = tmp_path / algo
    extra = ["--lora", "--rank", "4"] if lora else []
    figures = run(
        tiny_lm_dir,
        questions,
        out,
        "--algo",
        algo,
        "--rewards",
        "exact_match,length",
        "--max-steps",
        "2",
        "--beta",
        "0.04",
        "--results",
        str(tmp_path / "results"),
        *extra,
    )
    assert figures["rewards"] == ["exact_match_reward", "length_reward"]
    assert len(figures["log"]) == 2 and all("rewards/length_reward/mean" in r for r in figures["log"])
    # The length reward differs between samples, so groups rarely tie; exact match alone would tie everywhere.
    assert 0.0 <= figures["tied_group_share"] < 1.0
    assert "kl" in figures["log"][0]  # beta > 0: a reference (a copy, or the adapters off)
    for key in ("held_out_exact_match_before", "held_out_exact_match_after"):
        assert 0.0 <= figures[key] <= 1.0
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(figures))
    check_stage_record(out, algo)
    assert "Tied groups" in (out / "summary.md").read_text() and (tmp_path / "results" / f"{algo}.md").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_exact_match_alone_ties_every_group_of_a_random_model(tiny_lm_dir, questions, tmp_path):
    figures = run(tiny_lm_dir, questions, tmp_path / "grpo", "--max-steps", "2")
    assert figures["tied_group_share"] == 1.0  # never right: every group all-zero, nothing to learn from
    assert figures["held_out_exact_match_before"] == 0.0


def test_rloo_with_a_reward_model(tiny_lm_dir, questions, tmp_path):
    from conftest import tiny_config

    from tiny_hf import TinyForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    reward_dir = tmp_path / "reward"
    config = tiny_config(
        vocab_size=len(tokenizer), max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    TinyForSequenceClassification(config).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    assert AutoModelForSequenceClassification.from_pretrained(reward_dir).config.num_labels == 1
    figures = run(
        tiny_lm_dir,
        questions,
        tmp_path / "rloo",
        "--algo",
        "rloo",
        "--reward-model",
        str(reward_dir),
        "--max-steps",
        "2",
    )
    assert len(figures["rewards"]) == 2 and figures["rewards"][0] == "exact_match_reward"
    assert figures["tied_group_share"] < 1.0  # a random score head gives every answer a different reward


def test_greedy_answers_engine_matches_generate(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    prompts = [[{"role": "user", "content": MODULE_QUESTION.format(name=n)}] for n, _ in NAMES[:3]]
    engine = grpo.greedy_answers(model, tokenizer, prompts, 6)
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=False) for p in prompts]
    stop = end_of_turn_ids(tokenizer)
    plain = []
    for row in ids:
        out = model.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False, eos_token_id=stop)
        plain.append(tokenizer.decode(out[0, len(row) :], skip_special_tokens=True).strip())
    assert engine == plain


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        # TRL's own config checks its fields, in its words
        (["--num-generations", "1"], r"requires at least 2 generations per prompt.*You provided 1"),
        (["--beta", "-0.1"], r"--beta=-0.1 must be >= 0"),
        (["--algo", "ppo"], r"--algo='ppo' is not one of \['grpo', 'rloo'\]"),
        (["--rewards", "bleu"], r"'bleu' is not one of \['exact_match', 'partial_credit', 'digits', 'format'\]"),
        (["--rewards", ""], r"no reward: give --rewards and/or --reward-model"),
        (
            ["--per-device-train-batch-size", "6"],
            r"generation_batch_size \(6\) must be divisible by num_generations \(4\)",
        ),
    ],
)
def test_bad_arguments_fail_clearly(tiny_lm_dir, questions, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        run(tiny_lm_dir, questions, tmp_path / "bad", *extra)
    assert not (tmp_path / "bad").exists()


def test_format_reward():
    completions = [[{"role": "assistant", "content": c}] for c in ["`json`", " `os.path` ", "json", "`a` and `b`"]]
    assert grpo.format_reward(completions) == [1.0, 1.0, 0.0, 0.0]


def test_stock_llama_grpo_lora(stock_llama_dir, questions, tmp_path, with_length_reward):
    llama_dir = stock_llama_dir
    out = tmp_path / "grpo"
    figures = run(
        llama_dir,
        questions,
        out,
        "--lora",
        "--rank",
        "4",
        "--rewards",
        "exact_match,length",
        "--max-steps",
        "1",
        "--beta",
        "0.04",
    )
    assert len(figures["log"]) == 1 and len(figures["samples"]) == figures["held_out_questions"]  # model.generate
    assert type(AutoModelForCausalLM.from_pretrained(out / "model")).__name__ == "LlamaForCausalLM"
