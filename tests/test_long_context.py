"""training/long_context.py: the scaled variants are the same weights with the rotary frequencies changed as each
method says (and unchanged where it says so), the passkey prompts hide the key where asked, and the script writes
its report; bad scalings fail clearly."""

import json

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_hf import TinyForCausalLM
from training import long_context


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_scalings_change_positions_only_as_each_method_says(tiny_lm_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids = torch.randint(3, 300, (1, 24))
    load = long_context.load_variant
    expected = logits(base, ids)
    torch.testing.assert_close(logits(load(str(tiny_lm_dir), "none", 4, 32), ids), expected)
    torch.testing.assert_close(logits(load(str(tiny_lm_dir), "linear", 1, 32), ids), expected)
    # Dynamic NTK leaves inputs within the trained length alone; PI and YaRN change every position.
    torch.testing.assert_close(logits(load(str(tiny_lm_dir), "dynamic", 4, 32), ids), expected)
    for scaling in ("linear", "yarn"):
        assert not torch.allclose(logits(load(str(tiny_lm_dir), scaling, 4, 32), ids), expected, atol=1e-4), scaling
    longer = torch.randint(3, 300, (1, 100))
    assert not torch.allclose(
        logits(load(str(tiny_lm_dir), "dynamic", 4, 32), longer), logits(base, longer), atol=1e-4
    )
    config = long_context.scaled_config(str(tiny_lm_dir), "yarn", 4, 32)
    assert config.rope_parameters["original_max_position_embeddings"] == 32 and config.max_position_embeddings == 128


def test_bad_scalings_fail_clearly(tiny_lm_dir, tmp_path):
    with pytest.raises(ValueError, match="factor=0.5 must be >= 1"):
        long_context.scaled_config(str(tiny_lm_dir), "linear", 0.5, 32)
    with pytest.raises(ValueError, match=r"scaling='ntk' is not one of"):
        long_context.scaled_config(str(tiny_lm_dir), "ntk", 2, 32)
    TinyForCausalLM(tiny_config(position_embedding="learned")).save_pretrained(tmp_path / "learned")
    with pytest.raises(ValueError, match="needs position_embedding='rope'"):
        long_context.scaled_config(str(tmp_path / "learned"), "linear", 2, 32)


def test_passkey_prompt_hides_the_key_at_the_asked_depth(tiny_lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    filler = len(tokenizer(long_context.FILLER).input_ids)
    for length in (120, 240):
        for depth in (0.0, 0.5, 1.0):
            ids = long_context.passkey_prompt(tokenizer, length, depth, 4321)
            assert abs(len(ids) - length) <= filler, (length, depth, len(ids))
            text = tokenizer.decode(ids)
            assert text.count("4321") == 2 and text.endswith(long_context.QUESTION)
            before, after = text.split("The pass key is 4321")[0], text.split("is the pass key.")[1]
            if depth == 0.0:
                assert long_context.FILLER.strip() not in before
            if depth == 1.0:
                assert long_context.FILLER.strip() not in after
    with pytest.raises(ValueError, match=r"depth=1.5 is not in \[0, 1\]"):
        long_context.passkey_prompt(tokenizer, 100, 1.5, 1)
    assert long_context.first_integer(" 4321. Remember") == 4321 and long_context.first_integer("none") is None


@pytest.mark.slow
def test_script_writes_the_report_for_every_variant(tiny_run_dir, tmp_path):
    results = tmp_path / "results"
    figures = long_context.main(
        [
            "--model",
            str(tiny_run_dir),
            "--factor",
            "2",
            "--eval-blocks",
            "2",
            "--buckets",
            "4",
            "--trials",
            "1",
            "--lengths",
            "0.5,2",
            "--depths",
            "0,1",
            "--finetune-steps",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--results",
            str(results),
        ]
    )
    assert list(figures["variants"]) == [*long_context.SCALINGS, "linear+finetune"]
    for name, row in figures["variants"].items():
        assert len(row["loss_by_position"]) == 4 and all(x > 0 for x in row["loss_by_position"]), name
        assert [len(r) for r in row["passkey"]] == [2, 2], name
    for name in ("long_context.md", "long_context.json", "long_context_ppl.png", "long_context_passkey.png"):
        assert (results / name).stat().st_size > 0, name
    saved = json.loads((results / "long_context.json").read_text())
    assert saved["variants"]["none"]["loss_by_position"] == figures["variants"]["none"]["loss_by_position"]
    with pytest.raises(ValueError, match=r"--variants 'none,ntk': \['ntk'\]"):
        long_context.main(["--model", str(tiny_run_dir), "--variants", "none,ntk"])
