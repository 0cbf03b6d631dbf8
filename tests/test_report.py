"""training/report.py on a synthetic metrics.jsonl: records read (torn last line tolerated), loss curves drawn as
real PNGs for one run and for an overlay, summary.md holding the run's numbers, config and plot."""

import json

import pytest

from training import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = {"model_type": "tiny", "hidden_size": 32, "num_hidden_layers": 2, "norm": "rmsnorm", "id2label": {}}


def synthetic_records(steps: int = 200, offset: float = 0.0) -> list[dict]:
    """Train lines every 10 steps (8,192 tokens a step), an evaluation every 50, one skipped step, samples."""
    records = []
    for step in range(10, steps + 1, 10):
        tokens = step * 8192
        loss = 6.0 - step / 100 + offset
        records.append({"step": step, "tokens": tokens, "loss": loss, "lr": 1e-3, "tokens_per_s": 6000.0 + step})
        if step == 30:
            records.append({"step": 37, "skipped": "loss spike", "loss": 50.0})
        if step % 50 == 0:
            val = 5.5 - step / 200 + offset
            metrics = {"val_loss": val, "val_perplexity": 2.718**val, "val_bits_per_byte": val / 2.5}
            records.append({"step": step, "tokens": tokens, **metrics})
            records.append({"step": step, "samples": [f"The json module at step {step}", "A list is"]})
    return records


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "demo"
    run.mkdir()
    lines = "".join(json.dumps(r) + "\n" for r in synthetic_records())
    (run / "metrics.jsonl").write_text(lines + '{"step": 201, "tok')  # a run killed mid-write
    return run


def test_read_metrics(run_dir, tmp_path):
    records = report.read_metrics(run_dir)
    assert records == synthetic_records()
    assert report.read_metrics(run_dir / "metrics.jsonl") == records
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        report.read_metrics(bad)
    with pytest.raises(FileNotFoundError):
        report.read_metrics(tmp_path / "missing")


def test_run_results(run_dir):
    results = report.run_results(report.read_metrics(run_dir))
    assert results["final_train_loss"] == pytest.approx(4.0) and results["final_train_step"] == 200
    assert results["best_val_loss"] == pytest.approx(4.5) and results["best_val_step"] == 200
    assert results["val_bits_per_byte"] == pytest.approx(4.5 / 2.5)
    assert results["tokens"] == 200 * 8192
    assert results["tokens_per_s"] == pytest.approx(6105.0)  # median of 6010 .. 6200
    assert results["skipped_steps"] == 1


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000, len(data)  # axes, two curves, markers and a legend: not an empty canvas


def test_plot_one_run_and_an_overlay(run_dir, tmp_path):
    single = report.plot_loss_curves({"demo": run_dir}, run_dir / "loss_curve.png", title="demo")
    assert single == run_dir / "loss_curve.png"
    assert_png(single)
    runs = {"baseline": run_dir, "variant": synthetic_records(offset=0.3), "raw": synthetic_records(steps=60)}
    overlay = report.plot_loss_curves(runs, tmp_path / "ablation" / "norm.png", title="norm", window=1)
    assert_png(overlay)


def test_plot_refuses_runs_without_losses(tmp_path):
    with pytest.raises(ValueError, match="no loss or val_loss"):
        report.plot_loss_curves({"empty": [{"step": 1, "lr": 0.1}]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_smoothing_is_centred():
    line = [float(i) for i in range(10)]
    assert report.smooth(line, 5) == line  # a centred average does not lag a trend
    assert report.smooth([0.0, 3.0, 0.0, 3.0, 0.0], 3) == [0.0, 1.0, 2.0, 1.0, 0.0]


def test_write_summary(run_dir):
    (run_dir / "run_config.json").write_text(json.dumps({"data": "embedded", "parameters": 39584}))
    path = report.write_summary(run_dir, CONFIG, extra={"world_size": 2, "wall_time": 125.0})
    assert path == run_dir / "summary.md"
    text = path.read_text()
    for expected in (
        "| final train loss | 4.0000 (step 200) |",
        "| best validation loss | 4.5000 (step 200) |",
        "| final validation loss | 4.5000 (step 200) |",
        f"| final validation perplexity | {2.718**4.5:.2f} |",
        "| final validation bits per byte | 1.8000 |",
        "| tokens seen | 1,638,400 |",
        "| wall time | 2 min 5 s |",
        "| tokens/s (median) | 6,105 |",
        "| skipped steps | 1 |",
        "| world size | 2 |",
        "| hidden_size | 32 |",
        "| norm | rmsnorm |",
        "| parameters | 39,584 |",
        "![loss curve](loss_curve.png)",
        "'The json module at step 200'",
    ):
        assert expected in text, expected
    assert "id2label" not in text  # only the short list of config fields
    assert_png(run_dir / "loss_curve.png")  # drawn by write_summary, since the run had none
