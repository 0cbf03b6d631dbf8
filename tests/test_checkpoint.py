"""training/checkpoint.py and training/run_log.py, the run plumbing pretraining and PPO share: checkpoints written
atomically and pruned to the last K, loaded back weights-only and checked against the model; a run's log cut back
to the step it resumes from."""

import json
import pickle
import random

import numpy as np
import pytest
import torch
from conftest import tiny_config

from tiny_hf import TinyForCausalLM
from training.checkpoint import (
    latest_checkpoint,
    load_rng,
    load_torch,
    load_weights,
    read_state,
    resume_point,
    save_rng,
    save_torch,
    write_checkpoint,
)
from training.run_log import RunLog, read_metrics


def write_file(name: str, text: str = "x"):
    def save(folder):
        (folder / name).write_text(text)

    return save


def test_checkpoints_are_atomic_and_the_last_k_are_kept(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, write_file("weights", str(step)), state={"loss": step / 10}, keep_last=2)
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["step-0000002", "step-0000003"]
    latest = latest_checkpoint(tmp_path)
    assert read_state(latest) == {"loss": 0.3, "step": 3} and (latest / "weights").read_text() == "3"

    def crash(folder):
        (folder / "weights").write_text("half")
        raise KeyboardInterrupt  # killed mid-save

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 4, crash, state={}, keep_last=2)
    assert latest_checkpoint(tmp_path) == latest  # the cut-off folder is not a checkpoint; the previous one stands


def test_a_folder_with_checkpoints_needs_resume(tmp_path):
    assert resume_point(tmp_path, resume=False) is None and resume_point(tmp_path, resume=True) is None
    write_checkpoint(tmp_path, 5, write_file("weights"), state={}, keep_last=1)
    with pytest.raises(ValueError, match=r"already has checkpoints \(step-0000005\): pass --resume"):
        resume_point(tmp_path, resume=False)
    assert resume_point(tmp_path, resume=True).name == "step-0000005"


def test_tensor_files_never_unpickle_code(tmp_path):
    save_torch({"step": torch.tensor(3)}, tmp_path / "ok.pt")
    assert load_torch(tmp_path / "ok.pt")["step"].item() == 3

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError):
        load_torch(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="missing.pt is missing: the checkpoint is damaged"):
        load_torch(tmp_path / "missing.pt")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    save_rng(tmp_path, rank=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    load_rng(tmp_path, rank=1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_weights_must_fit_the_model_and_a_tied_head_is_stored_once(tmp_path):
    torch.manual_seed(0)
    model = TinyForCausalLM(tiny_config(tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "tied")  # lm_head.weight is not in the file
    fresh = TinyForCausalLM(tiny_config(tie_word_embeddings=True))
    load_weights(tmp_path / "tied", fresh)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    other = TinyForCausalLM(tiny_config(num_hidden_layers=3, tie_word_embeddings=True))
    with pytest.raises((ValueError, RuntimeError), match="does not fit this model|size mismatch"):
        load_weights(tmp_path / "tied", other)
    with pytest.raises(ValueError, match="has no model.safetensors: pass --lora"):
        load_weights(tmp_path, fresh, hint="pass --lora")


def test_the_log_is_cut_back_to_the_step_a_run_resumes_from(tmp_path):
    with RunLog(tmp_path) as log:
        for step in range(1, 6):
            log.log({"step": step, "loss": 1 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]  # the torn line is dropped
    with RunLog(tmp_path, start_step=3) as log:  # the checkpoint was at step 3: steps 4 on run again
        log.log({"step": 4, "loss": 0.2})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert any((tmp_path / "tb").iterdir())
    RunLog(tmp_path).close()  # a fresh run (step 0) starts a new file
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    RunLog(tmp_path, start_step=0, active=False).log({"step": 9})  # not rank 0: nothing is cut or written
    assert read_metrics(tmp_path) == [{"step": 1}]


# --- faults: each damaged checkpoint is skipped for the newest intact one --------------------------------------------
def truncate(folder):
    (folder / "weights").write_bytes((folder / "weights").read_bytes()[:3])


def flip_a_byte(folder):
    data = bytearray((folder / "weights").read_bytes())
    data[0] ^= 1
    (folder / "weights").write_bytes(bytes(data))


FAULTS = {
    "missing file": (lambda folder: (folder / "weights").unlink(), "weights is missing"),
    "truncated": (truncate, "weights has 3 bytes, the manifest says 64"),
    "bad hash": (flip_a_byte, "weights does not match its sha256"),
    "unparsable state": (lambda folder: (folder / "trainer_state.json").write_text("{"), "does not parse"),
    "no manifest": (lambda folder: (folder / "manifest.json").unlink(), "manifest.json is missing"),
}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_resume_skips_a_damaged_checkpoint_with_one_warning(tmp_path, capsys, fault):
    damage, reason = FAULTS[fault]
    for step in (2, 4):
        write_checkpoint(tmp_path, step, write_file("weights", "w" * 64), state={}, keep_last=3)
    damage(tmp_path / "checkpoints" / "step-0000004")
    assert resume_point(tmp_path, resume=True).name == "step-0000002"
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and warning.startswith("warning: checkpoint step-0000004 is damaged (")
    assert reason in warning and warning.endswith("resuming from step-0000002")


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_half_written_folder(tmp_path):
    write_checkpoint(tmp_path, 2, write_file("weights"), state={}, keep_last=2)

    def disk_full(folder):
        (folder / "weights").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(tmp_path, 4, disk_full, state={}, keep_last=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000002"]
    assert resume_point(tmp_path, resume=True).name == "step-0000002"


def test_a_pickled_payload_in_optimizer_pt_is_refused_and_never_runs(tmp_path):
    from pathlib import Path

    from training.checkpoint import load_optimizer

    written = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (written, "ran"))

    torch.save({"state": Payload()}, tmp_path / "optimizer.pt")
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(pickle.UnpicklingError):
        load_optimizer(tmp_path, optimizer)
    assert not written.exists()
