"""Component ablations: train variants that differ in one component on the same data, tokens and seed.

The study plan's "experiment with different normalization techniques" (and positions, MLPs, blocks), as one
command. Every variant is a normal pretraining run (training/pretrain.py) with one `--set field=value` changed, so
its folder has the usual metrics, checkpoints and model. The tokenizer is trained once and shared.

    python training/ablate.py                                   # all studies, small budget
    python training/ablate.py --studies norm,block --max-steps 400 --model tiny-3m

Writes `<out>/ablations.md` and `.json` (final validation loss, bits per byte, tokens/s, parameters per variant) and
one overlaid loss-curve plot per study; `--results bench/results` puts them where the README links them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from training import pretrain, report

# study -> variant -> config overrides. The first variant of each study is its baseline (the preset's default).
STUDIES: dict[str, dict[str, list[str]]] = {
    "norm": {"rmsnorm": ["norm=rmsnorm"], "layernorm": ["norm=layernorm"], "rmsnorm+qk_norm": ["qk_norm=true"]},
    "position": {
        "rope": ["position_embedding=rope"],
        "learned": ["position_embedding=learned"],
        "sinusoidal": ["position_embedding=sinusoidal"],
        "alibi": ["position_embedding=alibi"],
        "none": ["position_embedding=none"],
    },
    "mlp": {"swiglu": ["mlp=swiglu"], "gelu": ["mlp=gelu"], "relu2": ["mlp=relu2"], "geglu": ["mlp=geglu"]},
    "block": {"pre_norm": ["block=pre_norm"], "post_norm": ["block=post_norm"], "parallel": ["block=parallel"]},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to compare")
    what.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, from {list(STUDIES)}")
    what.add_argument("--model", default="tiny-1m", help="the preset every variant starts from")
    budget = parser.add_argument_group("budget (the same for every variant)")
    budget.add_argument("--data", default="embedded")
    budget.add_argument("--max-steps", type=int, default=150)
    budget.add_argument("--batch-size", type=int, default=16)
    budget.add_argument("--block-size", type=int, default=128)
    budget.add_argument("--lr", type=float, default=3e-3)
    budget.add_argument("--seed", type=int, default=0)
    budget.add_argument("--cache-dir", type=Path, default=Path("data"))
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/ablate"))
    out.add_argument("--results", type=Path, default=None, help="also copy the table and plots here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise ValueError(f"--studies {args.studies!r}: {unknown or 'none given'}; choose from {sorted(STUDIES)}")
    common = [
        "--data",
        args.data,
        "--model",
        args.model,
        "--max-steps",
        str(args.max_steps),
        "--batch-size",
        str(args.batch_size),
        "--block-size",
        str(args.block_size),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--cache-dir",
        str(args.cache_dir),
        "--eval-every",
        str(max(1, args.max_steps // 5)),
        "--save-every",
        str(args.max_steps),
        "--keep-last",
        "1",
        "--sample-tokens",
        "20",
        "--no-progress",
    ]
    tokenizer = args.out / "tokenizer"
    results: dict[str, dict[str, dict]] = {}
    for study in studies:
        results[study] = {}
        for variant, overrides in STUDIES[study].items():
            run = args.out / study / variant
            argv = [*common, "--out", str(run)] + [x for kv in overrides for x in ("--set", kv)]
            if (tokenizer / "tokenizer.json").exists():
                argv += ["--tokenizer", str(tokenizer)]
            print(f"== {study}: {variant} ({' '.join(overrides)})")
            summary = pretrain.main(argv)
            if not (tokenizer / "tokenizer.json").exists():  # the first run trained it: share it from now on
                (run / "tokenizer").rename(tokenizer)
            records = report.read_metrics(run)
            config = json.loads((run / "run_config.json").read_text())
            results[study][variant] = {
                "val_loss": round(summary["val_loss"], 4),
                "val_bits_per_byte": round(summary["val_bits_per_byte"], 4),
                "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r)),
                "parameters": config["parameters"],
                "skipped_steps": summary["skipped_steps"],
            }
        report.plot_loss_curves(
            {variant: args.out / study / variant for variant in STUDIES[study]},
            args.out / f"ablation_{study}.png",
            title=f"{study}: {args.model}, {args.max_steps} steps x {args.batch_size} x {args.block_size} tokens",
        )

    lines = [
        f"# Component ablations: {args.model}, {args.max_steps} steps of {args.batch_size} x {args.block_size} tokens "
        f"on `{args.data}`, seed {args.seed}",
        "",
        "Each study changes one component of the preset; everything else (data order, tokens, seed, optimizer) is "
        "the same. Lower validation loss and bits per byte are better.",
    ]
    for study, variants in results.items():
        best = min(variants, key=lambda v: variants[v]["val_loss"])
        lines += ["", f"## {study}", "", f"![{study}](ablation_{study}.png)", ""]
        lines += ["| variant | val loss | bits/byte | tokens/s | parameters |", "|---|---:|---:|---:|---:|"]
        for variant, r in variants.items():
            name = f"**{variant}**" if variant == best else variant
            lines.append(
                f"| {name} | {r['val_loss']:.3f} | {r['val_bits_per_byte']:.3f} | {r['tokens_per_s']:,} | "
                f"{r['parameters'] / 1e6:.2f}M |"
            )
    table = "\n".join(lines) + "\n"
    (args.out / "ablations.md").write_text(table)
    figures = {"setup": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.out / "ablations.json").write_text(json.dumps(figures, indent=2) + "\n")
    if args.results is not None:
        from tiny_hf.results import write_results

        write_results("ablations", figures, table, args.results)
        for study in results:
            (args.results / f"ablation_{study}.png").write_bytes((args.out / f"ablation_{study}.png").read_bytes())
    print(table)
    return figures


if __name__ == "__main__":
    main()
