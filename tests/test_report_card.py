"""report/card.py --quick on a tiny configuration: the card's structure, not its numbers. Every section is
present with a source line, every image it links exists, every relative link resolves, and a missing source is said
plainly instead of failing."""

import re
import shutil
from pathlib import Path

import pytest

from report import card as report_card
from tiny_hf.bpe import train_tokenizer
from tiny_hf.corpus import DOC_SEPARATOR, topic_documents

ROOT = Path(__file__).resolve().parent.parent
TITLES = [
    "Machine and versions",
    "Corpus and tokenizer",
    "Training curves and ablations",
    "Validation loss and bits per byte",
    "Standard evaluation (lm-evaluation-harness)",
    "Fine-tuning, SFT and alignment",
    "Quantization and pruning",
    "Serving speed",
    "RAG recall",
    "Long context",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small local corpus and a 320-token tokenizer, so the quick run trains in seconds."""
    root = tmp_path_factory.mktemp("report")
    texts = [d["text"] for d in topic_documents()[:60]]
    (root / "corpus.txt").write_text(DOC_SEPARATOR.join(texts))
    train_tokenizer(texts, vocab_size=320).save_pretrained(root / "tokenizer")
    return root


def quick(workspace: Path, out: Path, results: Path, *extra: str) -> dict:
    return report_card.main(
        [
            "--quick",
            "--strict",
            "--out",
            str(out),
            "--results",
            str(results),
            "--runs",
            str(workspace / "no-runs"),
            "--max-steps",
            "6",
            *extra,
            "--",
            "--data",
            str(workspace / "corpus.txt"),
            "--tokenizer",
            str(workspace / "tokenizer"),
            "--cache-dir",
            str(workspace / "cache"),
            "--block-size",
            "32",
            "--eval-every",
            "3",
            "--val-fraction",
            "0.2",
            "--no-progress",
            "--cpu",
        ]
    )


def links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", markdown)


@pytest.mark.slow
def test_quick_card_has_every_section_and_its_links_resolve(workspace, tmp_path):
    out = tmp_path / "report"
    summary = quick(workspace, out, ROOT / "bench" / "results")  # trains in a temporary folder, removed after
    text = (out / "REPORT.md").read_text()
    assert summary["failed"] == [] and summary["sections"] == TITLES
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == ["Contents", *TITLES]
    assert text.count("*Source: ") == len(TITLES)
    # The run trained here: its curve and every evaluation (steps 3 and 6) are in the card.
    assert "this run (`metrics.jsonl` (temporary, removed))" in text.split("## Training curves")[1]
    validation = text.split("## Validation loss and bits per byte")[1].split("\n## ")[0]
    assert re.search(r"^\| 3 \|", validation, flags=re.M) and re.search(r"^\| 6 \|", validation, flags=re.M)
    assert "committed results" in text.split("## Quantization and pruning")[1]
    for name in (
        "loss_curve.png",
        "val_bits_per_byte.png",
        "tokenizers.png",
        "ablations.png",
        "serving.png",
        "long_context_heatmap.png",
    ):
        assert name in summary["images"] and (out / name).stat().st_size > 1000, name
    for target in links(text):
        if target.startswith("#"):
            assert target[1:] in {report_card.anchor(t) for t in TITLES}, target
        else:
            assert (out / target).exists(), target
    assert set(summary["images"]) == {p.name for p in out.glob("*.png")}


@pytest.mark.slow
def test_missing_sources_are_said_plainly(workspace, tmp_path):
    """With only two committed files, the card is still written; the rest say what is missing and how to make it."""
    results = tmp_path / "results"
    results.mkdir()
    for name in ("rag.md", "rag.json"):
        shutil.copy(ROOT / "bench" / "results" / name, results / name)
    out = tmp_path / "report"
    summary = quick(workspace, out, results, "--train-out", str(tmp_path / "run"))
    text = (out / "REPORT.md").read_text()
    assert summary["failed"] == [] and summary["sections"] == TITLES
    assert "No serving results: run `tiny-hf bench serve-speed`" in text
    assert "No long-context results" in text and "No pruning results" in text
    assert "has not been run: no `alignment.md`" in text
    assert "not run (no `sft/summary.json`)" in text
    assert "recall@10" in text  # the one committed source present
    for target in links(text):
        assert target.startswith("#") or (out / target).exists(), target
