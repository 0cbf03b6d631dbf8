"""Instruction data and SFT: deterministic held-out split, assistant-only loss, packing that keeps conversations
apart, and a short real SFTTrainer run that lowers the held-out loss."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import check_stage_record, run_without_tiny_hf, tiny_config
from transformers import AutoTokenizer

from alignment import sft
from alignment.data import docstring_pairs, instruction_dataset, load_chat_dataset, summary
from tiny_hf import TinyForCausalLM, export
from tiny_hf.chat import CHAT_SAMPLING, END_OF_TURN, end_of_turn_ids


def test_summary_is_the_first_paragraph_on_one_line():
    assert summary("Serialize obj\n   to a JSON string.\n\nMore details.") == "Serialize obj to a JSON string."


def test_pairs_and_split_are_deterministic_and_held_out_by_module(small_stdlib):
    pairs = docstring_pairs(str(small_stdlib))
    assert pairs == docstring_pairs(str(small_stdlib))
    dumps = next(p for p in pairs if p["name"] == "json.dumps")
    assert "JSON formatted" in dumps["answer"] and "json.dumps" in dumps["question"]
    assert not any(p["name"].split(".")[-1].startswith("_") for p in pairs)
    ds = instruction_dataset(val_fraction=0.3, stdlib_dir=str(small_stdlib))
    train_modules, test_modules = set(ds["train"]["module"]), set(ds["validation"]["module"])
    assert train_modules and test_modules and not train_modules & test_modules
    assert [m["role"] for m in ds["train"][0]["messages"]] == ["user", "assistant"]


def test_load_chat_dataset_reads_local_files_and_names_bad_columns(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(20)
    ]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_chat_dataset(str(tmp_path / "chats.jsonl"), val_fraction=0.25)
    assert len(ds["train"]) == 15 and len(ds["validation"]) == 5
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="need 'messages' or 'prompt' \\+ 'completion'"):
        load_chat_dataset(str(tmp_path / "bad.jsonl"))


def test_packed_conversations_do_not_see_each_other(tiny_lm_dir):
    """bfd packing restarts position_ids at each conversation and passes no attention mask: the loss of a packed row
    must equal the losses of its conversations run alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    chats = [
        [{"role": "user", "content": "What is a tuple?"}, {"role": "assistant", "content": "A sequence."}],
        [{"role": "user", "content": "And a list?"}, {"role": "assistant", "content": "A mutable one."}],
    ]
    parts = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in chats]
    packed = torch.tensor([parts[0] + parts[1]])
    positions = torch.tensor([list(range(len(parts[0]))) + list(range(len(parts[1])))])
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([p])).logits[0] for p in parts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_run(tiny_lm_dir, tmp_path_factory) -> Path:
    """A run folder holding the tiny model (exported as pretraining does)."""
    from transformers import AutoTokenizer

    run = tmp_path_factory.mktemp("run")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = TinyForCausalLM(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=256))
    export(model, tokenizer, run / "model")
    return run


@pytest.mark.slow
def test_sft_lowers_the_held_out_loss_and_writes_the_report(tiny_run, tmp_path, small_stdlib, monkeypatch):
    small = instruction_dataset(val_fraction=0.3, stdlib_dir=str(small_stdlib))
    monkeypatch.setattr(sft, "load_chat_dataset", lambda spec, max_examples=None: small)
    out = tmp_path / "sft"
    figures = sft.main(
        [
            "--model",
            str(tiny_run),
            "--out",
            str(out),
            "--max-steps",
            "30",
            "--per-device-train-batch-size",
            "4",
            "--max-length",
            "128",
            "--learning-rate",
            "3e-3",
            "--eval-examples",
            "40",
            "--samples",
            "2",
            "--max-new-tokens",
            "8",
            "--results",
            str(tmp_path / "results"),
        ]
    )
    assert figures["held_out_loss_after"] < figures["held_out_loss_before"] - 0.5
    assert len(figures["samples"]) == 2
    assert (out / "model" / "config.json").exists() and (out / "summary.md").exists()
    assert "held-out assistant loss" in (tmp_path / "results" / "sft.md").read_text()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    config, card = check_stage_record(out, "sft")
    assert config["trainer"]["max_steps"] == 30 and config["base_model"] == str(tiny_run) and not config["base_run"]
    assert card.data.base_model is None  # a local base: the card names it in the text, not as a Hub id
    assert f"starting from `{tiny_run.name}`" in card.text and "| before SFT |" in card.text  # the stage's own table


@pytest.mark.slow
def test_a_chat_run_stops_at_the_end_of_the_turn_in_a_transformers_pipeline(tiny_run, tmp_path):
    """A short SFT run on short answers, then `pipeline("text-generation")` on chat messages in a fresh process with
    tiny_hf (its Auto classes registered) and in one without it (the folder's remote code): greedy generation ends
    at <|im_end|> well before the length limit, because generation_config.json lists the end of the turn as an eos."""
    modules = ["json", "os", "sys", "re", "math", "time", "random", "string", "shutil", "socket"]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What does the {m} module do?"},
                {"role": "assistant", "content": f"It is {m}."},
            ]
        }
        for m in modules * 4
    ]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "sft"
    options = ["--model", str(tiny_run), "--data", str(tmp_path / "chats.jsonl"), "--out", str(out)]
    options += ["--max-steps", "60", "--per-device-train-batch-size", "8", "--learning-rate", "3e-3"]
    sft.main([*options, "--max-length", "64", "--eval-examples", "4", "--samples", "1", "--max-new-tokens", "8"])
    model_dir = out / "model"
    saved = json.loads((model_dir / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert saved["eos_token_id"] == end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(END_OF_TURN), 0]
    assert {k: saved[k] for k in CHAT_SAMPLING} == CHAT_SAMPLING and saved["do_sample"] is True
    code = f"""
        import json
        from transformers import AutoTokenizer, pipeline
        {{imports}}
        pipe = pipeline("text-generation", model={str(model_dir)!r}{{remote}})
        messages = [{{{{"role": "user", "content": "What does the json module do?"}}}}]
        ids = pipe(messages, max_new_tokens=100, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
        prompt = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        im_end = pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")
        print(json.dumps({{{{"new": ids[len(prompt):], "im_end": im_end}}}}))
    """
    with_tiny_hf = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code.format(imports="import tiny_hf", remote=""))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    without = run_without_tiny_hf(code.format(imports="", remote=", trust_remote_code=True"), tmp_path)
    for result in (with_tiny_hf, without):
        assert result.returncode == 0, result.stderr[-2000:]
        reply = json.loads(result.stdout.strip().splitlines()[-1])
        assert reply["new"][-1] == reply["im_end"] and len(reply["new"]) < 100, reply
        assert reply["new"].count(reply["im_end"]) == 1, reply  # it stopped at the first one


def test_sft_refuses_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="neither config.json"):
        sft.main(["--model", str(tmp_path), "--out", str(tmp_path / "out")])
