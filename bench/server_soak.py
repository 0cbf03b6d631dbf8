"""Server soak: the real `python -m app.server` process under a long mixed load on loopback, then checked for leaks.

After `--warmup` requests (the process's resident memory, RSS, is measured then), `--requests` requests go out,
`--concurrency` at a time: completions and chat, half of them streamed, `--disconnect` of the clients leaving a stream
after its first event, a 429 retried after a pause (as the openai client does). Every `--burst-every` requests a
burst of `--burst` extra requests at once (not retried) overflows the queue: 429 expected. Afterwards the server
must be idle (0 running, queue empty, every request it took finished or aborted) with RSS within
`--max-rss-growth` of its warm-up value, and no response may be a 5xx.

    tiny-hf bench server-soak --model runs/demo                  # after `make demo`
    tiny-hf bench server-soak --model runs/demo --requests 2000

It writes p50/p99 latency and time to first token, the responses by status and the RSS curve to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tiny_hf.corpus import topic_documents
from tiny_hf.results import RESULTS_DIR, percentiles, write_results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--model", default="runs/demo", help="a run or model folder (default: make demo's run)")
    server.add_argument("--max-batch-size", type=int, default=8, help="the server's cache slots")
    server.add_argument("--max-queue", type=int, default=16, help="the server's waiting requests at most")
    server.add_argument("--threads", type=int, default=1, help="the server's torch threads (OMP_NUM_THREADS)")
    load = parser.add_argument_group("load")
    load.add_argument("--requests", type=int, default=1000)
    load.add_argument("--warmup", type=int, default=300, help="requests before the RSS baseline (caches fill)")
    load.add_argument("--concurrency", type=int, default=16, help="clients at a time (bursts aside)")
    load.add_argument("--disconnect", type=float, default=0.1, help="share of clients leaving a stream early")
    load.add_argument("--burst-every", type=int, default=200)
    load.add_argument("--burst", type=int, default=48, help="extra requests sent at once in a burst")
    load.add_argument("--max-tokens", default="8,48", help="new tokens per request: a range LOW,HIGH")
    load.add_argument("--seed", type=int, default=0)
    check = parser.add_argument_group("checks")
    check.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth after warm-up")
    check.add_argument("--settle", type=float, default=30.0, help="seconds the server gets to become idle")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=RESULTS_DIR)
    out.add_argument("--name", default="server_soak")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# The server process
# ---------------------------------------------------------------------------------------------------------------------
def start_server(args, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "app.server", "--model", args.model, "--port", str(port)]
    command += ["--served-model-name", "soak"]
    command += ["--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue)]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the server did not answer /health in 120 s:\n{log.read_text()[-2000:]}")


def read_metrics(url: str) -> dict[str, float]:
    """/metrics as {name: value} (unlabelled samples; `tiny_hf_` and a counter's `_total` left off)."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    samples = (sample for family in families for sample in family.samples if not sample.labels)
    return {s.name.removeprefix("tiny_hf_").removesuffix("_total"): s.value for s in samples}


def settle(url: str, seconds: float) -> tuple[dict[str, float], float]:
    """Wait until the server is idle and every request it took has finished; the metrics then and the wait."""
    start = time.monotonic()
    while True:
        metrics = read_metrics(url)
        idle = metrics["running"] == 0 and metrics["queue_length"] == 0 and metrics["finished"] == metrics["requests"]
        if idle or time.monotonic() - start > seconds:
            return metrics, time.monotonic() - start
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------------------------
# The clients
# ---------------------------------------------------------------------------------------------------------------------
def make_jobs(n: int, args, rng: random.Random) -> list[dict]:
    """n requests: completion or chat, streamed or not, some streams left after their first event."""
    words = " ".join(d["text"] for d in topic_documents()[:20]).split()
    low, high = (int(x) for x in args.max_tokens.split(","))
    jobs = []
    for _ in range(n):
        start = rng.randrange(len(words) - 64)
        prompt = " ".join(words[start : start + rng.randint(2, 24)])
        leave = rng.random() < args.disconnect
        jobs.append(
            {
                "chat": rng.random() < 0.5,
                "stream": leave or rng.random() < 0.5,
                "leave": leave,
                "prompt": prompt,
                "max_tokens": rng.randint(low, high),
                "temperature": rng.choice([0.0, 0.8]),
            }
        )
    return jobs


def request_body(job: dict) -> tuple[str, dict]:
    body = {"model": "soak", "max_tokens": job["max_tokens"], "temperature": job["temperature"], "ignore_eos": True}
    body["stream"] = job["stream"]
    if job["chat"]:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": job["prompt"]}]}
    return "/v1/completions", {**body, "prompt": job["prompt"]}


async def send(client: httpx.AsyncClient, job: dict) -> dict:
    """One request; what happened: status, latency, time to first event, and whether the stream ended properly."""
    path, body = request_body(job)
    start = time.perf_counter()
    result = {"kind": "chat" if job["chat"] else "completion", "stream": job["stream"], "ttft": None, "error": None}
    try:
        async with client.stream("POST", path, json=body) as response:
            result["status"] = response.status_code
            if response.status_code != 200 or not job["stream"]:
                payload = json.loads(await response.aread())
                result["error"] = payload.get("error")
            else:
                result["outcome"] = await read_stream(response, job["leave"], start, result)
    except httpx.TransportError as error:
        result["status"], result["error"] = "transport", repr(error)
    result["latency"] = time.perf_counter() - start
    return result


async def read_stream(response: httpx.Response, leave: bool, start: float, result: dict) -> str:
    """Read server-sent events up to `[DONE]` (or leave after the first): 'done', 'left' or 'cut' (no `[DONE]`)."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if result["ttft"] is None:
            result["ttft"] = time.perf_counter() - start
            if leave:
                return "left"  # closing the response here drops the connection mid-stream
        if line == "data: [DONE]":
            return "done"
    return "cut"


async def run_load(url: str, jobs: list[dict], args, sample_rss) -> tuple[list[dict], list[dict]]:
    """The jobs, --concurrency at a time, plus a burst of --burst at once every --burst-every; (jobs', bursts')."""
    limits = httpx.Limits(max_connections=args.concurrency + args.burst + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(args.concurrency)
        rng = random.Random(args.seed + 1)

        async def gated(job):
            """A patient client: a 429 is retried after a pause (as the openai client does), the others are not."""
            async with gate:
                for retry in range(20):
                    result = await send(client, job)
                    if result["status"] != 429:
                        return {**result, "retries_after_429": retry}
                    await asyncio.sleep(0.1 * (retry + 1))
                return {**result, "retries_after_429": retry}

        tasks, bursts = [], []
        for i, job in enumerate(jobs):
            if i and args.burst_every and i % args.burst_every == 0:
                burst = make_jobs(args.burst, args, rng)
                bursts += [asyncio.create_task(send(client, {**b, "stream": False, "leave": False})) for b in burst]
                sample_rss()
            if i % 50 == 0:
                sample_rss()
            while gate.locked():
                await asyncio.sleep(0.005)
            tasks.append(asyncio.create_task(gated(job)))
            await asyncio.sleep(0)
        return list(await asyncio.gather(*tasks)), list(await asyncio.gather(*bursts))


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------
def status_counts(results: list[dict]) -> dict[str, int]:
    counts = Counter(str(r["status"]) for r in results)
    counts.update(f"stream {r['outcome']}" for r in results if r.get("outcome"))
    return dict(sorted(counts.items()))


def summarise(main: list[dict], bursts: list[dict], rss: dict, metrics: dict, settle_s: float, args) -> dict:
    everything = main + bursts
    completed = [r for r in main if r["status"] == 200 and r.get("outcome") in (None, "done")]
    rejected = [r for r in everything if r["status"] == 429]
    checks = {
        "no_5xx": not any(isinstance(r["status"], int) and r["status"] >= 500 for r in everything),
        "answered_200_or_429": all(r["status"] in (200, 429) for r in everything),
        "no_transport_errors": not any(r["status"] == "transport" for r in everything),
        "streams_end_with_done": not any(r.get("outcome") == "cut" for r in everything),
        "bursts_got_429": bool(rejected),
        "429s_have_the_openai_body": all((r["error"] or {}).get("type") == "rate_limit_error" for r in rejected),
        "idle_afterwards": metrics["running"] == 0 and metrics["queue_length"] == 0,
        "every_request_finished": metrics["finished"] == metrics["requests"],
        "rss_within_limit": rss["growth"] <= args.max_rss_growth,
    }
    return {
        "model": args.model,
        "server": {"max_batch_size": args.max_batch_size, "max_queue": args.max_queue, "threads": args.threads},
        "load": {
            "requests": len(main),
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "disconnect": args.disconnect,
            "bursts": len(bursts) // max(args.burst, 1),
            "burst_size": args.burst,
        },
        "statuses": status_counts(main),
        "retries_after_429": sum(r["retries_after_429"] for r in main),
        "burst_statuses": status_counts(bursts),
        "latency_s": percentiles([r["latency"] for r in completed]),
        "ttft_s": percentiles([r["ttft"] for r in main if r["ttft"] is not None]),
        "latency_by_kind_s": {
            f"{kind}{' stream' if stream else ''}": percentiles(
                [r["latency"] for r in completed if r["kind"] == kind and r["stream"] == stream]
            )
            for kind in ("completion", "chat")
            for stream in (False, True)
        },
        "rss": rss,
        "metrics_after": metrics,
        "settle_s": settle_s,
        "checks": checks,
        "passed": all(checks.values()),
    }


def table(figures: dict) -> str:
    load, rss, lat, ttft = figures["load"], figures["rss"], figures["latency_s"], figures["ttft_s"]
    ms = lambda s: f"{s * 1000:,.0f} ms"  # noqa: E731
    rows = [
        f"| {kind} | {p['n']} | {ms(p['p50'])} | {ms(p['p99'])} |" for kind, p in figures["latency_by_kind_s"].items()
    ]
    statuses = ", ".join(f"{k}: {v}" for k, v in figures["statuses"].items())
    bursts = ", ".join(f"{k}: {v}" for k, v in figures["burst_statuses"].items())
    checks = ", ".join(f"{k} {'yes' if v else '**NO**'}" for k, v in figures["checks"].items())
    return (
        f"Server soak, {figures['model']}: {load['requests']} requests after {load['warmup']} warm-up, "
        f"{load['concurrency']} clients at a time, {load['disconnect']:.0%} leaving their stream after the first "
        f"event, {load['bursts']} bursts of {load['burst_size']} extra requests; server with "
        f"{figures['server']['max_batch_size']} slots, queue {figures['server']['max_queue']}.\n\n"
        f"| requests run to the end | n | latency p50 | latency p99 |\n|---|---:|---:|---:|\n"
        + "\n".join(rows)
        + f"\n| all | {lat['n']} | {ms(lat['p50'])} | {ms(lat['p99'])} |\n\n"
        f"Time to first event (streams): p50 {ms(ttft['p50'])}, p99 {ms(ttft['p99'])} (n={ttft['n']}).\n\n"
        f"Responses: {statuses} (after {figures['retries_after_429']} retries of a 429). Bursts (not retried): "
        f"{bursts}.\n\n"
        f"Resident memory: {rss['after_warmup'] / 2**20:,.0f} MiB after warm-up, peak {rss['peak'] / 2**20:,.0f} "
        f"MiB, {rss['final'] / 2**20:,.0f} MiB at the end ({rss['growth']:+.1%}; "
        f"{rss['growth_second_half']:+.1%} over the second half of the load); idle again "
        f"{figures['settle_s']:.1f} s after the last response.\n\nChecks: {checks}.\n"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        server, url = start_server(args, log)
        try:
            process = psutil.Process(server.pid)
            samples: list[tuple[float, int]] = []
            started = time.perf_counter()

            def sample_rss():
                samples.append((time.perf_counter() - started, process.memory_info().rss))

            asyncio.run(run_load(url, make_jobs(args.warmup, args, rng), args, sample_rss))
            settle(url, args.settle)
            sample_rss()
            after_warmup, first_main_sample = samples[-1][1], len(samples)
            main_results, burst_results = asyncio.run(
                run_load(url, make_jobs(args.requests, args, rng), args, sample_rss)
            )
            metrics, settle_s = settle(url, args.settle)
            sample_rss()
        finally:
            server.terminate()
            server.wait(timeout=60)
        server_log = log.read_text()
    final = samples[-1][1]
    rss = {
        "after_warmup": after_warmup,
        "peak": max(r for _, r in samples),
        "final": final,
        "growth": final / after_warmup - 1,
        # the second half of the load alone: a leak keeps growing there, caches that fill do not
        "growth_second_half": final / samples[(first_main_sample + len(samples)) // 2][1] - 1,
        "samples": [[round(t, 2), r] for t, r in samples],
    }
    figures = summarise(main_results, burst_results, rss, metrics, settle_s, args)
    figures["server_tracebacks"] = server_log.count("Traceback")
    figures["checks"]["no_server_tracebacks"] = figures["server_tracebacks"] == 0
    figures["passed"] = all(figures["checks"].values())
    write_results(args.name, figures, table(figures), args.out)
    print(table(figures))
    return figures


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
