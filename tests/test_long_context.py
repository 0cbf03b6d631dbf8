"""training/long_context.py: the scaled variants are the same weights with the rotary frequencies changed as each
method says (and unchanged where it says so), the passkey prompts are the training documents' format and hide the key
where asked, the teacher-forced retrieval check equals greedy decoding, and the script (from nothing, with
--pretrain-steps) writes its report; bad scalings, variants and key sets fail clearly."""

import json

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_hf import TinyForCausalLM
from tiny_hf.corpus import DOC_SEPARATOR, topic_documents
from training import long_context, synthetic


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


def test_passkey_prompt_is_the_training_format_within_its_length(tiny_lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    for length in (180, 300):  # the tiny tokenizer spends ~130 tokens on a prompt without filler
        for depth in (0.0, 0.5, 1.0):
            ids = long_context.passkey_prompt(tokenizer, length, depth, 4321)
            # Room for the answer, and at most one filler sentence (< 20 tokens) short of it.
            assert length - 20 < len(ids) <= length - long_context.ANSWER_ROOM, (length, depth, len(ids))
            text = tokenizer.decode(ids)
            assert text.count("4321") == 2 and text.endswith(synthetic.QUESTION)
            before, after = text.split("The pass key is 4321")[0], text.split("is the pass key.")[1]
            if depth == 0.0:
                assert not any(sentence in before for sentence in synthetic.FILLER_SENTENCES)
            if depth == 1.0:
                assert not any(sentence in after for sentence in synthetic.FILLER_SENTENCES)
            # A training document of the same key and filler is this prompt followed by the answer.
            documents = [synthetic.passkey_text(4321, b, a) for b in range(25) for a in range(25)]
            assert text + " 4321." in documents
    with pytest.raises(ValueError, match=r"depth=1.5 is not in \[0, 1\]"):
        long_context.passkey_prompt(tokenizer, 100, 1.5, 1)
    assert long_context.first_integer(" 4321. Remember") == 4321 and long_context.first_integer("none") is None


def test_greedy_writes_agrees_with_generate(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    prompts = [long_context.passkey_prompt(tokenizer, length, 0.5, 1234) for length in (60, 60, 90)]
    written = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        written.append(out[0, len(ids) :].tolist())
    never, always = torch.zeros(len(tokenizer), dtype=torch.bool), torch.ones(len(tokenizer), dtype=torch.bool)
    answers = [tokens[:3] for tokens in written]
    assert long_context.greedy_writes(model, prompts, answers, never) == [True, True, True]
    # The token after the answer would continue the number: not retrieved.
    assert long_context.greedy_writes(model, prompts, answers, always) == [False, False, False]
    wrong = [answers[0][:2] + [answers[0][2] + 1], answers[1], answers[2][:1]]
    assert long_context.greedy_writes(model, prompts, wrong, never) == [False, True, True]


def test_bad_variants_and_key_sets_fail_clearly(tiny_lm_dir):
    parse = long_context.parse_variants
    assert parse("", finetune_steps=0, alibi=False) == list(long_context.SCALINGS)
    assert parse("", finetune_steps=5, alibi=True) == list(long_context.VARIANTS)
    assert parse("yarn,none", finetune_steps=0, alibi=False) == ["none", "yarn"]
    with pytest.raises(ValueError, match=r"--variants 'none,ntk': \['ntk'\] not in \['none', 'linear'"):
        parse("none,ntk", finetune_steps=0, alibi=False)
    with pytest.raises(ValueError, match="linear\\+finetune needs --finetune-steps > 0, not 0"):
        parse("linear+finetune", finetune_steps=0, alibi=False)
    with pytest.raises(ValueError, match="alibi needs --alibi-model"):
        parse("alibi", finetune_steps=0, alibi=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    with pytest.raises(ValueError, match="trials=0: passkey retrieval needs at least one key"):
        long_context.passkey_figures(model, tokenizer, [64], [0.5], trials=0, seed=0)
    with pytest.raises(ValueError, match="depths is empty"):
        long_context.passkey_figures(model, tokenizer, [64], [], trials=3, seed=0)
    with pytest.raises(ValueError, match=r"only synthetic sources \(\['passkey', 'key-value'\]\)"):
        long_context.natural_spec("passkey:0.5,key-value:0.5")
    assert long_context.natural_spec("embedded:0.8,passkey:0.2") == "embedded:0.8"


def test_position_ranges_double_the_trained_length():
    assert long_context.position_ranges(128, 512) == [(0, 128), (128, 256), (256, 511)]
    assert long_context.position_ranges(32, 64) == [(0, 32), (32, 63)]


STRUCTURE_ARGS = ["--eval-blocks", "3", "--buckets", "4", "--trials", "4", "--lengths", "0.5,1,2", "--depths", "0,1"]


@pytest.mark.slow
def test_script_writes_the_report_for_every_variant(tiny_run_dir, tmp_path):
    results = tmp_path / "results"
    figures = long_context.main(
        ["--model", str(tiny_run_dir), "--factor", "2", *STRUCTURE_ARGS, "--finetune-steps", "2"]
        + ["--out", str(tmp_path / "out"), "--results", str(results)]
    )
    assert list(figures["variants"]) == ["none", "linear", "linear+finetune", "dynamic", "yarn"]
    assert figures["position_ranges"] == ["0-32", "32-63"] and figures["passkey_lengths"] == [16, 32, 64]
    for name, row in figures["variants"].items():
        assert len(row["loss_by_position"]) == 4 and all(x > 0 for x in row["loss_by_position"]), name
        assert set(row["perplexity"]) == {"0-32", "32-63"} and row["perplexity"]["0-32"]["n"] == 3, name
        assert all(row["passkey"][str(n)]["n"] == 4 for n in (16, 32, 64)), name
        assert [len(r) for r in row["passkey_grid"]] == [2, 2, 2], name
    assert set(figures["beyond_noise"]) == {
        "passkey/16",
        "passkey/32",
        "passkey/64",
        "perplexity/0-32",
        "perplexity/32-63",
    }
    for name in ("long_context.md", "long_context.json", "long_context_ppl.png", "long_context_passkey.png"):
        assert (results / name).stat().st_size > 0, name
    saved = json.loads((results / "long_context.json").read_text())
    assert saved["variants"]["none"]["loss_by_position"] == figures["variants"]["none"]["loss_by_position"]
    assert "| linear+finetune |" in (results / "long_context.md").read_text()
    with pytest.raises(ValueError, match=r"--variants 'none,ntk': \['ntk'\]"):
        long_context.main(["--model", str(tiny_run_dir), "--variants", "none,ntk"])
    with pytest.raises(ValueError, match="--trials 0: passkey retrieval needs at least one key"):
        long_context.main(["--model", str(tiny_run_dir), "--trials", "0"])


@pytest.mark.slow
def test_one_command_pretrains_both_runs_then_compares(tmp_path):
    """--pretrain-steps from nothing: a tiny RoPE and ALiBi run on a small corpus plus passkey documents, then every
    variant; run again, both runs are reused."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(DOC_SEPARATOR.join(d["text"] for d in topic_documents()[:40]))
    tiny = "--model tiny-1m --vocab-size 300 --set hidden_size=32 num_hidden_layers=2 intermediate_size=64"
    pretrain_args = f"{tiny} --batch-size 4 --warmup-steps 1 --eval-blocks 2 --sample-tokens 4 --no-progress --cpu"
    argv = ["--pretrain-steps", "2", "--data", f"{corpus}:0.8,passkey:0.2", "--trained-length", "32"]
    argv += ["--pretrain-args", f"{pretrain_args} --val-fraction 0.2 --cache-dir {tmp_path / 'cache'}"]
    argv += ["--model", str(tmp_path / "rope"), "--factor", "2", *STRUCTURE_ARGS, "--finetune-steps", "1"]
    figures = long_context.main(argv)
    assert list(figures["variants"]) == list(long_context.VARIANTS)
    for run, position in (("rope", "rope"), ("rope-alibi", "alibi")):
        config = json.loads((tmp_path / run / "model" / "config.json").read_text())
        assert config["position_embedding"] == position and config["hidden_size"] == 32, run
    assert (tmp_path / "rope" / "long_context" / "long_context.md").is_file()
    assert (tmp_path / "rope" / "tokenizer" / "tokenizer.json").is_file()  # one tokenizer, trained on the corpus
    assert json.loads((tmp_path / "rope-alibi" / "run_config.json").read_text())["tokenizer"] == str(
        tmp_path / "rope" / "model"
    )
    before = (tmp_path / "rope-alibi" / "model" / "model.safetensors").stat().st_mtime_ns
    long_context.main(argv)
    assert (tmp_path / "rope-alibi" / "model" / "model.safetensors").stat().st_mtime_ns == before
