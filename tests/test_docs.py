"""The learning-path guide (docs/*.md) and the README's Learning path table stay true to the code.

1. Every relative link and image in README.md and docs/*.md points at a file that exists (and a same-page anchor at
   a heading of that page).
2. Every command shown in a ```bash block of docs/*.md, and every command of the README's Learning path table, is
   checked against the real code: for `tiny-hf STAGE ...` (`tiny-hf bench NAME ...`), `python -m pkg.mod ...`,
   `python path/script.py ...` and `accelerate launch [launcher flags] script ...` the stage's `main(argv)` is called
   the way tiny_hf.cli calls it, with `argparse.ArgumentParser.parse_known_args` patched so that the stage's first
   parse reads the shown argv with its own parser and then stops main(): an unknown or malformed flag fails here and
   nothing runs. Patching `parse_known_args` covers both kinds of stage parser: argparse's `parse_args` calls it, and
   so do `HfArgumentParser.parse_args_into_dataclasses` and tiny_hf.options' first look for `--config`. `make X`
   needs a Makefile target X.
3. Every entry point shown is run at a tiny size by some test: `TINY_RUNS` names that test, and the test must exist.
   Entry points are script paths: `tiny-hf STAGE` counts as its module's file (tiny_hf.cli.STAGES, BENCHMARKS).
   The entry points no other test file runs (the ablation script, the demo, the benchmarks shown) are run tiny here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import NamedTuple

import pytest

from tiny_hf.cli import BENCHMARKS, STAGES, run_module

ROOT = Path(__file__).resolve().parent.parent
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"

# Entry point (a script path; `python -m a.b` counts as a/b.py) -> the test (file::name) that runs it at a tiny size.
TINY_RUNS: dict[str, str] = {
    "training/pretrain.py": "tests/test_pretrain.py::test_two_steps_write_a_complete_run_folder",
    "accelerate launch training/pretrain.py": (
        "tests/test_pretrain.py::test_accelerate_launch_runs_two_processes_with_identical_weights"
    ),
    "training/demo.py": "tests/test_docs.py::test_demo_runs_tiny",
    "training/ablate.py": "tests/test_docs.py::test_ablate_runs_tiny",
    "tiny_hf/corpus.py": "tests/test_corpus.py::test_cli",
    "training/shards.py": "tests/test_shards.py::test_cli_prepares_one_source",
    "bench/tokenizer_bench.py": "tests/test_docs.py::test_tokenizer_bench_runs_tiny",
    "bench/model_speed.py": "tests/test_docs.py::test_model_speed_runs_tiny",
    "bench/train_speed.py": "tests/test_docs.py::test_train_speed_runs_tiny",
    "bench/attention_cost.py": "tests/test_docs.py::test_attention_cost_runs_tiny",
    "bench/ppo_speed.py": "tests/test_ppo.py::test_ppo_speed_bench_runs_tiny",
    "alignment/sft.py": "tests/test_sft.py::test_sft_lowers_the_held_out_loss_and_writes_the_report",
    "training/finetune.py": (
        "tests/test_finetune.py::test_causal_lm_lora_on_a_run_folder_improves_saves_reloads_and_merges"
    ),
    "training/quantize.py": (
        "tests/test_quantization.py::test_script_compares_ours_with_bitsandbytes_and_reloads_saved_models"
    ),
    "training/prune.py": "tests/test_pruning.py::test_script_writes_table_plot_and_a_reloadable_pruned_model",
    "alignment/reward.py": (
        "tests/test_reward.py::test_reward_model_learns_held_out_preferences_and_loads_without_tiny_hf"
    ),
    "alignment/dpo.py": "tests/test_dpo.py::test_dpo_trains_summarises_and_exports",
    "alignment/ppo.py": "tests/test_ppo.py::test_toy_reward_rises_with_bounded_kl",
    "alignment/grpo.py": "tests/test_grpo.py::test_grpo_and_rloo_train_with_python_rewards",
    "alignment/compare.py": "tests/test_alignment_compare.py::test_one_table_for_every_method_on_the_same_prompts",
    "rag/index.py": "tests/test_rag.py::test_index_and_search_cli",
    "rag/search.py": "tests/test_rag.py::test_index_and_search_cli",
    "rag/answer.py": "tests/test_docs.py::test_rag_answer_runs_tiny",
    "bench/rag_bench.py": "tests/test_docs.py::test_rag_bench_runs_tiny",
    "bench/speculative_bench.py": "tests/test_speculative_bench.py::test_every_draft_and_k_gives_the_targets_tokens",
    "bench/engine_vs_llamacpp.py": (
        "tests/test_engine_vs_llamacpp.py::test_both_models_write_one_results_file_with_every_figure"
    ),
    "bench/server_soak.py": (
        "tests/test_server_soak.py::test_a_thousand_mixed_requests_leave_the_server_idle_without_errors_or_growth"
    ),
    "report/card.py": "tests/test_report_card.py::test_quick_card_has_every_section_and_its_links_resolve",
    "training/long_context.py": "tests/test_long_context.py::test_script_writes_the_report_for_every_variant",
    "alignment/harness.py": "tests/test_harness.py::test_results_go_to_the_run_folder_with_a_table",
    "training/push.py": "tests/test_push.py::test_dry_run_stages_model_plots_and_card",
    "training/fetch.py": "tests/test_fetch.py::test_smollm2_is_a_stock_llama_that_chats_and_stops_at_the_end_of_turn",
    "training/export.py": (
        "tests/test_export.py::test_llama_format_is_a_stock_folder_that_loads_without_tiny_hf_or_remote_code"
    ),
    "app/server.py": "tests/test_server.py::test_cli_serves_and_shuts_down_gracefully",
    # main() builds this app with build_demo() and launches it; the fixture of this test does the same on a tiny model.
    "app/demo.py": "tests/test_app_demo.py::test_chat_api_streams_a_growing_reply",
}


# ---------------------------------------------------------------------------------------------------------------------
# Reading the Markdown
# ---------------------------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    return [README, *DOC_PAGES]


def links(path: Path) -> list[str]:
    """Link and image targets of a Markdown file, outside code blocks and inline code."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return LINK.findall(text)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file: lowercase, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-"))
    return anchors


def bash_commands(path: Path) -> list[str]:
    """The commands of the ```bash blocks of a page, one per line (backslash continuations joined)."""
    commands = []
    for lang, body in FENCE.findall(path.read_text(encoding="utf-8")):
        if lang != "bash":
            continue
        body = re.sub(r"\\\n\s*", " ", body)
        commands += [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]
    return commands


def learning_path_commands() -> list[str]:
    """The `command` column of the README's Learning path table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Learning path\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    column = header.index("command")
    commands = []
    for row in rows[1:]:
        cell = row.strip("|").split("|")[column]
        commands += INLINE_CODE.findall(cell)
    return [c.strip("`") for c in commands]


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) for every command the guide shows: the bash blocks of the README and docs/*.md, and the
    README's Learning path table."""
    found = [(str(page.relative_to(ROOT)), cmd) for page in markdown_files() for cmd in bash_commands(page)]
    return found + [("README.md learning path", cmd) for cmd in learning_path_commands()]


# ---------------------------------------------------------------------------------------------------------------------
# Understanding a command
# ---------------------------------------------------------------------------------------------------------------------
def makefile_targets() -> dict[str, list[str]]:
    """Makefile target -> its recipe lines."""
    targets: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if match := re.match(r"^([\w.-]+)\s*:(?!=)", line):
            current = match.group(1)
            targets[current] = []
        elif line.startswith("\t") and current is not None:
            targets[current].append(line.strip())
        elif line.strip() and not line.startswith("#"):
            current = None
    return targets


def script_of_module(name: str) -> str:
    return name.replace(".", "/") + ".py"


class Shown(NamedTuple):
    """A shown command, understood.

    Args:
        kind: 'make', 'tiny-hf', 'python', 'accelerate' or 'curl' (a request to a running server: nothing to parse).
        entry: The script path (`tiny-hf STAGE` and `python -m a.b` count as their module's file) or the make target.
        argv: What the stage's parser sees.
        prog: The program name the stage's usage line prints, as tiny_hf.cli sets it.
    """

    kind: str
    entry: str
    argv: list[str]
    prog: str = ""


def parse_tiny_hf(command: str, words: list[str]) -> Shown:
    """`tiny-hf STAGE ...` or `tiny-hf bench NAME ...`: the stage's module from tiny_hf.cli's own tables."""
    stage = words[1] if len(words) > 1 else None
    assert stage in STAGES, f"{command!r}: {stage!r} is not one of tiny-hf's stages {sorted(STAGES)}"
    if stage != "bench":
        return Shown("tiny-hf", script_of_module(STAGES[stage][0]), words[2:], f"tiny-hf {stage}")
    name = words[2] if len(words) > 2 else None
    assert name in BENCHMARKS, f"{command!r}: {name!r} is not one of the benchmarks {sorted(BENCHMARKS)}"
    return Shown("tiny-hf", script_of_module(BENCHMARKS[name]), words[3:], f"tiny-hf bench {name}")


def parse_accelerate(command: str, words: list[str]) -> Shown:
    """`accelerate launch [launcher flags] script|-m module ...`, read by accelerate's own launcher parser."""
    from accelerate.commands.launch import launch_command_parser

    try:
        launched = launch_command_parser().parse_args(words[2:])
    except SystemExit:
        raise AssertionError(f"{command!r}: accelerate launch rejected its flags (see stderr)") from None
    script = launched.training_script
    if launched.module:  # `accelerate launch -m training.pretrain`
        script = script_of_module(script)
    return Shown("accelerate", script, list(launched.training_script_args), script)


def parse_command(command: str) -> Shown:
    """What a shown command runs, and with which argv."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # leading VAR=value environment settings
        words.pop(0)
    if words[:1] == ["make"]:
        assert len(words) == 2, f"{command!r}: show one make target at a time"
        return Shown("make", words[1], [])
    if words[:1] == ["tiny-hf"]:
        return parse_tiny_hf(command, words)
    if words[:1] == ["python"]:
        if words[1:2] == ["-m"]:
            return Shown("python", script_of_module(words[2]), words[3:], words[2])
        return Shown("python", words[1], words[2:], words[1])
    if words[:2] == ["accelerate", "launch"]:
        return parse_accelerate(command, words)
    if words[:1] == ["curl"]:
        return Shown("curl", "", words[1:])
    raise AssertionError(
        f"{command!r}: the guide shows only tiny-hf, python, accelerate launch, make and curl commands"
    )


def entry_key(kind: str, script: str) -> str:
    return f"accelerate launch {script}" if kind == "accelerate" else script


def module_of_script(script: str) -> str:
    """The module of a script path (every folder with scripts is a package)."""
    assert (ROOT / script).is_file(), f"{script} does not exist"
    return script[: -len(".py")].replace("/", ".")


def load_script(script: str):
    return importlib.import_module(module_of_script(script))


class _Parsed(BaseException):
    """Raised by the patched parse_known_args once the stage's parser has read the shown argv: main() stops there.
    A BaseException, so that no `except Exception` in a stage can swallow it."""

    def __init__(self, unrecognised: list[str]):
        super().__init__(unrecognised)
        self.unrecognised = unrecognised


def check_command(command: str) -> None:
    """Parse a shown command with the real code and stop before it runs; an AssertionError says what is wrong.

    The stage's `main(argv)` is called as tiny_hf.cli calls it (`run_module`). Its first `parse_known_args` (argparse's
    `parse_args` and HfArgumentParser's both go through it) parses the shown argv for real, so a malformed value or
    a missing required option exits as it would; what is left over is a flag the stage does not know.
    """
    kind, entry, argv, prog = parse_command(command)
    if kind == "curl":
        return
    if kind == "make":
        assert entry in makefile_targets(), f"`{command}`: the Makefile has no target {entry!r}"
        return
    module = load_script(entry)
    assert callable(getattr(module, "main", None)), f"`{command}`: {entry} has no main(argv)"
    original = argparse.ArgumentParser.parse_known_args
    inside: list[argparse.ArgumentParser] = []

    def parse_then_stop(self, args=None, namespace=None):
        if inside:  # a subparser's parse, run inside the stage parser's own
            return original(self, args, namespace)
        inside.append(self)
        try:
            _, unrecognised = original(self, args, namespace)
        finally:
            inside.pop()
        raise _Parsed(unrecognised)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
        try:
            run_module(module.__name__, prog, argv)
        except _Parsed as parsed:
            assert not parsed.unrecognised, f"`{command}`: {entry}'s parser does not know {parsed.unrecognised}"
            return
        except SystemExit as exit_:
            raise AssertionError(
                f"`{command}`: {entry}'s parser rejected {argv} (exit {exit_.code}; see stderr)"
            ) from None
    raise AssertionError(f"`{command}`: {entry}.main returned without parsing its arguments")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Links
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_an_existing_file(path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:
            if anchor not in heading_anchors(path):
                broken.append(f"{target} (no such heading in {path.name})")
            continue
        if not (path.parent / file_part).resolve().exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_the_guide_has_its_pages_and_the_readme_links_every_one():
    names = {p.name for p in DOC_PAGES}
    assert "README.md" in names and len(names) >= 10, names
    readme_links = set(links(README)) | set(links(ROOT / "docs" / "README.md"))
    unlinked = [n for n in names - {"README.md"} if f"docs/{n}" not in readme_links and n not in readme_links]
    assert not unlinked, f"pages missing from the Learning path / docs index: {unlinked}"


# ---------------------------------------------------------------------------------------------------------------------
# 2. Commands: each one parsed by the real script's parser, nothing run
# ---------------------------------------------------------------------------------------------------------------------
def test_the_guide_shows_commands():
    assert len(learning_path_commands()) >= 9
    assert all(bash_commands(page) for page in DOC_PAGES if page.name != "README.md")


@pytest.mark.parametrize("where, command", shown_commands(), ids=[f"{w}: {c[:60]}" for w, c in shown_commands()])
def test_shown_command_is_accepted_by_the_real_parser(where, command):
    try:
        check_command(command)
    except AssertionError as error:
        pytest.fail(f"{where}: {error}")


@pytest.mark.parametrize(
    "command, expected",
    [
        (
            "tiny-hf pretrain --out runs/x --max-steps 2",
            Shown("tiny-hf", "training/pretrain.py", ["--out", "runs/x", "--max-steps", "2"], "tiny-hf pretrain"),
        ),
        (
            "tiny-hf long-context --model runs/demo",
            Shown("tiny-hf", "training/long_context.py", ["--model", "runs/demo"], "tiny-hf long-context"),
        ),
        (
            "tiny-hf bench serve-speed --concurrency 1",
            Shown("tiny-hf", "bench/serve_speed.py", ["--concurrency", "1"], "tiny-hf bench serve-speed"),
        ),
        (
            "python -m training.pretrain --out runs/x",
            Shown("python", "training/pretrain.py", ["--out", "runs/x"], "training.pretrain"),
        ),
        (
            "python training/pretrain.py --out runs/x",
            Shown("python", "training/pretrain.py", ["--out", "runs/x"], "training/pretrain.py"),
        ),
        (
            "accelerate launch --num_processes 2 training/pretrain.py --out x",
            Shown("accelerate", "training/pretrain.py", ["--out", "x"], "training/pretrain.py"),
        ),
        (
            "ACCELERATE_USE_CPU=1 accelerate launch -m training.pretrain --out x",
            Shown("accelerate", "training/pretrain.py", ["--out", "x"], "training/pretrain.py"),
        ),
        ("make demo", Shown("make", "demo", [])),
    ],
)
def test_commands_map_to_their_stage_module(command, expected):
    assert parse_command(command) == expected


@pytest.mark.parametrize(
    "command, says",
    [
        ("tiny-hf pretrain --no-such-flag", "does not know ['--no-such-flag']"),
        ("tiny-hf pretrain --max-steps many", "parser rejected ['--max-steps', 'many']"),
        ("python -m training.pretrain --out runs/x --no-such-flag 1", "does not know ['--no-such-flag', '1']"),
        ("accelerate launch training/pretrain.py --no-such-flag", "does not know ['--no-such-flag']"),
        ("tiny-hf export --no-such-flag", "does not know ['--no-such-flag']"),  # HfArgumentParser (tiny_hf.options)
        ("tiny-hf export --format onnx", "parser rejected ['--format', 'onnx']"),
        ("tiny-hf bench model-speed --no-such-flag", "does not know ['--no-such-flag']"),
        ("tiny-hf no-such-stage --out x", "'no-such-stage' is not one of tiny-hf's stages"),
        ("tiny-hf bench no-such-bench", "'no-such-bench' is not one of the benchmarks"),
        ("python training/no_such_script.py", "training/no_such_script.py does not exist"),
        ("make no-such-target", "the Makefile has no target 'no-such-target'"),
        ("bash run.sh", "the guide shows only"),
    ],
)
def test_the_checker_rejects_a_wrong_command(command, says):
    with pytest.raises(AssertionError, match=re.escape(says)):
        check_command(command)


def test_the_checker_accepts_both_spellings_of_a_dataclass_option():
    """HfArgumentParser stages take `--max-steps` and `--max_steps`; `--config` is read by the first parse."""
    check_command("tiny-hf export --model runs/demo --out exports/demo --format llama")
    check_command("tiny-hf tokenizer --vocab_size 400 --out runs/tok --config tokenizer.yaml")
    check_command("tiny-hf tokenizer --vocab-size 400 --out runs/tok")


# ---------------------------------------------------------------------------------------------------------------------
# 3. Every entry point shown is run at a tiny size by a test
# ---------------------------------------------------------------------------------------------------------------------
def make_entry_points(recipe: list[str]) -> set[str]:
    """What a make target runs: `$(VENV)/bin/tiny-hf STAGE` (every benchmark named in the recipe for `tiny-hf bench`,
    which a shell loop runs), `$(PY) -m pkg.mod` or `$(PY) path.py`."""
    entries = set()
    for line in recipe:
        if match := re.search(r"/tiny-hf\s+([\w-]+)", line):
            if match.group(1) == "bench":
                named = set(re.findall(r"[\w-]+", " ".join(recipe))) & set(BENCHMARKS)
                entries |= {script_of_module(BENCHMARKS[name]) for name in named}
            else:
                entries.add(parse_tiny_hf(line, ["tiny-hf", match.group(1)]).entry)
        elif match := re.match(r"\$\(PY\)\s+-m\s+([\w.]+)", line):
            entries.add(script_of_module(match.group(1)))
        elif match := re.match(r"\$\(PY\)\s+(\S+\.py)", line):
            entries.add(match.group(1))
    return {entry for entry in entries if (ROOT / entry).is_file()}  # `$(PY) -m pytest` is the suite, not a stage


def shown_entry_points() -> set[str]:
    entries = set()
    targets = makefile_targets()
    for _, command in shown_commands():
        kind, entry, _, _ = parse_command(command)
        if kind == "make":
            entries |= make_entry_points(targets.get(entry, []))
        elif kind != "curl":
            entries.add(entry_key(kind, entry))
    return entries


def test_make_targets_resolve_to_the_stages_they_run():
    targets = makefile_targets()
    assert make_entry_points(targets["demo"]) == {"training/demo.py"}
    assert make_entry_points(targets["serve"]) == {"app/server.py"}
    assert make_entry_points(targets["bench"]) >= {"bench/tokenizer_bench.py", "bench/model_speed.py"}


def test_every_shown_entry_point_has_a_tiny_run():
    missing = sorted(shown_entry_points() - set(TINY_RUNS))
    assert not missing, f"no test is named in TINY_RUNS for: {missing}"


@pytest.mark.parametrize("entry", sorted(TINY_RUNS))
def test_the_named_tiny_run_exists(entry):
    file, _, name = TINY_RUNS[entry].partition("::")
    assert (ROOT / entry.removeprefix("accelerate launch ")).is_file(), f"{entry} does not exist"
    assert (ROOT / file).is_file(), f"{file} does not exist"
    assert re.search(rf"^def {re.escape(name)}\(", (ROOT / file).read_text(), re.MULTILINE), (
        f"no `def {name}` in {file}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Tiny runs of the entry points no other test file runs. Every output goes to tmp_path, never to bench/results.
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small local corpus: 60 pydoc topics as one .txt, documents joined by the separator."""
    from tiny_hf.corpus import DOC_SEPARATOR, topic_documents

    root = tmp_path_factory.mktemp("docs_corpus")
    (root / "corpus.txt").write_text(DOC_SEPARATOR.join(d["text"] for d in topic_documents()[:60]))
    return root / "corpus.txt"


TINY_MODEL = ["--set", "hidden_size=32", "--set", "num_hidden_layers=2", "--set", "intermediate_size=64"]


@pytest.mark.slow
def test_demo_runs_tiny(corpus, tmp_path):
    from training import demo

    out = tmp_path / "demo"
    result = demo.main(
        [
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--max-new-tokens",
            "2",
            "--data",
            str(corpus),
            "--model",
            "tiny-1m",
            *TINY_MODEL,
            "--vocab-size",
            "400",
            "--block-size",
            "32",
            "--batch-size",
            "4",
            "--eval-blocks",
            "2",
            "--sample-tokens",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
            "--cpu",
        ]
    )
    assert len(result["samples"]) == len(demo.PROMPTS) and (out / "model" / "config.json").exists()


@pytest.mark.slow
def test_ablate_runs_tiny(corpus, tmp_path):
    from training import ablate

    # ablate takes every pretraining option: shrink the model, the tokenizer it trains once (shared by every
    # variant) and the evaluation. The `--set`s add to each variant's own.
    tiny = [*TINY_MODEL, "--vocab-size", "400", "--eval-blocks", "2", "--sample-tokens", "2", "--cpu"]
    out, results = tmp_path / "ablate", tmp_path / "results"
    figures = ablate.main(
        [
            *tiny,
            "--studies",
            "block",
            "--data",
            str(corpus),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--block-size",
            "32",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--results",
            str(results),
        ]
    )
    assert set(figures["results"]["block"]) == set(ablate.STUDIES["block"])
    assert (results / "ablations.md").exists() and (results / "ablation_block.png").exists()


@pytest.mark.slow
def test_ablate_with_seeds_reports_the_spread_and_reuses_finished_runs(corpus, tmp_path, monkeypatch):
    from training import ablate

    # The recipe study's shape (Muon, AdamW, a piece added to Muon), two seeds, two runs at a time in worker processes.
    study = {"muon": ["--optimizer=muon"], "adamw": [], "+softcap": ["--optimizer=muon", "logit_softcap=15"]}
    monkeypatch.setitem(ablate.STUDIES, "recipe_like", study)
    tiny = [*TINY_MODEL, "--vocab-size", "400", "--eval-blocks", "2", "--sample-tokens", "2", "--cpu"]
    out = tmp_path / "ablate"
    argv = [
        *tiny,
        *(
            "--studies",
            "recipe_like",
            "--seeds",
            "0,1",
            "--jobs",
            "2",
            "--target-loss",
            "100",
            "--name",
            "recipe_like",
        ),
        *("--data", str(corpus), "--max-steps", "2", "--batch-size", "4", "--block-size", "32"),
        *("--cache-dir", str(tmp_path / "cache"), "--out", str(out)),
    ]
    figures = ablate.main(argv)
    variants = figures["results"]["recipe_like"]
    assert list(variants) == ["muon", "adamw", "+softcap"] and figures["setup"]["seeds"] == [0, 1]
    for r in variants.values():
        assert len(r["val_loss_per_seed"]) == 2 and r["val_bits_per_byte_std"] is not None
        assert r["steps_to_target_per_seed"] == [1, 1]  # the first evaluation (step 1) is below a loss of 100
        assert isinstance(r["vs_baseline"]["beyond_noise"], bool)
    assert variants["muon"]["vs_baseline"]["delta_bits_per_byte"] == 0
    assert (
        "Δ bits/byte vs muon" in (out / "recipe_like.md").read_text() and (out / "ablation_recipe_like.png").exists()
    )
    finals = sorted(out.glob("recipe_like/*/seed-*/final-rank0.json"))
    assert len(finals) == 6
    # Asked again, every run is read back, not trained again.
    stamps = [f.stat().st_mtime_ns for f in finals]
    assert ablate.main(argv)["results"] == figures["results"]
    assert [f.stat().st_mtime_ns for f in finals] == stamps


@pytest.mark.slow
def test_tokenizer_bench_runs_tiny(tmp_path):
    from tiny_hf.corpus import topic_documents

    data = tmp_path / "corpus"
    data.mkdir()
    docs = [d["text"] for d in topic_documents()[:40]]
    for split, texts in (("train", docs[:32]), ("validation", docs[32:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bench = load_script("bench/tokenizer_bench.py")
    bench.main(
        [
            "--data",
            str(data),
            "--vocab-sizes",
            "300",
            "--repeats",
            "1",
            "--skip",
            "unigram",
            "--out",
            str(tmp_path / "results"),
        ]
    )
    assert "ours BPE" in (tmp_path / "results" / "tokenizers.md").read_text()


@pytest.mark.slow
def test_model_speed_runs_tiny(tmp_path):
    bench = load_script("bench/model_speed.py")
    bench.main(
        [
            "--device",
            "cpu",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--vocab",
            "64",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--out",
            str(tmp_path),
            "--name",
            "speed",
        ]
    )
    assert (tmp_path / "speed.md").exists()


@pytest.mark.slow
def test_train_speed_runs_tiny(corpus, tmp_path):
    bench = load_script("bench/train_speed.py")
    figures = bench.main(
        [
            "--vocab-size",
            "400",
            "--preset",
            "tiny-1m",
            "--batch",
            "2",
            "--block-size",
            "32",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--data",
            str(corpus),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path),
            "--name",
            "train_speed",
        ]
    )
    assert figures["pipeline_tokens_per_s"] > 0 and (tmp_path / "train_speed.md").exists()


@pytest.mark.slow
def test_attention_cost_runs_tiny(tmp_path):
    bench = load_script("bench/attention_cost.py")
    figures = bench.main(
        [
            "--lengths",
            "32",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--window",
            "8",
            "--repeats",
            "1",
            "--implementations",
            "sdpa",
            "--device",
            "cpu",
            "--results",
            str(tmp_path),
        ]
    )
    assert [r.get("skipped") for r in figures["rows"]] == [None], figures["rows"]  # each row is a child process


@pytest.mark.slow
def test_rag_answer_runs_tiny(rag_index_dir, tiny_lm_dir, capsys):
    from conftest import RAG_QUESTION

    argv = ["--index", str(rag_index_dir), "--model", str(tiny_lm_dir), "--max-new-tokens", "4", "--json"]
    result = run_module("rag.answer", "tiny-hf ask", [*argv, "-k", "2", RAG_QUESTION])
    assert len(result["sources"]) == 2 and json.loads(capsys.readouterr().out)["text"] == result["text"]


@pytest.mark.slow
def test_rag_bench_runs_tiny(tmp_path):
    tiny = ["--max-docs", "2", "--queries", "5", "--repeats", "1", "--sizes", "200", "--scale-queries", "3"]
    tiny += ["--answers", "0"]  # grounded answers: tests/test_rag_bench.py (with the tiny model)
    figures = run_module("bench.rag_bench", "tiny-hf bench rag", [*tiny, "--results", str(tmp_path)])
    assert figures["quality"]["documents"] == 2 and figures["dense_scaling"][0]["vectors"] == 200, figures[
        "dense_scaling"
    ]
    assert (tmp_path / "rag.md").exists()
