"""Export: a folder that loads through the Auto classes and `pipeline` with trust_remote_code=True in a fresh
process where tiny_hf cannot be imported; and `to_llama`, a folder that needs no remote code at all."""

import json
import re
import shutil

import pytest
import torch
from conftest import run_without_tiny_hf, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf
from tiny_hf import TinyForCausalLM
from tiny_hf.bpe import train_tokenizer
from tiny_hf.cli import run_module
from tiny_hf.corpus import topic_documents

PROMPT = "The with statement"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((d["text"] for d in topic_documents()[:120]), vocab_size=400)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """An exported model folder and what tiny_hf itself computes for PROMPT (ids, logits, greedy text)."""
    torch.manual_seed(0)
    # A soft-capped head (a module of modeling_tiny.py, not nn.Linear) must load from the copied source files too.
    config = tiny_config(vocab_size=len(tokenizer), num_key_value_heads=2, logit_softcap=5.0)
    model = TinyForCausalLM(config).eval()
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


# ---------------------------------------------------------------------------------------------------------------------
# tiny-hf export: --format llama (stock classes), gguf (llama.cpp), adapter, and the folders that cannot export
# ---------------------------------------------------------------------------------------------------------------------
CHAT = [{"role": "user", "content": "What does the json module do?"}]
GGUF_PROMPTS = ["The with statement", "A dictionary maps", "import json\n"]


@pytest.fixture(scope="module")
def llama_shaped_run(tmp_path_factory, tokenizer):
    """A Llama-shaped tiny model (GQA, untied head rescaled so that greedy choices are clear-cut) saved as a run.
    Width 64: llama.cpp's Q8_0 kernels give wrong results for a K projection of fewer than 32 rows."""
    torch.manual_seed(1)
    config = tiny_config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = TinyForCausalLM(config.__class__(**{**config.to_dict(), "max_position_embeddings": 128})).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1)
    run = tmp_path_factory.mktemp("llama_run")
    tiny_hf.export(model, tokenizer, run / "model")
    return run, model


def export(*argv: str) -> dict:
    return run_module("training.export", "tiny-hf export", list(argv))


def export_error(capsys, *argv: str) -> str:
    """The one line `tiny-hf export` prints on stderr for a bad request (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        export(*argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("tiny-hf export: error: "), err
    return err


def test_llama_format_is_a_stock_folder_that_loads_without_tiny_hf_or_remote_code(llama_shaped_run, tmp_path):
    run, model = llama_shaped_run
    out = tmp_path / "llama"
    export("--model", str(run), "--format", "llama", "--out", str(out))
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not list(out.glob("*.py")) and "auto_map" not in json.loads((out / "config.json").read_text())
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    result = run_without_tiny_hf(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        prompt = tokenizer.apply_chat_template({CHAT!r}, add_generation_prompt=True, return_dict=False)
        print(json.dumps({{
            "class": type(model).__name__, "stock_tokenizer": isinstance(tokenizer, PreTrainedTokenizerFast),
            "logits": model(torch.tensor({ids.tolist()})).logits[0, -1].tolist(),
            "prompt": prompt, "ids": tokenizer("{PROMPT}").input_ids,
            "eos": GenerationConfig.from_pretrained({str(out)!r}).eos_token_id,
        }}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "LlamaForCausalLM" and loaded["stock_tokenizer"]
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(loaded["logits"]), model(ids).logits[0, -1], atol=1e-5, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    assert loaded["ids"] == tokenizer(PROMPT).input_ids
    assert loaded["prompt"] == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert loaded["eos"] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp_with_the_greedy_tokens_of_transformers(llama_shaped_run, tmp_path, monkeypatch):
    """llama.cpp (llama-cpp-python) loads each GGUF; its tokenization equals transformers' and, in f32 and f16, so
    do 12 greedy tokens after each prompt; q8_0 (8-bit matrices) agrees on most of them."""
    import llama_cpp.llama_cpp as llama_cpp_api
    from llama_cpp import Llama

    # llama.cpp 0.3.36's repacked CPU buffers (AVX-512/AMX here) crash on matrices this small, its own converter's
    # Q8_0 files included: load into plain buffers (llama.cpp's --no-extra-bufts).
    defaults = llama_cpp_api.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp_api, "llama_model_default_params", plain_buffers)

    run, model = llama_shaped_run
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    expected = {}
    for prompt in GGUF_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None)
        expected[prompt] = (ids[0].tolist(), out[0, ids.shape[1] :].tolist())
    agreement = {}
    for dtype in ("f32", "f16", "q8_0"):
        summary = export("--model", str(run), "--format", "gguf", "--dtype", dtype, "--out", str(tmp_path))
        llm = Llama(model_path=summary["out"], n_ctx=128, n_threads=2, verbose=False)
        assert llm.metadata["tokenizer.chat_template"] and llm.metadata["general.architecture"] == "llama"
        same = total = 0
        for prompt, (prompt_ids, greedy) in expected.items():
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == prompt_ids, (dtype, prompt)
            tokens = []
            for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
                tokens.append(token)
                if len(tokens) == len(greedy):
                    break
            same += sum(a == b for a, b in zip(tokens, greedy, strict=True))
            total += len(greedy)
            if dtype != "q8_0":
                assert tokens == greedy, (dtype, prompt, tokens, greedy)
        agreement[dtype] = same / total
        del llm
    assert agreement["q8_0"] >= 0.8, agreement


def test_a_model_that_is_not_llama_shaped_says_which_fields_prevent_it(tokenizer, tmp_path, capsys):
    model = TinyForCausalLM(tiny_config(vocab_size=len(tokenizer), norm="layernorm", qk_norm=True))
    tiny_hf.export(model, tokenizer, tmp_path / "run" / "model")
    for fmt in ("llama", "gguf"):
        err = export_error(capsys, "--model", str(tmp_path / "run"), "--format", fmt, "--out", str(tmp_path / fmt))
        assert re.search(r"not Llama-shaped: norm='layernorm' \(Llama needs 'rmsnorm'\); qk_norm", err), err
        assert not (tmp_path / fmt).exists()


def test_a_lora_adapter_exports_as_a_peft_folder_and_merged(llama_shaped_run, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    run, _ = llama_shaped_run
    base = AutoModelForCausalLM.from_pretrained(run / "model")
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "lora" / "adapter"
    lora.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(run / "model").save_pretrained(adapter)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected = lora(ids).logits

    export("--model", str(tmp_path / "lora"), "--format", "adapter", "--out", str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "model"), tmp_path / "peft")
    export("--model", str(adapter), "--format", "llama", "--out", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("case", "argv", "message"),
    [
        ("quantized", ["--format", "gguf"], r"is quantized \(bitsandbytes\): .* exports only as it is \(--format hf"),
        ("no tokenizer", ["--format", "llama"], r"has no tokenizer"),
        ("not an adapter", ["--format", "adapter"], r"--format adapter: --model .* is not a LoRA adapter"),
        ("dtype", ["--format", "gguf", "--dtype", "bf16"], r"--dtype bf16: --format gguf takes f32, f16, q8_0"),
        ("dtype", ["--format", "hf", "--dtype", "q8_0"], r"--dtype q8_0: --format hf takes f32, f16, bf16"),
    ],
)
def test_what_cannot_be_exported_is_one_clear_error(llama_shaped_run, tmp_path, capsys, case, argv, message):
    run, _ = llama_shaped_run
    folder = tmp_path / "model"
    shutil.copytree(run / "model", folder)
    if case == "quantized":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (folder / "config.json").write_text(json.dumps(config))
    if case == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    err = export_error(capsys, "--model", str(folder), *argv, "--out", str(tmp_path / "out"))
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
