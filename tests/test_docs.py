"""The learning-path guide (docs/*.md) and the README's Learning path table stay true to the code.

1. Every relative link and image in README.md and docs/*.md points at a file that exists (and a same-page anchor at
   a heading of that page).
2. Every command shown in a ```bash block of docs/*.md, and every command of the README's Learning path table, is
   checked against the real code: for `python -m pkg.mod ...`, `python path/script.py ...` and
   `accelerate launch [launcher flags] script ...` the script's `main(argv)` is called with
   `argparse.ArgumentParser.parse_args` patched to parse the shown argv with the script's own parser and then stop,
   so an unknown or malformed flag fails here and nothing runs; `make X` needs a Makefile target X.
3. Every entry point shown is run at a tiny size by some test: `TINY_RUNS` names that test, and the test must exist.
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

import pytest

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
    "bench/tokenizer_bench.py": "tests/test_docs.py::test_tokenizer_bench_runs_tiny",
    "bench/model_speed.py": "tests/test_docs.py::test_model_speed_runs_tiny",
    "bench/train_speed.py": "tests/test_docs.py::test_train_speed_runs_tiny",
    "bench/attention_cost.py": "tests/test_docs.py::test_attention_cost_runs_tiny",
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
    "training/long_context.py": "tests/test_long_context.py::test_script_writes_the_report_for_every_variant",
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
    """(where, command) for every command the guide shows."""
    found = [(f"docs/{page.name}", cmd) for page in DOC_PAGES for cmd in bash_commands(page)]
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


def parse_command(command: str) -> tuple[str, str, list[str]]:
    """(kind, entry point, argv): kind is 'make', 'python' or 'accelerate'; the entry point a script path (or the
    make target); argv what the script's parser sees."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # leading VAR=value environment settings
        words.pop(0)
    if words[:1] == ["make"]:
        assert len(words) == 2, f"{command!r}: show one make target at a time"
        return "make", words[1], []
    if words[:1] == ["python"]:
        if words[1:2] == ["-m"]:
            return "python", script_of_module(words[2]), words[3:]
        return "python", words[1], words[2:]
    if words[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        try:
            launched = launch_command_parser().parse_args(words[2:])
        except SystemExit:
            raise AssertionError(f"{command!r}: accelerate launch rejected its flags (see stderr)") from None
        return "accelerate", launched.training_script, list(launched.training_script_args)
    raise AssertionError(f"{command!r}: the guide shows only python, accelerate launch and make commands")


def entry_key(kind: str, script: str) -> str:
    return f"accelerate launch {script}" if kind == "accelerate" else script


def load_script(script: str):
    """The module of a script path (every folder with scripts is a package)."""
    assert (ROOT / script).is_file(), f"{script} does not exist"
    return importlib.import_module(script[: -len(".py")].replace("/", "."))


class _Parsed(Exception):
    """Raised by the patched parse_args once the shown argv parsed: main() stops before doing anything."""


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
def test_shown_command_is_accepted_by_the_real_parser(where, command, monkeypatch):
    kind, entry, argv = parse_command(command)
    if kind == "make":
        assert entry in makefile_targets(), f"{where}: `{command}`: the Makefile has no target {entry!r}"
        return
    module = load_script(entry)
    assert callable(getattr(module, "main", None)), f"{where}: {entry} has no main(argv)"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        module.main(argv)
    except _Parsed:
        return
    except SystemExit as exit_:
        pytest.fail(f"{where}: `{command}`: {entry}'s parser rejected {argv} (exit {exit_.code}; see stderr)")
    pytest.fail(f"{where}: `{command}`: {entry}.main returned without parsing its arguments")


# ---------------------------------------------------------------------------------------------------------------------
# 3. Every entry point shown is run at a tiny size by a test
# ---------------------------------------------------------------------------------------------------------------------
def shown_entry_points() -> set[str]:
    entries = set()
    targets = makefile_targets()
    for _, command in shown_commands():
        kind, entry, _ = parse_command(command)
        if kind != "make":
            entries.add(entry_key(kind, entry))
            continue
        for line in targets.get(entry, []):  # what a make target runs: `$(PY) -m pkg.mod` or `$(PY) path.py`
            if match := re.match(r"\$\(PY\)\s+-m\s+([\w.]+)", line):
                entries.add(script_of_module(match.group(1)))
            elif match := re.match(r"\$\(PY\)\s+(\S+\.py)", line):
                entries.add(match.group(1))
    return entries


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
            "--",
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
def test_ablate_runs_tiny(corpus, tmp_path, monkeypatch):
    from training import ablate, pretrain

    # ablate.py takes a preset and its own evaluation budget: shrink the model, the tokenizer it trains once (shared
    # by every variant) and the evaluation. Later flags win; `--set`s add to the variant's own.
    tiny = [*TINY_MODEL, "--vocab-size", "400", "--eval-blocks", "2", "--sample-tokens", "2", "--cpu"]
    original = pretrain.parse_args
    monkeypatch.setattr(pretrain, "parse_args", lambda argv=None: original([*argv, *tiny]))
    out, results = tmp_path / "ablate", tmp_path / "results"
    figures = ablate.main(
        [
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
def test_train_speed_runs_tiny(corpus, tmp_path, monkeypatch):
    from training import pretrain

    original = pretrain.parse_args
    monkeypatch.setattr(pretrain, "parse_args", lambda argv=None: original([*argv, "--vocab-size", "400", "--cpu"]))
    bench = load_script("bench/train_speed.py")
    figures = bench.main(
        [
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
