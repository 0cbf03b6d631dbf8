"""Component ablations: train variants that differ in one component on the same data, tokens and seed.

The study plan's "experiment with different normalization techniques" (and positions, MLPs, blocks), as one
command. Every variant is a normal pretraining run (training/pretrain.py) with one `--set field=value` changed, so
its folder has the usual metrics, checkpoints and model. The tokenizer is trained once and shared.

    tiny-hf ablate                                   # all studies, small budget
    tiny-hf ablate --studies norm,block --max-steps 400 --model tiny-3m

Every pretraining option can be given too (`tiny-hf pretrain --help`); it applies to every variant.

Writes `<out>/ablations.md` and `.json` (final validation loss, bits per byte, tokens/s, parameters per variant) and
one overlaid loss-curve plot per study; `--results bench/results` puts them where the README links them.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tiny_hf.options import parse_options
from tiny_hf.results import write_results
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
# The pretraining options ablations.json records as the setup of the comparison.
STUDY_SETUP_KEYS = ("data", "model", "max_steps", "batch_size", "block_size", "lr", "seed", "set")


@dataclass
class AblateOptions:
    studies: str = field(default=",".join(STUDIES), metadata={"help": f"comma-separated, from {list(STUDIES)}"})
    results: Path | None = field(default=None, metadata={"help": "also copy the table and plots here"})


# Pretraining's options (all of them can be set here, the same for every variant) where this stage's budget differs;
# --out is the folder of all the variants, each run going to <out>/<study>/<variant>.
PRETRAIN_DEFAULTS = {
    "model": "tiny-1m",
    "max_steps": 150,
    "block_size": 128,
    "out": Path("runs/ablate"),
    "keep_last": 1,
    "sample_tokens": 20,
    "no_progress": True,
}


def chosen_studies(spec: str) -> list[str]:
    studies = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise ValueError(f"--studies {spec!r}: {unknown or 'none given'}; choose from {sorted(STUDIES)}")
    return studies


def run_study(study: str, base: pretrain.PretrainOptions) -> dict[str, dict]:
    """Pretrain every variant of `study` on `base`'s budget (the first run trains the tokenizer the rest share);
    returns each variant's final figures, and draws the study's overlaid loss curves."""
    shared_tokenizer, results = base.out / "tokenizer", {}
    for variant, overrides in STUDIES[study].items():
        run = base.out / study / variant
        options = dataclasses.replace(
            base,
            out=run,
            set=[*base.set, *overrides],
            tokenizer=str(shared_tokenizer) if (shared_tokenizer / "tokenizer.json").exists() else base.tokenizer,
            eval_every=max(1, base.max_steps // 5),
            save_every=base.max_steps,
        )
        print(f"== {study}: {variant} ({' '.join(overrides)})")
        summary = pretrain.train(options)
        if not (shared_tokenizer / "tokenizer.json").exists() and (run / "tokenizer").exists():
            (run / "tokenizer").rename(shared_tokenizer)  # the first run trained it: share it from now on
        records = report.read_metrics(run)
        results[variant] = {
            "val_loss": round(summary["val_loss"], 4),
            "val_bits_per_byte": round(summary["val_bits_per_byte"], 4),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r)),
            "parameters": json.loads((run / "run_config.json").read_text())["parameters"],
            "skipped_steps": summary["skipped_steps"],
        }
    report.plot_loss_curves(
        {variant: base.out / study / variant for variant in STUDIES[study]},
        base.out / f"ablation_{study}.png",
        title=f"{study}: {base.model}, {base.max_steps} steps x {base.batch_size} x {base.block_size} tokens",
    )
    return results


def ablation_table(results: dict[str, dict[str, dict]], base: pretrain.PretrainOptions) -> str:
    """ablations.md: one table per study, the best variant (lowest validation loss) in bold."""
    lines = [
        f"# Component ablations: {base.model}, {base.max_steps} steps of {base.batch_size} x {base.block_size} tokens "
        f"on `{base.data}`, seed {base.seed}",
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    options, base = parse_options(
        AblateOptions, pretrain.PretrainOptions, argv=argv, description=__doc__, defaults=PRETRAIN_DEFAULTS
    )
    results = {study: run_study(study, base) for study in chosen_studies(options.studies)}
    table = ablation_table(results, base)
    (base.out / "ablations.md").write_text(table)
    setup = {k: str(v) for k, v in dataclasses.asdict(base).items() if k in STUDY_SETUP_KEYS}
    figures = {"setup": {"studies": options.studies, **setup}, "results": results}
    (base.out / "ablations.json").write_text(json.dumps(figures, indent=2) + "\n")
    if options.results is not None:
        write_results("ablations", figures, table, options.results)
        for study in results:
            (options.results / f"ablation_{study}.png").write_bytes((base.out / f"ablation_{study}.png").read_bytes())
    print(table)
    return figures


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
