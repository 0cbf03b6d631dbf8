"""Benchmarks: ours and a peer side by side in one process; each script writes bench/results/<name>.json and .md."""
