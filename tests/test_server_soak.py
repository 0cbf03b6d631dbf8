"""The server soak (bench/server_soak.py) at its full size on the tiny model: the real `python -m app.server` process
takes 1,000 requests (streamed and not, completions and chat, 10% of streams left after the first event, bursts
that overflow the queue) and must come out idle, with no 5xx and its memory within 10% of the warm-up value."""

import json

import pytest

from tiny_hf.cli import run_module


@pytest.mark.slow
def test_a_thousand_mixed_requests_leave_the_server_idle_without_errors_or_growth(tiny_lm_dir, tmp_path):
    argv = ["--model", str(tiny_lm_dir), "--requests", "1000", "--burst-every", "200", "--out", str(tmp_path)]
    figures = run_module("bench.server_soak", "tiny-hf bench server-soak", argv)

    failed = [name for name, ok in figures["checks"].items() if not ok]
    assert not failed, (failed, figures["statuses"], figures["burst_statuses"], figures["rss"]["growth"])
    assert figures["statuses"]["200"] == 1000 and figures["statuses"]["stream left"] >= 50, figures["statuses"]
    assert figures["burst_statuses"]["429"] > 0 and figures["load"]["bursts"] == 4, figures["burst_statuses"]
    after = figures["metrics_after"]
    assert after["running"] == 0 and after["queue_length"] == 0 and after["finished"] == after["requests"], after
    assert after["requests"] >= 1000 + 300, after  # the server really took them (the 300 warm-up included)
    assert figures["rss"]["final"] <= 1.10 * figures["rss"]["after_warmup"], figures["rss"]
    assert figures["latency_s"]["n"] > 800 and 0 < figures["latency_s"]["p50"] <= figures["latency_s"]["p99"]
    saved = json.loads((tmp_path / "server_soak.json").read_text())
    assert saved["passed"] and "latency p99" in (tmp_path / "server_soak.md").read_text()
