"""The package as a user gets it: the import layers hold (and the check bites), and a non-editable install of the
wheel in a fresh venv has every module, the `tiny-hf` command with every stage, and the metric scripts."""

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tiny_hf.cli import BENCHMARKS, STAGES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["tiny_hf", "training", "alignment", "rag", "app", "bench", "report"]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def copy_tree(dest: Path) -> Path:
    """The packages' Python files and pyproject.toml, as import-linter sees the checkout."""
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("results", "*.png", "__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("tiny_hf/configuration_tiny.py", "import training.data", "The library core imports nothing"),
        ("rag/bm25.py", "from app import server", "Retrieval imports only tiny_hf"),
        ("app/server.py", "import alignment.sft", "Serving never imports training or alignment"),
        ("training/pretrain.py", "from bench import train_speed", "Nothing imports the benchmarks"),
    ],
)
def test_an_upward_import_breaks_a_contract_and_names_the_line(tmp_path, module, line, contract):
    tree = copy_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # the violation\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout
    assert module.replace("/", ".").removesuffix(".py") in result.stdout, result.stdout


def fresh_venv(tmp_path: Path) -> Path:
    """A new venv that sees the project's dependencies (this venv's site-packages, through a .pth line) but not the
    checkout: a path line in a .pth is not itself a site dir, so the editable install's finder stays out."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


INSTALLED_CHECK = textwrap.dedent(
    """
    import contextlib, importlib, io, json, pathlib, pkgutil, sys
    import tiny_hf, tiny_hf.cli, tiny_hf.metrics
    from tiny_hf.cli import BENCHMARKS, STAGES
    packages = ["tiny_hf", "training", "alignment", "rag", "app", "bench", "report"]
    where = {p: pathlib.Path(importlib.import_module(p).__file__).parent for p in packages}
    assert all("site-packages" in str(w) for w in where.values()), where
    modules = [m.name for p in packages for m in pkgutil.walk_packages([str(where[p])], p + ".")]
    for name in modules:
        importlib.import_module(name)
    helps = {}
    for argv in [[s, "--help"] for s in STAGES] + [["bench", b, "--help"] for b in BENCHMARKS]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                tiny_hf.cli.main(argv)
            except SystemExit as stop:
                assert stop.code in (0, None), (argv, stop.code)
        helps[" ".join(argv[:-1])] = out.getvalue()
    metrics = {
        "rouge_l": tiny_hf.metrics.load_rouge_l().compute(predictions=["a b c"], references=["a b d"]),
        "lm": tiny_hf.metrics.load_lm_metric().compute(losses=[2.0], num_tokens=[1], num_bytes=[1]),
    }
    print(json.dumps({"modules": modules, "helps": helps, "metrics": metrics}))
    """
)


@pytest.mark.slow
def test_the_wheel_installs_with_every_module_stage_and_metric(tmp_path):
    import json

    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("tiny_hf-*.whl")
    venv = fresh_venv(tmp_path)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    run = tmp_path / "elsewhere"  # not the checkout: nothing may come from the working tree
    run.mkdir()
    top = subprocess.run([str(venv / "bin" / "tiny-hf"), "--help"], cwd=run, env=env, capture_output=True, text=True)
    assert top.returncode == 0, top.stderr
    listed = re.findall(r"^    (\S+)", top.stdout, flags=re.M)
    assert listed == list(STAGES)  # every stage, in the study plan's order
    checked = subprocess.run(
        [str(python), "-c", INSTALLED_CHECK], cwd=run, env=env, capture_output=True, text=True, timeout=600
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    report = json.loads(checked.stdout.strip().splitlines()[-1])
    assert {"tiny_hf.metrics", "rag.index", "app.server", "training.pretrain", "report.card"} <= set(report["modules"])
    for stage, text in report["helps"].items():
        assert text.startswith(f"usage: tiny-hf {stage}"), (stage, text[:200])
    assert set(report["helps"]) == set(STAGES) | {f"bench {b}" for b in BENCHMARKS}
    assert report["metrics"]["rouge_l"]["rougeL_f1"] == pytest.approx(2 / 3)
    assert report["metrics"]["lm"]["loss"] == 2.0
    assert (Path(wheel).stat().st_size) < 5_000_000  # the committed results and plots stay out of the wheel


def test_no_module_runs_another_modules_main():
    """A stage's `main(argv)` is its command line; code that runs a stage builds its options and calls the function
    under it (`train(options)`, `run(options)`). Only tiny_hf/cli.py dispatches to `main`."""
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "tiny_hf" / "cli.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                called = isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "main"
                imported = isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names)
                if called or imported:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_cli_lists_the_stages_and_rejects_an_unknown_one(capsys):
    from tiny_hf import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in STAGES)
    with pytest.raises(SystemExit) as stop:
        cli.main(["pretrian"])
    assert stop.value.code == 2
    assert "unknown stage 'pretrian' (did you mean pretrain?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("tiny-hf 0.")


def test_stage_options_come_from_dataclasses_a_yaml_file_and_the_command_line(tmp_path):
    from dataclasses import dataclass, field

    from tiny_hf.options import parse_options

    @dataclass
    class Library:
        learning_rate: float = 5e-5
        max_steps: int = -1

    @dataclass
    class Ours:
        data: str = field(default="embedded", metadata={"help": "what to train on"})

    config = tmp_path / "stage.yaml"
    config.write_text("max_steps: 40\ndata: notes.jsonl\n")
    lib, ours = parse_options(Library, Ours, argv=[], defaults={"learning_rate": 1e-3})
    assert (lib.learning_rate, lib.max_steps, ours.data) == (1e-3, -1, "embedded")  # the stage's default wins
    lib, ours = parse_options(Library, Ours, argv=["--config", str(config), "--max-steps", "7"])
    assert (lib.max_steps, ours.data) == (7, "notes.jsonl")  # the file, then the command line
    config.write_text("max_step: 40\n")
    with pytest.raises(SystemExit) as stop:
        parse_options(Library, Ours, argv=["--config", str(config)])
    assert stop.value.code == 2
    with pytest.raises(ValueError, match="no option has"):
        parse_options(Library, argv=[], defaults={"lr": 1.0})


def test_an_expected_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    from tiny_hf import cli

    argv = ["pretrain", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run"), "--cpu"]
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.count("\n") == 0
    assert err.startswith("tiny-hf pretrain: error: data source") and "missing.txt" in err
    with pytest.raises(FileNotFoundError, match="missing.txt"):  # --debug: the traceback
        cli.main(["--debug", *argv])
