"""`tiny-hf eval`: lm-evaluation-harness on the project's tasks agrees with the project's own measures (bits per
byte within 1%, exact match on the verifiable task from the same greedy answers), and bad task files get one line."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_run_dir
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import harness
from alignment.data import exact_match_reward, extract_answer
from tiny_hf.chat import chat_generate
from training.evaluation import document_bits_per_byte, validation_documents

pytestmark = pytest.mark.xdist_group("harness")  # one worker runs the harness once for the module


@pytest.fixture(scope="module")
def harness_run(tiny_lm_dir, tmp_path_factory, small_stdlib):
    """A pretraining run folder of the tiny model (block size 128, for the chat prompts) evaluated once on all three
    tasks."""
    run = make_run_dir(tiny_lm_dir, tmp_path_factory.mktemp("harness"), block_size=128)
    argv = ["--model", str(run), "--limit", "8", "--stdlib-dir", str(small_stdlib)]
    return run, harness.main(argv)


@pytest.mark.slow
def test_harness_bits_per_byte_equals_ours_on_the_same_documents(harness_run):
    run, results = harness_run
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    texts = validation_documents(run)[:8]
    ours = document_bits_per_byte(model, tokenizer, texts, window=128, prefix_token_id=tokenizer.eos_token_id)
    theirs = results["tasks"]["tiny_bits_per_byte"]
    assert theirs["n"] == len(texts) > 3
    assert theirs["bits_per_byte"] == pytest.approx(ours, rel=0.01)
    assert results["ours"]["bits_per_byte"] == pytest.approx(ours, rel=1e-9)
    assert 3.0 < ours < 20  # a random model: far above a trained one's ~2, below log2(vocab) per byte-ish


@pytest.mark.slow
def test_harness_exact_match_equals_ours_from_the_same_greedy_answers(harness_run, small_stdlib):
    """The harness's greedy generation, regex and exact match give what chat_generate + exact_match_reward give."""
    run, results = harness_run
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    rows = [json.loads(line) for line in (run / "eval" / "data" / "tiny_verifiable.jsonl").read_text().splitlines()]
    ids = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    replies = chat_generate(model, tokenizer, ids, max_new_tokens=24)
    ours = sum(exact_match_reward([r.text for r in replies], [row["answer"] for row in rows])) / len(rows)
    assert results["tasks"]["tiny_verifiable"]["n"] == len(rows) == 8
    assert results["tasks"]["tiny_verifiable"]["exact_match"] == pytest.approx(ours)
    # The same rows made answerable: each answer set to what the model says, so exact match must be 1.
    answered = [{**row, "answer": extract_answer(r.text)} for row, r in zip(rows, replies, strict=True)]
    path = harness.write_jsonl(run / "answerable.jsonl", [row for row in answered if row["answer"]])
    config = harness.project_task("tiny_verifiable", path)
    output = harness.run_harness(str(run / "model"), [config], 128, tokenizer.eos_token_id, harness.HarnessOptions())
    assert harness.task_metrics(output)["tiny_verifiable"]["exact_match"] == 1.0


@pytest.mark.slow
def test_results_go_to_the_run_folder_with_a_table(harness_run):
    run, results = harness_run
    saved = json.loads((run / "eval" / "results.json").read_text())
    assert saved["tasks"].keys() == {"tiny_bits_per_byte", "tiny_continuation", "tiny_verifiable"}
    continuation = saved["tasks"]["tiny_continuation"]
    assert continuation["n"] > 0 and 0.0 <= continuation["acc"] <= 1.0 and continuation["acc_stderr"] > 0
    table = (run / "eval" / "results.md").read_text()
    assert "| tiny_continuation |" in table and "training/evaluation.py on the same documents" in table
    card = ModelCard.load(run / "model" / "README.md")  # rebuilt with the results in its model-index
    indexed = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    bits = saved["tasks"]["tiny_bits_per_byte"]["bits_per_byte"]
    assert indexed[("tiny_bits_per_byte", "bits_per_byte")] == pytest.approx(bits, abs=1e-6)
    assert ("tiny_verifiable", "exact_match") in indexed and "### lm-evaluation-harness" in card.text


def test_continuation_rows_hold_the_true_span_and_three_others():
    texts = [" ".join(f"w{d}_{i}" for i in range(200)) for d in range(6)]
    rows = harness.continuation_rows(texts, limit=0)
    assert len(rows) > 20
    for row in rows:
        assert len(row["choices"]) == harness.CHOICES == len(set(row["choices"]))
        truth = row["choices"][row["label"]]
        doc, first = row["context"].split()[-1].split("_")
        assert truth.split()[0] == f"{doc}_{int(first) + 1}"  # the words that follow the context
    assert {row["label"] for row in rows} == set(range(harness.CHOICES))


def run_eval(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tiny_hf.cli", "eval", *argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("task: [unclosed\n", "is not valid YAML"),
        ("- just\n- a list\n", "must be a mapping with a 'task' name"),
    ],
)
def test_a_task_file_that_does_not_parse_is_one_line(tmp_path, tiny_run_dir, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    result = run_eval("--model", str(tiny_run_dir), "--tasks", str(bad), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_documents_need_a_pretraining_run(tmp_path, tiny_lm_dir):
    result = run_eval("--model", str(tiny_lm_dir), "--tasks", "tiny_bits_per_byte", cwd=tmp_path)
    assert result.returncode == 2
    assert "no pretraining run to take held-out documents from: pass --run RUN" in result.stderr
