"""Pretrain a tiny_hf model: `python training/pretrain.py` or `accelerate launch training/pretrain.py`.

What happens, top to bottom:
1. Data: documents from the embedded corpus, local files or Hub datasets (mixed by weight), tokenized and packed
   into fixed-length blocks with EOS between documents (training/data.py). A tokenizer is trained first if none
   is given.
2. Model: a preset (optionally with `--set field=value` overrides) or a saved model to continue from.
3. Loop: AdamW (weight decay on matrices only), warmup + cosine or WSD schedule, gradient accumulation and
   clipping, optional z-loss, a guard that skips steps whose loss is NaN/inf or spikes, a sequence-length
   curriculum. Evaluation every N steps: validation loss, perplexity and bits per byte through a local `evaluate`
   metric, plus generated samples.
4. Output: `--out` gets metrics.jsonl, TensorBoard logs (tb/), checkpoints (checkpoints/step-N, written atomically,
   the last K kept), and at the end the exported model (model/), loss_curve.png and summary.md.

An interrupted run continues with `--resume`: model, optimizer, scheduler, RNG and data position come back, so on
one CPU process the resumed run's losses equal the uninterrupted run's step for step.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf  # registers the Auto classes
from tiny_hf import TinyConfig, TinyForCausalLM
from tiny_hf.bpe import train_tokenizer
from tiny_hf.system import keep_freed_memory
from training import report
from training.data import (
    SequenceLengthSchedule,
    build_datasets,
    token_byte_lengths,
    training_texts,
)
from training.evaluation import loss_sums, metrics_from_sums

SAMPLE_PROMPTS = ["The json module", "A list is", "To open a file"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="embedded", help="sources with weights: 'embedded', 'notes/:0.3,embedded:0.7'")
    data.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's, or train one)"
    )
    data.add_argument("--vocab-size", type=int, default=8192, help="when a tokenizer is trained here")
    data.add_argument("--block-size", type=int, default=256, help="tokens per packed block (the longest length)")
    data.add_argument(
        "--seq-len-schedule", default=None, help="curriculum, e.g. '64:0.3,128:0.3,256' (default: block)"
    )
    data.add_argument("--val-fraction", type=float, default=0.05)
    data.add_argument("--cache-dir", type=Path, default=Path("data"))
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny-3m", help="a preset name, a saved model folder or a Hub id")
    model.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (preset)")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--max-steps", type=int, default=300)
    optim.add_argument("--lr-decay-steps", type=int, default=None, help="schedule length (default: --max-steps)")
    optim.add_argument("--batch-size", type=int, default=16, help="blocks per micro-batch per process")
    optim.add_argument("--grad-accum", type=int, default=1)
    optim.add_argument("--lr", type=float, default=3e-3)
    optim.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    optim.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default="cosine")
    optim.add_argument("--warmup-steps", type=int, default=30)
    optim.add_argument("--decay-fraction", type=float, default=0.2, help="WSD: share of steps spent decaying")
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--beta1", type=float, default=0.9)
    optim.add_argument("--beta2", type=float, default=0.95)
    optim.add_argument("--grad-clip", type=float, default=1.0)
    optim.add_argument("--z-loss", type=float, default=0.0, help="coefficient of log(Z)^2 (PaLM uses 1e-4)")
    guard = parser.add_argument_group("stability")
    guard.add_argument("--spike-factor", type=float, default=3.0, help="skip a step whose loss > factor x recent mean")
    guard.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many skipped steps in a row")
    evaluation = parser.add_argument_group("evaluation and logging")
    evaluation.add_argument("--eval-every", type=int, default=100)
    evaluation.add_argument("--eval-blocks", type=int, default=64, help="validation blocks per evaluation (0 = all)")
    evaluation.add_argument("--sample-tokens", type=int, default=40, help="tokens per sample at each evaluation")
    evaluation.add_argument("--log-every", type=int, default=10)
    evaluation.add_argument("--no-progress", action="store_true")
    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--out", type=Path, default=Path("runs/pretrain"))
    ckpt.add_argument("--save-every", type=int, default=100)
    ckpt.add_argument("--keep-last", type=int, default=2)
    ckpt.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    system = parser.add_argument_group("system")
    system.add_argument("--seed", type=int, default=0)
    system.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None, help="default: bf16 on GPU")
    system.add_argument("--compile", action="store_true", help="torch.compile the model")
    system.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    return parser.parse_args(argv)


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


def is_saved_model(name: str) -> bool:
    return name not in tiny_hf.PRESETS


def build_tokenizer(args: argparse.Namespace, accelerator: Accelerator):
    """The tokenizer named by --tokenizer, else the saved model's, else one trained on the training split."""
    source = args.tokenizer or (args.model if is_saved_model(args.model) else None)
    if source is not None:
        return AutoTokenizer.from_pretrained(source)
    tokenizer_dir = args.out / "tokenizer"
    with accelerator.main_process_first():  # rank 0 trains and saves; the others then load the same files
        if not (tokenizer_dir / "tokenizer.json").exists():
            texts = training_texts(args.data, args.val_fraction, args.cache_dir)
            accelerator.print(f"training a {args.vocab_size}-token BPE tokenizer on {len(texts)} documents")
            train_tokenizer(texts, vocab_size=args.vocab_size).save_pretrained(tokenizer_dir)
        return AutoTokenizer.from_pretrained(tokenizer_dir)


def build_model(args: argparse.Namespace, tokenizer) -> TinyForCausalLM:
    if is_saved_model(args.model):
        if args.set:
            raise ValueError("--set only applies to presets; a saved model keeps its architecture")
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = TinyConfig.from_preset(
        args.model,
        **{
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "max_position_embeddings": max(
                args.block_size, TinyConfig.from_preset(args.model).max_position_embeddings
            ),
            **parse_overrides(args.set),
        },
    )
    return TinyForCausalLM(config)


def check_inputs(args: argparse.Namespace, model, tokenizer, schedule: SequenceLengthSchedule) -> None:
    """Everything that would otherwise fail minutes into a run, checked before the first step."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}: "
            "ids past the embedding table would crash training; use the model's own tokenizer or a new model"
        )
    if schedule.max_length != args.block_size:
        raise ValueError(f"--seq-len-schedule's longest length {schedule.max_length} must equal --block-size")
    schedule.check_positions(model.config)
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "keep_last"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {out} is not writable: {error}") from None


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: decaying norms, biases and embeddings pulls them toward
    zero for no benefit (GPT-2/nanoGPT practice). A tied LM head is the embedding and is not decayed either."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = "embed_tokens" in name or "embed_positions" in name
        (decay if param.ndim >= 2 and not is_embedding else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=torch.cuda.is_available())


def lr_lambda(args: argparse.Namespace):
    """Multiplier of --lr at each step: linear warmup, then cosine to min_lr_ratio (Loshchilov & Hutter 2017), or
    WSD (warmup-stable-decay, Hu et al. 2024: flat, then a linear decay over the last --decay-fraction), or flat."""

    horizon = args.lr_decay_steps or args.max_steps  # stopping early need not change the schedule

    def multiplier(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.schedule == "constant":
            return 1.0
        if args.schedule == "wsd":
            decay_start = int(horizon * (1 - args.decay_fraction))
            if step < decay_start:
                return 1.0
            progress = (step - decay_start) / max(1, horizon - decay_start)
            return 1.0 - (1.0 - args.min_lr_ratio) * min(progress, 1.0)
        progress = min((step - args.warmup_steps) / max(1, horizon - args.warmup_steps), 1.0)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

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


# --- data order ------------------------------------------------------------------------------------------------------
def global_batch_indices(step: int, global_batch: int, num_blocks: int, seed: int) -> list[int]:
    """The block indices of optimizer step `step`: a fresh permutation per epoch, seeded by (seed, epoch), read in
    order. A pure function of the step, so a resumed run reads exactly the blocks the interrupted one would have."""
    indices, position = [], step * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, num_blocks)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(global_batch - len(indices), num_blocks - offset)
        indices += order[offset : offset + take].tolist()
        position += take
    return indices


# --- checkpoints -----------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sharded_optimizer(accelerator) -> bool:
    return accelerator.distributed_type.value == "FSDP"


def save_checkpoint(accelerator, args, step, model, tokenizer, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoints/step-N atomically: everything goes into a temporary folder that is renamed only when
    complete, so a run killed mid-save leaves the previous checkpoint intact and no half-written one."""
    root = args.out / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")  # each process has its own generators
    state_dict = accelerator.get_state_dict(model)  # the full weights; a collective call under FSDP
    if sharded_optimizer(accelerator):  # FSDP: each process holds its own shard of the optimizer state
        torch.save(optimizer.state_dict(), tmp / f"optimizer-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if not sharded_optimizer(accelerator):
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))  # written last
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[: -args.keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one with trainer_state.json); temporary folders are ignored."""
    done = [p for p in sorted((out / "checkpoints").glob("step-*")) if (p / "trainer_state.json").exists()]
    return done[-1] if done else None


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    weights = path / "model.safetensors"
    if not weights.exists():
        raise ValueError(
            f"checkpoint {path} has no model.safetensors: it is damaged; delete it to resume from the previous one"
        )
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()  # stored once, as the embedding
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing}, unexpected {unexpected}")
    rank_file = path / f"optimizer-{accelerator.process_index}.pt"
    optimizer_file = rank_file if rank_file.exists() else path / "optimizer.pt"
    optimizer.load_state_dict(torch.load(optimizer_file, weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


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


# --- the run ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()
    mixed_precision = args.mixed_precision or ("bf16" if torch.cuda.is_available() and not args.cpu else "no")
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=args.cpu)
    set_seed(args.seed)
    check_writable(args.out)
    resume_from = latest_checkpoint(args.out)
    if resume_from is not None and not args.resume:
        raise ValueError(
            f"{args.out} already has checkpoints ({resume_from.name}): pass --resume to continue, or a new --out"
        )

    # 1. Tokenizer, model, data, and every check, before any training.
    tokenizer = build_tokenizer(args, accelerator)
    model = build_model(args, tokenizer)
    schedule = SequenceLengthSchedule(args.seq_len_schedule or str(args.block_size))
    check_inputs(args, model, tokenizer, schedule)
    with accelerator.main_process_first():
        train_ds, val_ds = build_datasets(
            args.data,
            tokenizer,
            args.block_size,
            seed=args.seed,
            val_fraction=args.val_fraction,
            cache_dir=args.cache_dir,
        )
    train_blocks = torch.tensor(train_ds["input_ids"], dtype=torch.long)  # (N, block_size): small corpora fit in RAM
    val_blocks = torch.tensor(val_ds["input_ids"], dtype=torch.long)
    if args.eval_blocks:
        val_blocks = val_blocks[: args.eval_blocks]
    byte_lengths = torch.tensor(token_byte_lengths(tokenizer), dtype=torch.long)

    # 2. Optimizer and schedule; restore a checkpoint before accelerate wraps the model.
    optimizer = make_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    state = {"tokens": 0, "loss_ema": None, "bad_steps": 0, "skipped": 0, "wall_time": 0.0}
    start_step = 0
    if args.resume and resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, model, optimizer, scheduler)
        start_step = state["step"]
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
        if accelerator.is_main_process:  # drop what was logged after that checkpoint: those steps run again
            metrics_path = args.out / "metrics.jsonl"
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    if args.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    world = accelerator.num_processes
    global_batch = args.batch_size * args.grad_accum * world
    writer = SummaryWriter(args.out / "tb") if accelerator.is_main_process else None
    metrics_file = open(args.out / "metrics.jsonl", "a") if accelerator.is_main_process else None  # noqa: SIM115
    if accelerator.is_main_process and start_step == 0:
        run_config = {**vars(args), "out": str(args.out), "cache_dir": str(args.cache_dir), "world_size": world}
        run_config.update(parameters=accelerator.unwrap_model(model).num_parameters(), train_blocks=len(train_blocks))
        (args.out / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))

    def log(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    writer.add_scalar(key, value, record["step"])

    n_params = accelerator.unwrap_model(model).num_parameters()
    accelerator.print(
        f"{n_params / 1e6:.2f}M parameters, {len(train_blocks)} train blocks of {args.block_size} tokens, "
        f"{world} process(es), global batch {global_batch} blocks, {mixed_precision} precision"
    )
    progress = tqdm(
        total=args.max_steps,
        initial=start_step,
        disable=args.no_progress or not accelerator.is_main_process,
        desc="pretrain",
        unit="step",
    )
    # 3. The loop. Each optimizer step reads one global batch; process r takes its own rows of every micro-batch.
    last_log, result = time.perf_counter(), {}
    for step in range(start_step, args.max_steps):
        step_start = time.perf_counter()
        length = schedule.length_at(step, args.lr_decay_steps or args.max_steps)
        indices = global_batch_indices(step, global_batch, len(train_blocks), args.seed)
        losses = []
        for micro in range(args.grad_accum):
            first = (micro * world + accelerator.process_index) * args.batch_size
            ids = SequenceLengthSchedule.reshape(train_blocks[indices[first : first + args.batch_size]], length)
            ids = ids.to(accelerator.device)
            last_micro = micro == args.grad_accum - 1
            # DDP all-reduces gradients on every backward; skip that until the last micro-batch of the step.
            with accelerator.no_sync(model) if not last_micro else contextlib.nullcontext():
                with accelerator.autocast():
                    logits = model(input_ids=ids, use_cache=False).logits
                ce, loss = lm_loss(logits, ids, args.z_loss)
                accelerator.backward(loss / args.grad_accum)
            losses.append(ce.detach())
        loss_value = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()  # same on every rank
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")

        # The guard: a NaN/inf loss or gradient, or a loss far above the recent mean, is not applied.
        reason = None
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            reason = "non-finite loss or gradient"
        elif (
            state["loss_ema"] is not None
            and step >= args.warmup_steps
            and loss_value > args.spike_factor * state["loss_ema"]
        ):
            reason = f"loss spike ({loss_value:.3f} > {args.spike_factor} x recent mean {state['loss_ema']:.3f})"
        if reason is None:
            optimizer.step()
            state["bad_steps"] = 0
            state["loss_ema"] = loss_value if state["loss_ema"] is None else 0.9 * state["loss_ema"] + 0.1 * loss_value
        else:
            state["bad_steps"] += 1
            state["skipped"] += 1
            log({"step": step + 1, "skipped": reason, "loss": loss_value})
            accelerator.print(f"step {step + 1}: skipped, {reason}")
            if state["bad_steps"] >= args.max_bad_steps:
                raise RuntimeError(
                    f"stopping at step {step + 1}: {state['bad_steps']} bad steps in a row (last: {reason}). "
                    "Lower --lr, lengthen --warmup-steps, tighten --grad-clip or add --z-loss 1e-4; "
                    "the last good checkpoint is in " + str(args.out / "checkpoints")
                )
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["tokens"] += global_batch * args.block_size
        state["wall_time"] += time.perf_counter() - step_start
        progress.update()

        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps:
            elapsed = time.perf_counter() - last_log
            tokens_per_s = min(done - start_step, args.log_every) * global_batch * args.block_size / max(elapsed, 1e-9)
            last_log = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            log(
                {
                    "step": done,
                    "tokens": state["tokens"],
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "seq_len": length,
                }
            )
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:,.0f}")
        if done % args.eval_every == 0 or done == args.max_steps:
            result = run_evaluation(model, val_blocks, byte_lengths, accelerator, args.batch_size)
            result = {"step": done, "tokens": state["tokens"], **result}
            log(result)
            if accelerator.is_main_process:
                samples = generate_samples(accelerator.unwrap_model(model), tokenizer, args.sample_tokens, args.seed)
                log({"step": done, "samples": samples})
                if writer is not None:
                    writer.add_text("samples", "\n\n".join(samples), done)
                progress.write(
                    f"step {done}: val loss {result['val_loss']:.3f}, ppl {result['val_perplexity']:.1f}, "
                    f"bits/byte {result['val_bits_per_byte']:.3f}\n  " + "\n  ".join(repr(s) for s in samples)
                )
        if done % args.save_every == 0 or done == args.max_steps:
            save_checkpoint(accelerator, args, done, model, tokenizer, optimizer, scheduler, state)
    progress.close()

    # 4. The final model, exported so it loads with or without tiny_hf, and the report.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # A fingerprint of the weights: under DDP every process must end with exactly the same model.
    digest = hashlib.sha256()
    for param in unwrapped.parameters():
        digest.update(param.detach().float().cpu().numpy().tobytes())
    weights_digest = digest.hexdigest()
    summary = {**result, "world_size": world, "weights_digest": weights_digest, "skipped_steps": state["skipped"]}
    if accelerator.is_main_process:
        tiny_hf.export(unwrapped, tokenizer, args.out / "model")
        report.plot_loss_curves(
            {args.out.name: args.out}, args.out / "loss_curve.png", title=f"{args.model} on {args.data}"
        )
        report.write_summary(
            args.out, unwrapped.config.to_dict(), extra={"world_size": world, "wall_time": state["wall_time"]}
        )
        metrics_file.close()
        writer.close()
    (args.out / f"final-rank{accelerator.process_index}.json").write_text(json.dumps(summary))
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
