"""Pretrain a tiny_hf model: `tiny-hf pretrain` on one process, `accelerate launch training/pretrain.py` on several.

What happens, top to bottom:
1. Data: documents from the embedded corpus, local files or Hub datasets, tokenized once into token shards on disk
   (training/shards.py; folders written by `tiny-hf data` are read as they are) with EOS between documents, and
   read back memory-mapped as fixed-length blocks, the sources mixed by weight. A tokenizer is trained first if none
   is given (or the shards' own is taken).
2. Model: a preset (optionally with `--set field=value` overrides) or a saved model to continue from.
3. Loop: AdamW (weight decay on matrices only), or Muon on the hidden matrices with AdamW on the rest
   (training/optimizers.py), warmup + cosine or WSD schedule, gradient accumulation and
   clipping, optional z-loss, a guard that skips steps whose loss is NaN/inf or spikes, a sequence-length
   curriculum. Evaluation every N steps: validation loss, perplexity and bits per byte through a local `evaluate`
   metric, plus generated samples.
4. Output: `--out` gets metrics.jsonl, the trackers' logs (`--report-to`, training/trackers.py: TensorBoard in tb/
   by default, trackio, wandb), checkpoints (checkpoints/step-N, written atomically, the last K kept), and at the
   end the exported model (model/), loss_curve.png and summary.md.

An interrupted run continues with `--resume`: model, optimizer, scheduler, RNG and data position come back, so on
one CPU process the resumed run's losses equal the uninterrupted run's step for step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import accelerate
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf  # registers the Auto classes
from tiny_hf import TinyConfig, TinyForCausalLM
from tiny_hf.bpe import train_tokenizer
from tiny_hf.configuration_tiny import unknown_preset
from tiny_hf.options import parse_options
from tiny_hf.runs import model_path
from tiny_hf.system import keep_freed_memory
from training import report
from training.batches import global_batch_indices
from training.checkpoint import (
    RunLock,
    StopRequest,
    load_optimizer,
    load_rng,
    load_torch,
    load_weights,
    optimizer_file,
    read_state,
    resume_point,
    save_rng,
    save_torch,
    write_checkpoint,
)
from training.data import SequenceLengthSchedule, token_byte_lengths, training_texts
from training.evaluation import loss_sums, metrics_from_sums
from training.model_card import write_model_card
from training.optimizers import OPTIMIZERS, build_optimizer
from training.run_log import RunLog, write_run_config
from training.shards import PackedBlocks, open_split, prepared_sources, shard_tokenizer
from training.trackers import check_report_to

SAMPLE_PROMPTS = ["The json module", "A list is", "To open a file"]


@dataclass
class PretrainOptions:
    # --- data ---
    data: str = field(
        default="embedded", metadata={"help": "sources with weights: 'embedded', 'notes/:0.3,embedded:0.7'"}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder or Hub id (default: the model's, or train one)"}
    )
    vocab_size: int = field(default=8192, metadata={"help": "when a tokenizer is trained here"})
    block_size: int = field(default=256, metadata={"help": "tokens per packed block (the longest length)"})
    seq_len_schedule: str | None = field(
        default=None, metadata={"help": "curriculum, e.g. '64:0.3,128:0.3,256' (default: block)"}
    )
    val_fraction: float = 0.05
    cache_dir: Path = Path("data")
    # --- model ---
    model: str = field(default="tiny-3m", metadata={"help": "a preset name, a saved model folder or a Hub id"})
    set: list[str] = field(
        default_factory=list,
        metadata={"help": "config override of a preset; repeatable", "metavar": "FIELD=VALUE", "action": "extend"},
    )
    # --- optimization ---
    optimizer: str = field(default="adamw", metadata={"choices": list(OPTIMIZERS)})
    max_steps: int = 300
    lr_decay_steps: int | None = field(default=None, metadata={"help": "schedule length (default: --max-steps)"})
    batch_size: int = field(default=16, metadata={"help": "blocks per micro-batch per process"})
    grad_accum: int = 1
    lr: float = field(default=3e-3, metadata={"help": "AdamW's learning rate (with muon: embeddings, head, norms)"})
    muon_lr: float | None = field(default=None, metadata={"help": "muon: the hidden matrices' learning rate (0.02)"})
    muon_momentum: float | None = field(default=None, metadata={"help": "muon: momentum (0.95)"})
    embedding_lr: float | None = field(default=None, metadata={"help": "AdamW's rate for embeddings (default: --lr)"})
    head_lr: float | None = field(default=None, metadata={"help": "AdamW's rate for an untied head (default: --lr)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of --lr"})
    schedule: str = field(default="cosine", metadata={"choices": ["cosine", "wsd", "constant"]})
    warmup_steps: int = 30
    decay_fraction: float = field(default=0.2, metadata={"help": "WSD: share of steps spent decaying"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    z_loss: float = field(default=0.0, metadata={"help": "coefficient of log(Z)^2 (PaLM uses 1e-4)"})
    # --- stability ---
    spike_factor: float = field(default=3.0, metadata={"help": "skip a step whose loss > factor x recent mean"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many skipped steps in a row"})
    # --- evaluation and logging ---
    eval_every: int = 100
    eval_blocks: int = field(default=64, metadata={"help": "validation blocks per evaluation (0 = all)"})
    sample_tokens: int = field(default=40, metadata={"help": "tokens per sample at each evaluation"})
    log_every: int = 10
    report_to: str = field(
        default="tensorboard", metadata={"help": "trackers: tensorboard, trackio, wandb or none (comma-separated)"}
    )
    no_progress: bool = False
    # --- checkpoints ---
    out: Path = Path("runs/pretrain")
    save_every: int = 100
    keep_last: int = 2
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out"})
    # --- system ---
    seed: int = 0
    mixed_precision: str | None = field(
        default=None, metadata={"help": "default: bf16 on GPU", "choices": ["no", "bf16", "fp16"]}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    cpu: bool = field(default=False, metadata={"help": "train on CPU even when a GPU is present"})


# --- model, tokenizer, optimizer -------------------------------------------------------------------------------------
def parse_overrides(pairs: list[str]) -> dict:
    """['norm=layernorm', 'num_hidden_layers=6', 'qk_norm=true'] -> typed dict (JSON values, else strings)."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r} is not FIELD=VALUE")
        key, value = pair.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def saved_model(name: str) -> str | None:
    """None for a preset; else where the saved model to continue from loads (`model_path`: a run folder, a model
    folder or a Hub id). A bare name that is neither a preset nor a folder is a preset typo, not a Hub id."""
    if name in tiny_hf.PRESETS:
        return None
    if "/" not in name and not Path(name).expanduser().exists():
        raise ValueError(f"--model: {unknown_preset(name)}, or a model folder or Hub id (namespace/name)")
    return model_path("--model", name)


def build_tokenizer(options: PretrainOptions, accelerator: Accelerator):
    """The tokenizer named by --tokenizer, else the saved model's, else the token shards', else one trained on the
    training split."""
    source = options.tokenizer or saved_model(options.model) or shard_tokenizer(options.data)
    if source is not None:
        return AutoTokenizer.from_pretrained(source)
    tokenizer_dir = options.out / "tokenizer"
    with accelerator.main_process_first():  # rank 0 trains and saves; the others then load the same files
        if not (tokenizer_dir / "tokenizer.json").exists():
            texts = training_texts(options.data, options.val_fraction, options.cache_dir)
            accelerator.print(f"training a {options.vocab_size}-token BPE tokenizer on {len(texts)} documents")
            train_tokenizer(texts, vocab_size=options.vocab_size).save_pretrained(tokenizer_dir)
        return AutoTokenizer.from_pretrained(tokenizer_dir)


def build_model(options: PretrainOptions, tokenizer) -> TinyForCausalLM:
    source = saved_model(options.model)
    if source is not None:
        if options.set:
            raise ValueError("--set only applies to presets; a saved model keeps its architecture")
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = TinyConfig.from_preset(
        options.model,
        **{
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "max_position_embeddings": max(
                options.block_size, TinyConfig.from_preset(options.model).max_position_embeddings
            ),
            **parse_overrides(options.set),
        },
    )
    return TinyForCausalLM(config)


def check_inputs(options: PretrainOptions, model, tokenizer, schedule: SequenceLengthSchedule) -> None:
    """Everything that would otherwise fail minutes into a run, checked before the first step."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}: "
            "ids past the embedding table would crash training; use the model's own tokenizer or a new model"
        )
    if schedule.max_length != options.block_size:
        raise ValueError(f"--seq-len-schedule's longest length {schedule.max_length} must equal --block-size")
    schedule.check_positions(model.config)


MUON_DEFAULTS = {"muon_lr": 0.02, "muon_momentum": 0.95}  # Keller Jordan's Muon as modded-nanogpt runs it


def check_options(options: PretrainOptions) -> None:
    """Options that cannot work, checked before any data is read: a count below one, an option of the optimizer
    not chosen."""
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "keep_last"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(options, name)} must be at least 1")
    if options.optimizer != "muon":
        for name in MUON_DEFAULTS:
            if getattr(options, name) is not None:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} applies to --optimizer muon only, not --optimizer {options.optimizer}")


def make_optimizer(model: torch.nn.Module, options: PretrainOptions, sharded: bool = False) -> torch.optim.Optimizer:
    """The optimizer --optimizer names (training/optimizers.py), with the run's learning rates and decay; `sharded`:
    the parameters will be FSDP shards."""
    muon = {
        name: default if getattr(options, name) is None else getattr(options, name)
        for name, default in MUON_DEFAULTS.items()
    }
    return build_optimizer(
        model,
        options.optimizer,
        lr=options.lr,
        weight_decay=options.weight_decay,
        betas=(options.beta1, options.beta2),
        embedding_lr=options.embedding_lr,
        head_lr=options.head_lr,
        sharded=sharded,
        **muon,
    )


def lr_lambda(options: PretrainOptions):
    """Multiplier of --lr at each step: linear warmup, then cosine to min_lr_ratio (Loshchilov & Hutter 2017), or
    WSD (warmup-stable-decay, Hu et al. 2024: flat, then a linear decay over the last --decay-fraction), or flat."""

    horizon = options.lr_decay_steps or options.max_steps  # stopping early need not change the schedule
    warmup, floor = options.warmup_steps, options.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if options.schedule == "constant":
            return 1.0
        if options.schedule == "wsd":
            decay_start = int(horizon * (1 - options.decay_fraction))
            if step < decay_start:
                return 1.0
            progress = (step - decay_start) / max(1, horizon - decay_start)
            return 1.0 - (1.0 - floor) * min(progress, 1.0)
        progress = min((step - warmup) / max(1, horizon - warmup), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (mean over predicted tokens) and the value to backpropagate: the same plus
    z_loss * mean(log Z)^2, which keeps the softmax normaliser near 1 and logits from drifting (PaLM, Chowdhery
    et al. 2022)."""
    logits = logits[:, :-1].float()  # position t predicts token t+1
    targets = input_ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if z_loss == 0:
        return ce, ce
    log_z = torch.logsumexp(logits, dim=-1)
    return ce, ce + z_loss * log_z.pow(2).mean()


# --- checkpoints -----------------------------------------------------------------------------------------------------
def sharded_optimizer(accelerator) -> bool:
    return accelerator.distributed_type.value == "FSDP"


def check_fsdp(accelerator) -> None:
    """Refuse an FSDP launch that Accelerate quietly turned into another kind of run: its state enables FSDP only for
    GPU-like devices (MULTI_GPU, MULTI_XPU, ...), so on CPU (gloo) it would train as plain data parallel."""
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if requested and not sharded_optimizer(accelerator):
        raise ValueError(
            f"FSDP was asked for (an FSDP config or --use_fsdp), but accelerate {accelerate.__version__} runs it on "
            f"GPUs only and made this a {accelerator.distributed_type.value} run; on CPU use plain data parallel "
            "(ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...)"
        )


def save_checkpoint(run: Pretraining, step: int) -> Path:
    """checkpoints/step-N (training/checkpoint.py writes it atomically): weights and tokenizer, optimizer,
    scheduler, each process's RNG state, and the loop's state."""
    accelerator, sharded = run.accelerator, sharded_optimizer(run.accelerator)
    rank = accelerator.process_index

    def save(folder: Path) -> None:
        save_rng(folder, rank)  # each process has its own generators
        state_dict = accelerator.get_state_dict(run.model)  # the full weights; a collective call under FSDP
        if sharded:  # FSDP: each process holds its own shard of the optimizer state
            save_torch(run.optimizer.state_dict(), optimizer_file(folder, rank))
        if accelerator.is_main_process:
            accelerator.unwrap_model(run.model).save_pretrained(folder, state_dict=state_dict)
            run.tokenizer.save_pretrained(folder)
            if not sharded:
                save_torch(run.optimizer.state_dict(), optimizer_file(folder))
            save_torch(run.scheduler.state_dict(), folder / "scheduler.pt")

    return write_checkpoint(
        run.options.out,
        step,
        save,
        state=run.state,
        keep_last=run.options.keep_last,
        main_process=accelerator.is_main_process,
        wait_for_everyone=accelerator.wait_for_everyone,
    )


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint into the unwrapped model and its optimizer and scheduler; returns the loop's state."""
    load_weights(path, model, hint="it is damaged; delete it to resume from the previous one")
    load_optimizer(path, optimizer, accelerator.process_index)
    scheduler.load_state_dict(load_torch(path / "scheduler.pt"))
    load_rng(path, accelerator.process_index)
    return read_state(path)


# --- evaluation ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def run_evaluation(model, val_blocks: torch.Tensor, byte_lengths: torch.Tensor, accelerator, batch_size: int) -> dict:
    """Validation loss, perplexity and bits per byte over `val_blocks`, each process taking every N-th block."""
    shard = val_blocks[accelerator.process_index :: accelerator.num_processes]
    sums = loss_sums(model, shard, byte_lengths, batch_size=batch_size, autocast=accelerator.autocast)
    return metrics_from_sums(accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu())


@torch.no_grad()
def generate_samples(model, tokenizer, max_new_tokens: int, seed: int) -> list[str]:
    """A few continuations of fixed prompts, sampled with a fixed seed inside a forked RNG, so they are
    comparable across evaluations and do not disturb the training run's random state."""
    model.eval()
    samples = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
            out = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                top_k=40,
                temperature=0.8,
                pad_token_id=tokenizer.pad_token_id,
            )
            samples.append(tokenizer.decode(out[0], skip_special_tokens=True))
    model.train()
    return samples


# --- the run: setup, step, evaluate, finish --------------------------------------------------------------------------
@dataclass
class Pretraining:
    """Everything the loop reads and updates, built once by `setup`."""

    options: PretrainOptions
    accelerator: Accelerator
    tokenizer: object
    model: torch.nn.Module  # prepared by accelerate (DDP/FSDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: SequenceLengthSchedule
    train_blocks: PackedBlocks  # read from the token shards on disk, a step's blocks at a time
    val_blocks: torch.Tensor  # (N, block_size): the --eval-blocks evaluated on
    byte_lengths: torch.Tensor  # bytes per token id, for bits per byte
    state: dict  # tokens, loss_ema, bad_steps, skipped, wall_time: saved in every checkpoint
    start_step: int
    log: RunLog
    progress: tqdm
    last_log: float = 0.0  # perf_counter() at the last logged step, for tokens/s

    @property
    def global_batch(self) -> int:
        return self.options.batch_size * self.options.grad_accum * self.accelerator.num_processes


def load_blocks(options: PretrainOptions, tokenizer, accelerator) -> tuple[PackedBlocks, torch.Tensor]:
    """The training blocks, read from token shards on disk (rank 0 writes the shards of raw sources into
    <out>/data first), and the first --eval-blocks validation blocks as a (N, block_size) tensor."""
    with accelerator.main_process_first():
        sources = prepared_sources(
            options.data,
            tokenizer,
            options.out / "data",
            val_fraction=options.val_fraction,
            cache_dir=options.cache_dir,
        )
    folders, weights = [folder for folder, _ in sources], [weight for _, weight in sources]
    train_blocks = open_split(folders, "train", options.block_size, weights)
    validation = open_split(folders, "validation", options.block_size)
    return train_blocks, validation[: options.eval_blocks or len(validation)]


def setup(options: PretrainOptions) -> Pretraining:
    """Tokenizer, model, data and every check before any training; then the optimizer and schedule, a checkpoint's
    state when resuming (restored before accelerate wraps the model), the log and the progress bar."""
    check_options(options)
    check_report_to(options.report_to)
    keep_freed_memory()
    mixed_precision = options.mixed_precision or ("bf16" if torch.cuda.is_available() and not options.cpu else "no")
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=options.cpu)
    check_fsdp(accelerator)
    set_seed(options.seed)
    resume_from = resume_point(options.out, options.resume)
    tokenizer = build_tokenizer(options, accelerator)
    model = build_model(options, tokenizer)
    schedule = SequenceLengthSchedule(options.seq_len_schedule or str(options.block_size))
    check_inputs(options, model, tokenizer, schedule)
    optimizer = make_optimizer(model, options, sharded=sharded_optimizer(accelerator))
    train_blocks, val_blocks = load_blocks(options, tokenizer, accelerator)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(options))
    state = {"tokens": 0, "loss_ema": None, "bad_steps": 0, "skipped": 0, "wall_time": 0.0}
    state["optimizer"] = options.optimizer
    if resume_from is not None:
        saved = read_state(resume_from).get("optimizer", "adamw")
        if saved != options.optimizer:
            raise ValueError(
                f"{resume_from} was trained with --optimizer {saved}, not {options.optimizer}: resume with the same"
            )
        state = {
            "optimizer": options.optimizer,
            **load_checkpoint(resume_from, accelerator, model, optimizer, scheduler),
        }
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    start_step = state.get("step", 0)
    if options.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    main_process = accelerator.is_main_process
    n_params = accelerator.unwrap_model(model).num_parameters()
    world = accelerator.num_processes
    if main_process and start_step == 0:
        facts = {"stage": "pretrain", "world_size": world, "parameters": n_params, "train_blocks": len(train_blocks)}
        write_run_config(options.out, options, **facts)
    progress = tqdm(
        total=options.max_steps,
        initial=start_step,
        disable=options.no_progress or not main_process,
        desc="pretrain",
        unit="step",
    )
    run = Pretraining(
        options=options,
        accelerator=accelerator,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        schedule=schedule,
        train_blocks=train_blocks,
        val_blocks=val_blocks,
        byte_lengths=torch.tensor(token_byte_lengths(tokenizer), dtype=torch.long),
        state=state,
        start_step=start_step,
        log=RunLog(options.out, start_step, active=main_process, report_to=options.report_to),
        progress=progress,
        last_log=time.perf_counter(),
    )
    accelerator.print(
        f"{n_params / 1e6:.2f}M parameters, {len(train_blocks)} train blocks of {options.block_size} tokens, "
        f"{world} process(es), global batch {run.global_batch} blocks, {mixed_precision} precision"
    )
    return run


def forward_backward(run: Pretraining, step: int) -> dict:
    """The gradients of optimizer step `step`, clipped: one global batch, process r taking its own rows of every
    micro-batch. Returns the mean loss (the same on every process), the gradient norm and the sequence length."""
    options, accelerator = run.options, run.accelerator
    length = run.schedule.length_at(step, options.lr_decay_steps or options.max_steps)
    indices = global_batch_indices(step, run.global_batch, len(run.train_blocks), options.seed)
    losses = []
    for micro in range(options.grad_accum):
        first = (micro * accelerator.num_processes + accelerator.process_index) * options.batch_size
        ids = SequenceLengthSchedule.reshape(run.train_blocks[indices[first : first + options.batch_size]], length)
        ids = ids.to(accelerator.device)
        last_micro = micro == options.grad_accum - 1
        # DDP all-reduces gradients on every backward; skip that until the last micro-batch of the step.
        with accelerator.no_sync(run.model) if not last_micro else contextlib.nullcontext():
            with accelerator.autocast():
                logits = run.model(input_ids=ids, use_cache=False).logits
            ce, loss = lm_loss(logits, ids, options.z_loss)
            accelerator.backward(loss / options.grad_accum)
        losses.append(ce.detach())
    loss_value = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), options.grad_clip)
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    return {"loss": loss_value, "grad_norm": grad_norm, "seq_len": length}


def skip_reason(run: Pretraining, step: int, loss: float, grad_norm: float) -> str | None:
    """Why the guard refuses this step's update (a NaN/inf loss or gradient, or a loss spike), else None."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        return "non-finite loss or gradient"
    ema, factor = run.state["loss_ema"], run.options.spike_factor
    if ema is not None and step >= run.options.warmup_steps and loss > factor * ema:
        return f"loss spike ({loss:.3f} > {factor} x recent mean {ema:.3f})"
    return None


def update(run: Pretraining, step: int, stats: dict) -> None:
    """Apply the gradients unless the guard refuses them; too many refusals in a row stop the run."""
    state, loss = run.state, stats["loss"]
    reason = skip_reason(run, step, loss, stats["grad_norm"])
    if reason is None:
        run.optimizer.step()
        state["bad_steps"] = 0
        state["loss_ema"] = loss if state["loss_ema"] is None else 0.9 * state["loss_ema"] + 0.1 * loss
    else:
        state["bad_steps"] += 1
        state["skipped"] += 1
        run.log.log({"step": step + 1, "skipped": reason, "loss": loss})
        run.accelerator.print(f"step {step + 1}: skipped, {reason}")
        if state["bad_steps"] >= run.options.max_bad_steps:
            raise RuntimeError(
                f"stopping at step {step + 1}: {state['bad_steps']} bad steps in a row (last: {reason}). "
                "Lower --lr, lengthen --warmup-steps, tighten --grad-clip or add --z-loss 1e-4; "
                "the last good checkpoint is in " + str(run.options.out / "checkpoints")
            )
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()


def log_step(run: Pretraining, done: int, stats: dict) -> None:
    """The training record of step `done`, with tokens/s over the steps since the last one logged."""
    options = run.options
    elapsed, run.last_log = time.perf_counter() - run.last_log, time.perf_counter()
    steps = min(done - run.start_step, options.log_every)
    tokens_per_s = steps * run.global_batch * options.block_size / max(elapsed, 1e-9)
    lr = run.scheduler.get_last_lr()[0]
    run.log.log(
        {
            "step": done,
            "tokens": run.state["tokens"],
            "loss": stats["loss"],
            "lr": lr,
            "grad_norm": stats["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "seq_len": stats["seq_len"],
        }
    )
    run.progress.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:,.0f}")


def evaluate(run: Pretraining, done: int) -> dict:
    """Validation metrics at step `done` (every process takes part), logged with samples from rank 0."""
    metrics = run_evaluation(run.model, run.val_blocks, run.byte_lengths, run.accelerator, run.options.batch_size)
    result = {"step": done, "tokens": run.state["tokens"], **metrics}
    run.log.log(result)
    if run.accelerator.is_main_process:
        model = run.accelerator.unwrap_model(run.model)
        samples = generate_samples(model, run.tokenizer, run.options.sample_tokens, run.options.seed)
        run.log.log({"step": done, "samples": samples})
        run.log.text("samples", "\n\n".join(samples), done)
        run.progress.write(
            f"step {done}: val loss {result['val_loss']:.3f}, ppl {result['val_perplexity']:.1f}, "
            f"bits/byte {result['val_bits_per_byte']:.3f}\n  " + "\n  ".join(repr(s) for s in samples)
        )
    return result


def weights_digest(model: torch.nn.Module) -> str:
    """A fingerprint of the weights: under DDP every process must end with exactly the same model."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def finish(run: Pretraining, result: dict) -> dict:
    """The final model, exported so it loads with or without tiny_hf, the loss curve and summary.md (rank 0), and
    each process's final-rank<N>.json."""
    accelerator, out = run.accelerator, run.options.out
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(run.model)
    world = accelerator.num_processes
    summary = {
        **result,
        "world_size": world,
        "weights_digest": weights_digest(model),
        "skipped_steps": run.state["skipped"],
    }
    run.log.close()
    if accelerator.is_main_process:
        tiny_hf.export(model, run.tokenizer, out / "model")
        title = f"{run.options.model} on {run.options.data}"
        report.plot_loss_curves({out.name: out}, out / "loss_curve.png", title=title)
        report.write_summary(
            out, model.config.to_dict(), extra={"world_size": world, "wall_time": run.state["wall_time"]}
        )
        write_model_card(out)
    (out / f"final-rank{accelerator.process_index}.json").write_text(json.dumps(summary))
    # Not accelerator.end_training(): RunLog closes the trackers, and destroying gloo's process group joins its
    # loop thread while holding the GIL that thread waits for (a finished rank could hang there for good); a
    # multi-process run's ranks leave through exit_distributed_rank instead.
    return summary


def stop_requested(run: Pretraining, stop: StopRequest) -> bool:
    """Whether any process got SIGTERM: decided together, so that every process saves the same checkpoint."""
    if run.accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor(float(stop.requested), device=run.accelerator.device)
    return run.accelerator.reduce(flag, reduction="sum").item() > 0


def train(options: PretrainOptions) -> dict:
    """Pretrain with `options`; returns the final evaluation with world size, weights digest and skipped steps.
    SIGTERM stops the run after the current step with a checkpoint, and exits 0 (`--resume` continues it)."""
    with RunLock(options.out):
        return train_locked(options)


def train_locked(options: PretrainOptions) -> dict:
    """`train` while this run holds its output folder."""
    run = setup(options)
    result = {}
    with run.log, StopRequest() as stop:
        for step in range(run.start_step, options.max_steps):
            step_start = time.perf_counter()
            stats = forward_backward(run, step)
            update(run, step, stats)
            run.state["tokens"] += run.global_batch * options.block_size
            run.state["wall_time"] += time.perf_counter() - step_start
            run.progress.update()
            done = step + 1
            if done % options.log_every == 0 or done == options.max_steps:
                log_step(run, done, stats)
            if done % options.eval_every == 0 or done == options.max_steps:
                result = evaluate(run, done)
            saved = done % options.save_every == 0 or done == options.max_steps
            if saved:
                save_checkpoint(run, done)
            if stop_requested(run, stop):
                if not saved:
                    save_checkpoint(run, done)
                run.progress.close()
                run.accelerator.print(f"stopped by SIGTERM after step {done}, checkpoint written: --resume continues")
                raise SystemExit(0)
        run.progress.close()
        return finish(run, result)


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(PretrainOptions, argv=argv, description=__doc__)
    return train(options)


def exit_distributed_rank() -> None:
    """End a finished rank of a multi-process run without interpreter teardown. Tearing down the gloo process group
    there joins gloo's loop thread while holding the GIL that thread may be waiting for, and the rank then hangs
    forever after its work is done (seen on 2 CPU processes, torch 2.13); every file is written and closed by now."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
    exit_distributed_rank()
