"""Export: a folder that loads through the Auto classes and `pipeline` with trust_remote_code=True in a fresh
process where tiny_hf cannot be imported; and `to_llama`, a folder that needs no remote code at all."""

import json

import pytest
import torch
from conftest import run_without_tiny_hf, tiny_config
from transformers import AutoModelForCausalLM

import tiny_hf
from tiny_hf import TinyForCausalLM
from tiny_hf.bpe import train_tokenizer
from tiny_hf.corpus import topic_documents

PROMPT = "The with statement"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((d["text"] for d in topic_documents()[:120]), vocab_size=400)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """An exported model folder and what tiny_hf itself computes for PROMPT (ids, logits, greedy text)."""
    torch.manual_seed(0)
    model = TinyForCausalLM(tiny_config(vocab_size=len(tokenizer), num_key_value_heads=2)).eval()
    out = tmp_path_factory.mktemp("exported")
    tiny_hf.export(model, tokenizer, out)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    expected = {
        "ids": ids[0].tolist(),
        "logits": model(ids).logits[0, -1].tolist(),
        "text": tokenizer.decode(generated[0]),
    }
    return out, expected


def test_export_writes_the_source_files_and_the_full_auto_map(exported):
    out, _ = exported
    for name in ("configuration_tiny.py", "modeling_tiny.py", "tokenization_tiny.py", "model.safetensors"):
        assert (out / name).exists(), name
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
        "AutoTokenizer",
    }
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"][1] == (
        "tokenization_tiny.TinyTokenizerFast"
    )


@pytest.mark.slow
def test_exported_folder_loads_without_tiny_hf(exported, tmp_path):
    out, expected = exported
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    result = run_without_tiny_hf(
        f"""
        import json
        import torch
        from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                                  AutoTokenizer, pipeline)
        try:
            import tiny_hf
            raise SystemExit("tiny_hf should not be importable here")
        except ImportError:
            pass
        folder = {str(out)!r}
        expected = json.load(open("expected.json"))
        try:
            AutoModelForCausalLM.from_pretrained(folder)
            raise SystemExit("loading custom code without trust_remote_code should fail")
        except ValueError as e:
            assert "trust_remote_code" in str(e), e

        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(config).__name__ == "TinyConfig" and type(model).__name__ == "TinyForCausalLM"
        assert type(tokenizer).__name__ == "TinyTokenizerFast", type(tokenizer)
        assert not type(model).__module__.startswith("tiny_hf"), type(model).__module__
        ids = tokenizer("{PROMPT}", return_tensors="pt").input_ids
        assert ids[0].tolist() == expected["ids"]
        logits = model(ids).logits[0, -1]
        torch.testing.assert_close(logits, torch.tensor(expected["logits"]), atol=1e-5, rtol=1e-5)

        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(base).__name__ == "TinyModel"
        classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)
        assert classifier(ids).logits.shape == (1, 2)

        generator = pipeline("text-generation", model=folder, trust_remote_code=True)
        text = generator("{PROMPT}", max_new_tokens=8, do_sample=False, eos_token_id=None, return_full_text=True)
        assert text[0]["generated_text"] == expected["text"], (text, expected["text"])
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_llama_export_needs_no_remote_code(tmp_path):
    model = TinyForCausalLM(tiny_config(num_key_value_heads=1)).eval()
    tiny_hf.to_llama(model).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    llama = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 99, (1, 10))
    torch.testing.assert_close(llama(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
