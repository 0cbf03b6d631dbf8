"""training/pretrain.py end to end on tiny configs: steps run, loss falls, DDP really runs 2 processes with identical
weights, a SIGKILLed run (one process or two) resumes to the same losses, the curriculum switches lengths, and bad
input fails early."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import check_stage_record, free_port, tensorboard_scalars, tiny_config, trackio_config, trackio_logs
from transformers import AutoModelForCausalLM

from tiny_hf import TinyForCausalLM
from tiny_hf.bpe import train_tokenizer
from tiny_hf.corpus import DOC_SEPARATOR, topic_documents
from training import pretrain, shards
from training.checkpoint import RunLock, latest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny-1m"] + [
    x
    for kv in ("hidden_size=32", "num_hidden_layers=2", "num_attention_heads=4", "intermediate_size=64")
    for x in ("--set", kv)
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small local corpus (a .txt of documents joined by the separator) and a 400-token tokenizer for it."""
    root = tmp_path_factory.mktemp("pretrain")
    texts = [d["text"] for d in topic_documents()[:150]]
    corpus = root / "corpus.txt"
    corpus.write_text(DOC_SEPARATOR.join(texts))
    train_tokenizer(texts, vocab_size=400).save_pretrained(root / "tokenizer")
    return root


def args_for(workspace: Path, out: Path, *extra: str, model: tuple[str, ...] = tuple(TINY)) -> list[str]:
    return [
        "--data",
        str(workspace / "corpus.txt"),
        "--tokenizer",
        str(workspace / "tokenizer"),
        "--cache-dir",
        str(workspace / "cache"),
        "--out",
        str(out),
        *model,
        "--block-size",
        "32",
        "--batch-size",
        "8",
        "--warmup-steps",
        "2",
        "--eval-blocks",
        "8",
        "--sample-tokens",
        "4",
        "--log-every",
        "1",
        "--no-progress",
        "--cpu",
        *extra,
    ]


def records(out: Path, key: str) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if key in r}


def test_two_steps_write_a_complete_run_folder(workspace, tmp_path):
    out = tmp_path / "run"
    summary = pretrain.main(args_for(workspace, out, "--max-steps", "2"))
    assert summary["world_size"] == 1 and summary["val_loss"] > 0
    for name in ("metrics.jsonl", "run_config.json", "loss_curve.png", "summary.md", "model/config.json"):
        assert (out / name).exists(), name
    assert (out / "checkpoints" / "step-0000002" / "trainer_state.json").exists()
    assert sorted(records(out, "loss")) == [1, 2]
    assert tensorboard_scalars(out / "tb", "loss") == pytest.approx(records(out, "loss"))  # the default tracker
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.hidden_size == 32 and model.config.vocab_size == 400
    _, card = check_stage_record(out, "pretrain")
    assert "custom_code" in card.data.tags and "trust_remote_code=True" in card.text
    assert [r.metric_type for r in card.data.eval_results] == ["loss", "bits_per_byte"]  # the held-out validation


def test_trackio_logs_the_run_offline(workspace, tmp_path, connections):
    out = tmp_path / "run"
    pretrain.main(args_for(workspace, out, "--max-steps", "3", "--report-to", "trackio"))
    logged = trackio_logs(str(out))
    assert {r["step"]: r["loss"] for r in logged if "loss" in r} == records(out, "loss")
    assert {r["step"]: r["val_loss"] for r in logged if "val_loss" in r} == records(out, "val_loss")
    assert trackio_config(str(out))["max_steps"] == 3  # run_config.json, stored with the run
    assert not (out / "tb").exists() and connections == []


def test_loss_falls_and_evaluation_reports_bits_per_byte(workspace, tmp_path):
    out = tmp_path / "run"
    pretrain.main(args_for(workspace, out, "--max-steps", "60", "--lr", "1e-2", "--eval-every", "30"))
    losses = records(out, "loss")
    # From ln(400) = 5.99 nats (uniform over the vocabulary) to below 5: the model has learned token statistics.
    assert losses[1] == pytest.approx(5.99, abs=0.05) and losses[60] < losses[1] - 1.0, (losses[1], losses[60])
    val = records(out, "val_loss")
    assert sorted(val) == [30, 60] and val[60] < val[30]
    bpb, ppl = records(out, "val_bits_per_byte"), records(out, "val_perplexity")
    assert 0 < bpb[60] < 8 and ppl[60] == pytest.approx(2.718281828 ** val[60], rel=1e-6)
    assert len(records(out, "samples")[60]) == len(pretrain.SAMPLE_PROMPTS)


def test_curriculum_switches_sequence_length(workspace, tmp_path):
    out = tmp_path / "run"
    pretrain.main(args_for(workspace, out, "--max-steps", "8", "--seq-len-schedule", "8:0.25,16:0.25,32"))
    lengths = records(out, "seq_len")
    assert [lengths[s] for s in range(1, 9)] == [8, 8, 16, 16, 32, 32, 32, 32]


def test_keep_last_prunes_old_checkpoints(workspace, tmp_path):
    out = tmp_path / "run"
    pretrain.main(args_for(workspace, out, "--max-steps", "6", "--save-every", "2", "--keep-last", "2"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000004", "step-0000006"]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_losses(workspace, tmp_path):
    common = ("--lr-decay-steps", "1000", "--save-every", "5", "--eval-every", "1000", "--set", "hidden_dropout=0.1")
    reference = tmp_path / "reference"
    pretrain.main(args_for(workspace, reference, "--max-steps", "30", *common))

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "training" / "pretrain.py"),
        *args_for(workspace, killed, "--max-steps", "1000", *common),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-0000005" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run to be killed ended or hung"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) < 30, resumed_from

    with pytest.raises(ValueError, match="pass --resume"):
        pretrain.main(args_for(workspace, killed, "--max-steps", "30", *common))
    pretrain.main(args_for(workspace, killed, "--max-steps", "30", "--resume", *common))
    assert records(killed, "loss") == records(reference, "loss")  # exact, step for step
    assert sorted(records(killed, "loss")) == list(range(1, 31))


def accelerate_launch(*pretrain_args: str) -> list[str]:
    """The command that runs training/pretrain.py as 2 CPU processes (gloo) through `accelerate launch`."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "training" / "pretrain.py"),
        *pretrain_args,
    ]


DDP_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_ddp(*pretrain_args: str) -> None:
    result = subprocess.run(
        accelerate_launch(*pretrain_args), cwd=ROOT, env=DDP_ENV, capture_output=True, text=True, timeout=600
    )
    # A crash in one rank shows up last as the other's "Connection closed by peer": show every rank's error lines.
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
    assert result.returncode == 0, "\n".join(errors[-40:]) + "\n" + result.stderr[-2000:]


@pytest.mark.slow
def test_accelerate_launch_runs_two_processes_with_identical_weights(workspace, tmp_path):
    out = tmp_path / "ddp"
    run_ddp(*args_for(workspace, out, "--max-steps", "4", "--eval-every", "2", "--batch-size", "4"))
    ranks = [json.loads((out / f"final-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"]
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_two_process_run_resumes_after_sigkill_to_the_same_losses(workspace, tmp_path):
    """Both ranks killed at once mid-run (the launcher's process group); the resumed run's losses and final weights
    equal an uninterrupted 2-process run's, step for step: each rank's RNG and the data order come back exactly."""
    common = ("--batch-size", "4", "--lr-decay-steps", "1000", "--save-every", "4", "--eval-every", "1000")
    common += ("--set", "hidden_dropout=0.1")
    reference = tmp_path / "reference"
    run_ddp(*args_for(workspace, reference, "--max-steps", "16", *common))

    killed = tmp_path / "killed"
    cmd = accelerate_launch(*args_for(workspace, killed, "--max-steps", "100000", *common))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=DDP_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launcher = psutil.Process(proc.pid)
    try:
        deadline = time.time() + 300
        while latest_checkpoint(killed) is None:
            assert proc.poll() is None and time.time() < deadline, "the run to be killed ended or hung"
            time.sleep(0.05)
    finally:  # the launcher and both ranks at once (the ranks are not in the launcher's process group)
        everyone = [launcher, *launcher.children(recursive=True)]
        for process in everyone:
            process.send_signal(signal.SIGKILL)
        psutil.wait_procs(everyone, timeout=30)
    resumed_from = int(latest_checkpoint(killed).name.split("-")[1])
    assert resumed_from < 16, resumed_from

    run_ddp(*args_for(workspace, killed, "--max-steps", "16", "--resume", *common))
    assert records(killed, "loss") == records(reference, "loss")  # exact, step for step
    assert sorted(records(killed, "loss")) == list(range(1, 17))
    digests = [json.loads((run / "final-rank0.json").read_text())["weights_digest"] for run in (reference, killed)]
    assert digests[0] == digests[1]


# --- token shards: the data on disk --------------------------------------------------------------------------------
def test_prepared_shards_train_exactly_like_the_raw_source(workspace, tmp_path):
    """`tiny-hf data` writes the shards pretraining writes for itself (<out>/data): same blocks, same losses; the
    prepared folder's own tokenizer is taken when none is given."""
    shards.main(["--data", str(workspace / "corpus.txt"), "--tokenizer", str(workspace / "tokenizer"),
                 "--out", str(tmp_path / "shards"), "--cache-dir", str(workspace / "cache")])  # fmt: skip
    raw = tmp_path / "raw"
    pretrain.main(args_for(workspace, raw, "--max-steps", "3"))
    assert (raw / "data" / "0-corpus.txt" / "shards.json").is_file()
    prepared = tmp_path / "prepared"
    argv = [a for a in args_for(workspace, prepared, "--max-steps", "3") if a != str(workspace / "tokenizer")]
    argv[argv.index("--data") + 1] = str(tmp_path / "shards")
    argv.remove("--tokenizer")
    pretrain.main(argv)
    assert records(prepared, "loss") == records(raw, "loss") and sorted(records(raw, "loss")) == [1, 2, 3]
    assert records(prepared, "val_loss") == records(raw, "val_loss")


# The process's own peak RSS: VmHWM belongs to its address space, whereas ru_maxrss keeps the peak of the (forked)
# test process from before exec.
PEAK_RSS = (
    "import re, sys\n"
    "from training import pretrain\n"
    "pretrain.main(sys.argv[1:])\n"
    "print('peak_rss_kb', re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
)


@pytest.mark.slow
def test_training_memory_stays_flat_when_the_corpus_grows_tenfold(workspace, tmp_path):
    """Peak RSS of a training process on prepared shards of a corpus and of the same corpus ten times over (each
    copy of a document numbered, so all are distinct): blocks are read from disk, so memory does not follow size."""
    texts = [d["text"] for d in topic_documents()]
    peaks = {}
    for copies in (1, 10):
        corpus = tmp_path / f"corpus-x{copies}.jsonl"
        corpus.write_text("".join(json.dumps({"text": f"{i}. {t}"}) + "\n" for i in range(copies) for t in texts))
        folder = tmp_path / f"shards-x{copies}"
        shards.main(["--data", str(corpus), "--tokenizer", str(workspace / "tokenizer"), "--out", str(folder)])
        argv = args_for(workspace, tmp_path / f"run-x{copies}", "--max-steps", "20", "--eval-every", "10")
        argv[argv.index("--data") + 1] = str(folder)
        result = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[copies] = int(result.stdout.split("peak_rss_kb")[-1]) / 1024  # MiB
        tokens = json.loads((folder / "shards.json").read_text())["splits"]["train"]["tokens"]
        print(f"{copies}x corpus: {tokens:,} training tokens, peak RSS {peaks[copies]:.0f} MiB")
    assert peaks[10] < 1.10 * peaks[1], peaks


# --- Muon ----------------------------------------------------------------------------------------------------------
def test_muon_trains_the_hidden_matrices_and_resumes_exactly(workspace, tmp_path):
    """--optimizer muon: Muon on the attention and MLP matrices, AdamW on the rest; a run stopped at step 3 and
    resumed gives the uninterrupted run's losses exactly (both optimizers' states come back)."""
    muon = ("--optimizer", "muon", "--muon-lr", "0.05", "--lr", "1e-2", "--lr-decay-steps", "100", "--save-every", "3")
    reference = tmp_path / "reference"
    pretrain.main(args_for(workspace, reference, "--max-steps", "8", "--eval-every", "8", *muon))
    losses = records(reference, "loss")
    assert losses[8] < losses[1] - 0.3, losses
    stopped = tmp_path / "stopped"
    pretrain.main(args_for(workspace, stopped, "--max-steps", "3", "--eval-every", "8", *muon))
    pretrain.main(args_for(workspace, stopped, "--max-steps", "8", "--eval-every", "8", "--resume", *muon))
    assert records(stopped, "loss") == losses
    with pytest.raises(ValueError, match="was trained with --optimizer muon, not adamw: resume with the same"):
        pretrain.main(args_for(workspace, stopped, "--max-steps", "9", "--resume", "--lr-decay-steps", "100"))


def test_muon_takes_only_whole_2d_hidden_matrices():
    from training.optimizers import ChainedOptimizer, build_optimizer, parameter_roles

    model = TinyForCausalLM(tiny_config(tie_word_embeddings=False))
    roles = {name: role for name, _, role in parameter_roles(model)}
    assert roles["lm_head.weight"] == "head" and roles["model.embed_tokens.weight"] == "embedding"
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "matrix" and roles["model.norm.weight"] == "vector"
    optimizer = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(optimizer, ChainedOptimizer) and isinstance(optimizer.optimizers[0], torch.optim.Muon)
    muon_params = {id(p) for group in optimizer.optimizers[0].param_groups for p in group["params"]}
    assert muon_params == {id(p) for name, p in model.named_parameters() if roles[name] == "matrix"}
    assert len(optimizer.param_groups) == 3  # Muon's, then AdamW's decayed head and undecayed rest
    with pytest.raises(ValueError, match="would be FSDP shards, and Muon needs each whole matrix"):
        build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), sharded=True)
    model.model.layers[0].mlp.register_parameter("experts", torch.nn.Parameter(torch.zeros(2, 4, 4)))
    with pytest.raises(ValueError, match=r"parameter model.layers.0.mlp.experts has shape \(2, 4, 4\), but"):
        build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))


def test_the_schedule_reaches_both_optimizers_after_a_state_reload():
    """accelerate.prepare and --resume call load_state_dict, which gives each optimizer new group dicts: the LR
    scheduler must still set the rates the optimizers step with (a stale list left Muon at warmup's 1/30)."""
    from training.optimizers import build_optimizer

    model = TinyForCausalLM(tiny_config())
    optimizer = build_optimizer(model, "muon", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), muon_lr=0.02)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    optimizer.load_state_dict(optimizer.state_dict())
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    used = [group["lr"] for opt in optimizer.optimizers for group in opt.param_groups]
    assert used == scheduler.get_last_lr() == [0.02, 0.003]


def test_embeddings_and_head_get_their_own_learning_rates():
    from training.optimizers import build_optimizer

    model = TinyForCausalLM(tiny_config(tie_word_embeddings=False))
    embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
    for name in ("adamw", "muon"):
        optimizer = build_optimizer(
            model, name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), embedding_lr=0.1, head_lr=0.005
        )
        lr_of = {
            id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]
        }
        assert lr_of[id(embedding)] == (0.1, 0.0) and lr_of[id(head)] == (0.005, 0.1)
        assert lr_of[id(model.model.norm.weight)] == (1e-3, 0.0)
    # Unset, the groups are the ones before these options existed (checkpoints of older runs still load).
    assert len(build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95)).param_groups) == 2


# --- bad input: a clear error before any training --------------------------------------------------------------
def test_missing_data_fails_early(workspace, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="no_such"):
        pretrain.main(args_for(workspace, tmp_path / "run", "--data", str(tmp_path / "no_such.txt")))


def test_empty_data_fails_early(workspace, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        pretrain.main(args_for(workspace, tmp_path / "run", "--data", str(empty)))


def test_block_size_beyond_learned_positions_fails_early(workspace, tmp_path):
    extra = ("--set", "position_embedding=learned", "--set", "max_position_embeddings=16")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pretrain.main(args_for(workspace, tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_vocab_mismatch_fails_early(workspace, tmp_path):
    small = tmp_path / "small-model"
    pretrain.main(args_for(workspace, small, "--max-steps", "1", "--set", "vocab_size=400"))
    big_tokenizer = tmp_path / "big-tokenizer"
    train_tokenizer([d["text"] for d in topic_documents()[:150]], vocab_size=500).save_pretrained(big_tokenizer)
    argv = args_for(
        workspace, tmp_path / "run", "--tokenizer", str(big_tokenizer), model=("--model", str(small / "model"))
    )
    with pytest.raises(ValueError, match="500 tokens but the model's vocab_size is 400"):
        pretrain.main(argv)


def test_an_fsdp_launch_accelerate_would_run_as_another_kind_is_refused(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` (or fsdp.yaml) sets
    with pytest.raises(ValueError, match="FSDP was asked for .* runs it on GPUs only and made this a NO run"):
        pretrain.main(args_for(workspace, tmp_path / "run"))


def test_unwritable_out_dir_fails_early(workspace, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not writable"):
        pretrain.main(args_for(workspace, blocker / "run"))


def test_resume_falls_back_past_a_truncated_checkpoint(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain.main(args_for(workspace, out, "--max-steps", "4", "--save-every", "2"))
    weights = out / "checkpoints" / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    pretrain.main(args_for(workspace, out, "--max-steps", "6", "--save-every", "2", "--resume"))
    captured = capsys.readouterr()
    assert "warning: checkpoint step-0000004 is damaged (model.safetensors has 1000 bytes" in captured.err
    assert "resumed from" in captured.out and "step-0000002 at step 2" in captured.out
    assert sorted(records(out, "loss")) == list(range(1, 7))


def test_a_folder_another_run_is_writing_is_refused(workspace, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):  # as a run still training (or a killed launcher's orphaned ranks) holds it
        with pytest.raises(ValueError, match=r"--out .*run is in use by a running run \(pid \d+\)"):
            pretrain.main(args_for(workspace, out, "--max-steps", "2", "--resume"))
    assert not (out / "checkpoints").exists()
    pretrain.main(args_for(workspace, out, "--max-steps", "2"))  # free again once the holder is gone


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_0(workspace, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.pretrain", *args_for(workspace, out, "--max-steps", "100000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, "the run ended or hung"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by SIGTERM after step" in stdout
    latest = latest_checkpoint(out)
    assert latest is not None and int(latest.name.split("-")[1]) >= 1
