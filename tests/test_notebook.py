"""notebooks/quickstart.ipynb runs top to bottom on a tiny run, so the walkthrough never goes stale."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def outputs(notebook) -> str:
    """Everything the code cells printed, as one string."""
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


@pytest.mark.slow
def test_quickstart_runs_on_a_tiny_run(tiny_run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_HF_RUN", str(tiny_run_dir))
    monkeypatch.setenv("TINY_HF_STEPS", "3")
    monkeypatch.setenv("TINY_HF_CHAT_RUN", str(tmp_path / "no-chat-run"))  # chat with the tiny run's own model
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel is this interpreter (ipykernel's own spec), started in the repository root, as `make` would.
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    printed = outputs(notebook)
    for expected in (
        "TinyForCausalLM",
        "TinyTokenizerFast",
        "trainable params",
        "held-out README after 3 steps",
        "int8 per row",
        f"chatting with {tiny_run_dir / 'model'}",
        "assistant:",
    ):
        assert expected in printed, expected


def test_committed_notebook_is_small_and_executed():
    """The committed copy shows its outputs (run on runs/demo), and they stay small enough to read in a diff."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), "execute the notebook before committing it"
    assert not [o for cell in code for o in cell.outputs if o.get("output_type") == "error"]
    assert NOTEBOOK.stat().st_size < 100_000
