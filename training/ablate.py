"""Ablations: train variants that differ in one component (or one recipe piece) on the same data, tokens and seeds.

The study plan's "experiment with different normalization techniques" (and positions, MLPs, blocks), and issue 17's
training recipe, as one command. Every variant is a normal pretraining run (training/pretrain.py) with a few
overrides: `field=value` changes the model config (`--set`), `--option=value` a pretraining option (the optimizer,
the schedule), so its folder has the usual metrics, checkpoints and model. The tokenizer is trained once and shared.

    tiny-hf ablate                                   # the component studies, small budget, one seed
    tiny-hf ablate --studies recipe --model tiny-3m --batch-size 32 --max-steps 200 --seeds 0,1,2 --jobs 2

Every pretraining option can be given too (`tiny-hf pretrain --help`); it applies to every variant.

With several `--seeds` each variant reports mean +- standard deviation over the seeds, and a difference counts as
beyond noise only when it is larger than the sum of the two standard deviations (the seeds' spread). A variant whose
run folder already holds a finished run of the same options is read back, not trained again.

Writes `<out>/<name>.md` and `.json` (validation loss, bits per byte, tokens/s, parameters per variant) and one
overlaid loss-curve plot per study; `--results bench/results` puts them where the README links them.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tiny_hf.options import parse_options
from tiny_hf.results import write_results
from training import pretrain, report

WSD = ["--schedule=wsd", "--decay-fraction=0.4", "--min-lr-ratio=0"]  # warmup, flat, linear decay to zero
# study -> variant -> overrides: "field=value" sets a config field, "--option=value" a pretraining option. The first
# variant of each study is its baseline (the preset's default).
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
    # The speedrun recipe (modded-nanogpt, nanochat), each piece added alone to Muon, the study's baseline; then the
    # pieces that helped, together.
    "recipe": {
        "muon": ["--optimizer=muon"],
        "adamw": [],  # the demo's recipe: AdamW, warmup + cosine, tied embeddings, swiglu
        "+zero_init": ["--optimizer=muon", "zero_init_output=true"],
        "+untied_head": ["--optimizer=muon", "tie_word_embeddings=false"],
        "+wsd": ["--optimizer=muon", *WSD],
        "+softcap": ["--optimizer=muon", "logit_softcap=15"],
        "+qk_norm": ["--optimizer=muon", "qk_norm=true"],
        "+relu2": ["--optimizer=muon", "mlp=relu2"],
    },
}
# The studies a plain `tiny-hf ablate` runs: one component at a time, cheap enough for one seed.
DEFAULT_STUDIES = ("norm", "position", "mlp", "block")
# The pretraining options the results record as the setup of the comparison.
STUDY_SETUP_KEYS = ("data", "model", "max_steps", "batch_size", "block_size", "lr", "seed", "set")
# Options that may differ between a finished run and a new request for it without changing what it trained.
IGNORED_WHEN_REUSING = ("out", "tokenizer", "no_progress", "report_to", "cache_dir", "eval_every", "save_every")


@dataclass
class AblateOptions:
    studies: str = field(
        default=",".join(DEFAULT_STUDIES), metadata={"help": f"comma-separated, from {list(STUDIES)}"}
    )
    seeds: str | None = field(default=None, metadata={"help": "comma-separated seeds, e.g. 0,1,2 (default: --seed)"})
    variants: str | None = field(
        default=None, metadata={"help": "comma-separated: run only these variants of the studies (default: all)"}
    )
    jobs: int = field(default=1, metadata={"help": "runs trained at once, each in its own process"})
    target_loss: float | None = field(
        default=None, metadata={"help": "also report the first evaluated step at or below this validation loss"}
    )
    name: str = field(default="ablations", metadata={"help": "results file name: <name>.md and <name>.json"})
    results: Path | None = field(default=None, metadata={"help": "also copy the table and plots here"})


# Pretraining's options (all of them can be set here, the same for every variant) where this stage's budget differs;
# --out is the folder of all the variants, each run going to <out>/<study>/<variant>/seed-<seed>.
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


def chosen_seeds(spec: str | None, default: int) -> list[int]:
    if spec is None:
        return [default]
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {spec!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r} must name at least one seed, each once")
    return seeds


def variant_options(base: pretrain.PretrainOptions, overrides: list[str], **changes) -> pretrain.PretrainOptions:
    """`base` with a variant's overrides: `--option=value` replaces a pretraining option (JSON values, else strings),
    `field=value` is added to `--set`."""
    names = {f.name for f in dataclasses.fields(pretrain.PretrainOptions)}
    options, sets = dict(changes), [*base.set]
    for override in overrides:
        if not override.startswith("--"):
            sets.append(override)
            continue
        key, value = next(iter(pretrain.parse_overrides([override[2:]]).items()))
        key = key.replace("-", "_")
        if key not in names or key in ("set", "out", "seed"):
            raise ValueError(f"variant override {override!r}: {key!r} is not a pretraining option a variant may set")
        options[key] = value
    return dataclasses.replace(base, set=sets, **options)


def finished_summary(options: pretrain.PretrainOptions) -> dict | None:
    """The final figures of a finished run in `options.out` trained with these same options, else None."""
    final, config = options.out / "final-rank0.json", options.out / "run_config.json"
    if not (final.exists() and config.exists()):
        return None
    saved = json.loads(config.read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(options), default=str))
    if any(saved.get(k) != v for k, v in wanted.items() if k not in IGNORED_WHEN_REUSING):
        return None
    return json.loads(final.read_text())


def train_run(options: pretrain.PretrainOptions) -> dict:
    """One variant's run (in a worker process with --jobs): its final figures, read back if it already finished."""
    return finished_summary(options) or pretrain.train(options)


def steps_to(records: list[dict], target: float | None) -> int | None:
    """The first evaluated step whose validation loss is at or below `target` (None: never, or no target)."""
    if target is None:
        return None
    return next((r["step"] for r in report.eval_records(records) if r["val_loss"] <= target), None)


def spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def compare(a: dict, b: dict) -> dict:
    """b's bits per byte minus a's, and whether the gap is beyond noise: larger than the sum of both standard
    deviations over seeds (None when either has one seed)."""
    delta = b["val_bits_per_byte"] - a["val_bits_per_byte"]
    stds = (a["val_bits_per_byte_std"], b["val_bits_per_byte_std"])
    beyond = None if None in stds else abs(delta) > sum(stds)
    return {"delta_bits_per_byte": round(delta, 4), "beyond_noise": beyond}


def chosen_variants(studies: list[str], spec: str | None) -> dict[str, list[str]]:
    """study -> the variants to run, in the study's order: all of them, or those `spec` names."""
    if spec is None:
        return {study: list(STUDIES[study]) for study in studies}
    names = [v.strip() for v in spec.split(",") if v.strip()]
    known = {v for study in studies for v in STUDIES[study]}
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise ValueError(f"--variants {spec!r}: {unknown or 'none given'}; the studies have {sorted(known)}")
    return {study: [v for v in STUDIES[study] if v in names] for study in studies if set(STUDIES[study]) & set(names)}


def run_study(
    study: str,
    base: pretrain.PretrainOptions,
    seeds: list[int],
    jobs: int = 1,
    target_loss: float | None = None,
    variants: list[str] | None = None,
) -> dict[str, dict]:
    """Pretrain `variants` of `study` (default: all) with every seed on `base`'s budget (the first run trains the
    tokenizer the rest share), `jobs` at a time; returns each variant's figures over the seeds, and draws the study's
    overlaid loss curves (first seed)."""
    variants = variants or list(STUDIES[study])
    shared_tokenizer = base.out / "tokenizer"
    runs = {
        (variant, seed): variant_options(
            base,
            overrides,
            out=base.out / study / variant / f"seed-{seed}",
            seed=seed,
            eval_every=max(1, base.max_steps // 10),
            save_every=base.max_steps,
        )
        for variant, overrides in STUDIES[study].items()
        if variant in variants
        for seed in seeds
    }
    summaries = {}
    if not (shared_tokenizer / "tokenizer.json").exists():  # the first run alone: it trains the tokenizer
        (variant, seed), first = next(iter(runs.items()))
        print(f"== {study}: {variant}, seed {seed}")
        summaries[variant, seed] = train_run(first)
        if (first.out / "tokenizer").exists():
            (first.out / "tokenizer").rename(shared_tokenizer)  # share it from now on
    tokenizer = str(shared_tokenizer) if (shared_tokenizer / "tokenizer.json").exists() else base.tokenizer
    pending = {
        key: dataclasses.replace(options, tokenizer=tokenizer) for key, options in runs.items() if key not in summaries
    }
    for variant, seed in pending:
        print(f"== {study}: {variant}, seed {seed} ({' '.join(STUDIES[study][variant]) or 'baseline'})")
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {key: pool.submit(train_run, options) for key, options in pending.items()}
            summaries.update({key: future.result() for key, future in futures.items()})
    else:
        summaries.update({key: train_run(options) for key, options in pending.items()})

    results = {}
    for variant in variants:
        folders = [runs[variant, seed].out for seed in seeds]
        records = [report.read_metrics(folder) for folder in folders]
        loss, loss_std = spread([summaries[variant, seed]["val_loss"] for seed in seeds])
        bpb, bpb_std = spread([summaries[variant, seed]["val_bits_per_byte"] for seed in seeds])
        speeds = [r["tokens_per_s"] for run in records for r in run if "tokens_per_s" in r]
        reached = [steps_to(run, target_loss) for run in records]
        results[variant] = {
            "val_loss": round(loss, 4),
            "val_loss_std": None if loss_std is None else round(loss_std, 4),
            "val_bits_per_byte": round(bpb, 4),
            "val_bits_per_byte_std": None if bpb_std is None else round(bpb_std, 4),
            "seeds": seeds,
            "val_loss_per_seed": [round(summaries[variant, seed]["val_loss"], 4) for seed in seeds],
            "val_bits_per_byte_per_seed": [round(summaries[variant, seed]["val_bits_per_byte"], 4) for seed in seeds],
            "steps_to_target_per_seed": reached if target_loss is not None else None,
            "tokens_per_s": round(statistics.median(speeds)),
            "parameters": json.loads((folders[0] / "run_config.json").read_text())["parameters"],
            "skipped_steps": sum(summaries[variant, seed]["skipped_steps"] for seed in seeds),
            "overrides": STUDIES[study][variant],
        }
    baseline = results[variants[0]]
    for variant in variants:
        results[variant]["vs_baseline"] = compare(baseline, results[variant])
    report.plot_loss_curves(
        {variant: runs[variant, seeds[0]].out for variant in variants},
        base.out / f"ablation_{study}.png",
        title=f"{study}: {base.model}, {base.max_steps} steps x {base.batch_size} x {base.block_size} tokens, "
        f"seed {seeds[0]}",
    )
    return results


def mean_std(value: float, std: float | None) -> str:
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def delta_cell(comparison: dict | None) -> str:
    """A gap in bits per byte, in bold with a check mark when beyond noise."""
    if comparison is None:
        return ""
    text = f"{comparison['delta_bits_per_byte']:+.3f}"
    if comparison["beyond_noise"] is None:
        return text
    return f"**{text}** ✓" if comparison["beyond_noise"] else f"{text} (noise)"


def ablation_table(
    results: dict[str, dict[str, dict]], base: pretrain.PretrainOptions, seeds: list[int], target: float | None = None
) -> str:
    """The results as markdown: one table per study, the best variant (lowest bits per byte) in bold."""
    seeded = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"
    lines = [
        f"# Ablations: {base.model}, {base.max_steps} steps of {base.batch_size} x {base.block_size} tokens "
        f"on `{base.data}`, {seeded}",
        "",
        "Each study changes one component (or recipe piece) against its first row; everything else (data order, "
        "tokens, seeds) is the same. Lower validation loss and bits per byte are better.",
    ]
    if len(seeds) > 1:
        lines += [
            "",
            f"Figures are mean ± standard deviation over the {len(seeds)} seeds (each seed changes the initial "
            "weights and the data order). A gap in bits per byte is marked ✓ (beyond noise) only when it is larger "
            "than the sum of the two variants' standard deviations; else (noise).",
        ]
    else:
        lines += ["", "One seed: differences under ~0.05 are noise (`--seeds 0,1,2` measures the spread)."]
    for study, variants in results.items():
        best = min(variants, key=lambda v: variants[v]["val_bits_per_byte"])
        header = ["variant", "val loss", "bits/byte", f"Δ bits/byte vs {next(iter(variants))}"]
        header += [f"steps to {target}"] if target is not None else []
        header += ["tokens/s", "parameters"]
        lines += ["", f"## {study}", "", f"![{study}](ablation_{study}.png)", ""]
        lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for i, (variant, r) in enumerate(variants.items()):
            name = f"**{variant}**" if variant == best else variant
            cells = [
                name,
                mean_std(r["val_loss"], r["val_loss_std"]),
                mean_std(r["val_bits_per_byte"], r["val_bits_per_byte_std"]),
                delta_cell(r["vs_baseline"] if i > 0 else None),
            ]
            if target is not None:
                cells.append(", ".join("-" if s is None else str(s) for s in r["steps_to_target_per_seed"]))
            cells += [f"{r['tokens_per_s']:,}", f"{r['parameters'] / 1e6:.2f}M"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Overrides (`field=value`: config, `--option=value`: pretraining):", ""]
        lines += [f"- {variant}: `{' '.join(r['overrides']) or 'none'}`" for variant, r in variants.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    options, base = parse_options(
        AblateOptions, pretrain.PretrainOptions, argv=argv, description=__doc__, defaults=PRETRAIN_DEFAULTS
    )
    if options.jobs < 1:
        raise ValueError(f"--jobs={options.jobs} must be at least 1")
    studies, seeds = chosen_studies(options.studies), chosen_seeds(options.seeds, base.seed)
    plan = chosen_variants(studies, options.variants)
    results = {
        study: run_study(study, base, seeds, options.jobs, options.target_loss, variants)
        for study, variants in plan.items()
    }
    table = ablation_table(results, base, seeds, options.target_loss)
    (base.out / f"{options.name}.md").write_text(table)
    setup = {k: str(v) for k, v in dataclasses.asdict(base).items() if k in STUDY_SETUP_KEYS}
    setup |= {"studies": options.studies, "seeds": seeds, "target_loss": options.target_loss}
    figures = {"setup": setup, "results": results}
    (base.out / f"{options.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    if options.results is not None:
        write_results(options.name, figures, table, options.results)
        for study in results:
            (options.results / f"ablation_{study}.png").write_bytes((base.out / f"ablation_{study}.png").read_bytes())
    print(table)
    return figures


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
