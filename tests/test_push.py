"""training/push.py with --dry-run: the staging folder holds the remote-code model, the plots and a valid model card,
it loads with trust_remote_code=True in a fresh process where tiny_hf cannot be imported, and bad input fails before
anything is written. The upload itself needs the network and is never run here."""

import json
from types import SimpleNamespace

import pytest
from conftest import run_without_tiny_hf
from huggingface_hub import ModelCard
from test_report import synthetic_records

import tiny_hf
from tiny_hf.bpe import train_tokenizer
from tiny_hf.corpus import topic_documents
from training import push, report

REPO_ID = "someone/tiny-demo"
PROMPT = "The with statement"
TINY_SHAPE = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((d["text"] for d in topic_documents()[:100]), vocab_size=400)


def make_run(root, tokenizer, saved_by: str = "export", metrics: bool = True):
    """A run folder as pretrain.py leaves it: model/ (exported, or plain save_pretrained with the tokenizer in the
    run's tokenizer/ folder), metrics.jsonl, loss_curve.png, run_config.json."""
    model = tiny_hf.TinyForCausalLM(tiny_hf.TinyConfig(**{**TINY_SHAPE, "vocab_size": len(tokenizer)})).eval()
    run = root / "runs" / "demo"
    if saved_by == "export":
        tiny_hf.export(model, tokenizer, run / "model")
    else:
        model.save_pretrained(run / "model")
        tokenizer.save_pretrained(run / "tokenizer")
    if metrics:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
        report.plot_loss_curves({"demo": run}, run / "loss_curve.png")
        data = f"{root / 'notes'}/:0.3,embedded:0.7"  # a local folder and the embedded corpus, as pretrain.py takes
        run_config = {"data": data, "max_steps": 200, "batch_size": 4, "block_size": 64, "out": str(run)}
        (run / "run_config.json").write_text(json.dumps(run_config))
    return run, model


@pytest.mark.parametrize("saved_by", ["export", "save_pretrained"])
def test_dry_run_stages_model_plots_and_card(tmp_path, tokenizer, saved_by):
    run, model = make_run(tmp_path, tokenizer, saved_by)
    staging = push.main(["--model", str(run), "--repo-id", REPO_ID, "--dry-run"])
    assert staging == tmp_path / "runs" / "demo-upload"
    model_files = ("config.json", "model.safetensors", "modeling_tiny.py", "configuration_tiny.py", "tokenizer.json")
    for name in model_files + ("tokenization_tiny.py", "loss_curve.png", "metrics.jsonl", "README.md"):
        assert (staging / name).is_file(), name
    assert not (staging / "run_config.json").exists()  # it holds local paths; the card has what matters
    assert "AutoModelForCausalLM" in json.loads((staging / "config.json").read_text())["auto_map"]

    card = ModelCard.load(staging / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0" and {"tiny-hf", "custom_code"} <= set(card.data.tags)
    for expected in (
        f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)',
        f'AutoTokenizer.from_pretrained("{REPO_ID}", trust_remote_code=True)',
        "model.generate(",
        "| validation loss (nats per token) | 4.5000 |",
        "| validation bits per byte | 1.8000 |",
        f"| validation perplexity | {2.718**4.5:.2f} |",
        f"| parameters | {model.num_parameters():,} |",
        "| position_embedding | rope |",
        "| data | `notes:0.3,embedded:0.7` |",  # the public card names local data without its path
        "![loss curve](loss_curve.png)",
    ):
        assert expected in card.text, expected
    assert str(tmp_path) not in card.text


def test_card_of_a_bare_model_folder(tmp_path, tokenizer):
    run, _ = make_run(tmp_path, tokenizer, metrics=False)
    staging = push.main(["--model", str(run), "--repo-id", REPO_ID, "--dry-run", "--out", str(tmp_path / "stage")])
    card = ModelCard.load(staging / "README.md")
    assert "No evaluation was recorded" in card.text and "no run_config.json" in card.text
    assert card.data.library_name == "transformers"


def test_staging_folder_is_replaced_but_foreign_folders_are_not(tmp_path, tokenizer):
    run, _ = make_run(tmp_path, tokenizer)
    argv = ["--model", str(run), "--repo-id", REPO_ID, "--dry-run"]
    staging = push.main(argv)
    (staging / "stale.txt").write_text("from an earlier build")
    assert push.main(argv) == staging and not (staging / "stale.txt").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not built by push.py"):
        push.main(argv + ["--out", str(foreign)])
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(FileExistsError):  # the run folder itself is never a staging folder
        push.main(argv + ["--out", str(run)])


def test_bad_input_fails_before_anything_is_written(tmp_path, tokenizer):
    out = tmp_path / "stage"
    dry = ["--dry-run", "--out", str(out)]
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        push.main(["--model", str(tmp_path / "missing"), "--repo-id", REPO_ID, *dry])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model in"):
        push.main(["--model", str(tmp_path / "empty"), "--repo-id", REPO_ID, *dry])
    run, _ = make_run(tmp_path, tokenizer)
    for repo_id in ("tiny-demo", "a/b/c", "/tiny-demo", "someone/bad name"):
        with pytest.raises(ValueError, match="repo-id"):
            push.main(["--model", str(run), "--repo-id", repo_id, *dry])
    # conftest sets HF_HUB_OFFLINE=1: a real upload must stop at once, not after building the folder.
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        push.main(["--model", str(run), "--repo-id", REPO_ID, "--out", str(out)])
    assert not out.exists()


def test_upload_path_with_a_fake_hub(tmp_path, tokenizer, monkeypatch):
    """The non-dry-run path up to the Hub API, which is replaced: no network is ever touched."""
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0")

    monkeypatch.setattr(push, "HfApi", FakeApi)
    monkeypatch.setattr(push.hub_constants, "HF_HUB_OFFLINE", False)
    run, _ = make_run(tmp_path, tokenizer)
    staging = push.main(["--model", str(run), "--repo-id", REPO_ID, "--private"])
    (create, repo_id, create_kwargs), (upload, _, upload_kwargs) = calls
    assert (create, repo_id, create_kwargs) == ("create_repo", REPO_ID, {"private": True, "exist_ok": True})
    assert upload == "upload_folder" and upload_kwargs["folder_path"] == staging
    assert upload_kwargs["ignore_patterns"] == [push.STAGING_MARKER]
    assert upload_kwargs["commit_message"] == "Upload demo with tiny-hf"


@pytest.mark.slow
def test_staged_folder_generates_without_tiny_hf(tmp_path, tokenizer):
    # save_pretrained, not export: the harder case, where push.py must add the auto_map and the source files.
    run, model = make_run(tmp_path, tokenizer, saved_by="save_pretrained")
    staging = push.main(["--model", str(run), "--repo-id", REPO_ID, "--dry-run"])
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0].tolist()
    result = run_without_tiny_hf(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            import tiny_hf
            raise SystemExit("tiny_hf should not be importable here")
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained({str(staging)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(staging)!r}, trust_remote_code=True)
        assert type(model).__name__ == "TinyForCausalLM" and not type(model).__module__.startswith("tiny_hf")
        assert type(tokenizer).__name__ == "TinyTokenizerFast", type(tokenizer)
        inputs = tokenizer({PROMPT!r}, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert output[0].tolist() == {expected!r}, output[0].tolist()
        print("ok", repr(tokenizer.decode(output[0])))
        """,
        tmp_path,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
