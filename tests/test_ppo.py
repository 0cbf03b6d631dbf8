"""Tests for alignment/ppo.py: a toy reward rises under PPO with the KL bounded, the LoRA policy runs with its
adapter-disabled base as the reference (also through the engine), resume reproduces an uninterrupted run, reward
models with another vocabulary are scored on re-tokenized text, and bad input fails before anything trains."""

import json
import math
import shutil

import pytest
import torch
from conftest import check_stage_record, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import ppo
from alignment.reward import rewards as reward_model_rewards
from tiny_hf import TinyForSequenceClassification
from tiny_hf.chat import engine_model
from tiny_hf.engine import Engine, SamplingParams

STOP, PAD = 4, 2  # <|im_end|> and <|pad|> of tiny_hf tokenizers
QUESTIONS = [
    "What is json?",
    "Explain lists.",
    "What does open do?",
    "Describe dicts.",
    "What is a tuple?",
    "How do I sort?",
    "What is pathlib?",
    "Explain csv.",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def even_fraction(completion_ids, **kwargs):
    """The toy reward: the share of even token ids in the response (about 0.5 for the random model, 1 at best)."""
    return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]


@pytest.fixture
def prompts(tmp_path, monkeypatch):
    monkeypatch.setitem(ppo.REWARD_FUNCTIONS, "even", even_fraction)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return path


def ppo_args(model, prompts, out, *extra, steps=2):
    return [
        "--model",
        str(model),
        "--task",
        str(prompts),
        "--reward-fn",
        "even",
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        "16",
        "--minibatch-size",
        "8",
        "--ppo-epochs",
        "2",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--lr",
        "3e-4",
        "--no-progress",
        *extra,
    ]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_toy_reward_rises_with_bounded_kl(tiny_lm_dir, prompts, tmp_path):
    out = tmp_path / "ppo"
    summary = ppo.main(ppo_args(tiny_lm_dir, prompts, out, "--save-every", "10", steps=24))
    check_stage_record(out, "ppo")
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 25))
    scores = [r["score"] for r in records]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > first + 0.15, scores
    assert records[0]["kl"] == 0.0 and records[0]["approx_kl"] < 0.5  # the policy starts as the reference
    assert max(r["kl"] for r in records) < 12, [r["kl"] for r in records]  # nats per 8-token response
    for key in (
        "entropy",
        "clipfrac",
        "approx_kl",
        "value_loss",
        "explained_variance",
        "response_length",
        "rollout_s",
        "scoring_s",
        "update_s",
    ):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records), key
    assert summary["first_score"] == scores[0] and summary["last_score"] == scores[-1]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert any((out / "tb").iterdir())
    # Checkpoints: the last two kept, none temporary; the export loads as a plain causal LM with the trained weights.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000020", "step-0000024"]
    assert json.loads((out / "model" / "config.json").read_text())["auto_map"]
    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    start = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    final = ppo.ValueHeadModel.from_pretrained(out / "checkpoints" / "step-0000024")
    for (name, a), c in zip(exported.state_dict().items(), final.policy.state_dict().values(), strict=True):
        assert torch.equal(a, c), name
    assert any(not torch.equal(a, b) for a, b in zip(exported.parameters(), start.parameters(), strict=True))


def test_resume_gives_the_same_metrics(tiny_lm_dir, prompts, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    ppo.main(ppo_args(tiny_lm_dir, prompts, whole, "--save-every", "2", steps=4))
    ppo.main(ppo_args(tiny_lm_dir, prompts, split, "--save-every", "2", steps=2))
    with pytest.raises(ValueError, match="pass --resume"):
        ppo.main(ppo_args(tiny_lm_dir, prompts, split, "--save-every", "2", steps=4))
    ppo.main(ppo_args(tiny_lm_dir, prompts, split, "--save-every", "2", "--resume", steps=4))

    def comparable(out):
        return [{k: v for k, v in r.items() if k not in ppo.TIMING_KEYS} for r in read_metrics(out)]

    assert comparable(split) == comparable(whole)  # steps 3 and 4 included: exact, not approximate
    assert comparable(whole)[2]["kl"] > 0
    for a, b in zip(
        AutoModelForCausalLM.from_pretrained(whole / "model").parameters(),
        AutoModelForCausalLM.from_pretrained(split / "model").parameters(),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_lora_policy_runs_with_the_adapter_disabled_base_as_reference(tiny_lm_dir, prompts, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    ppo.main(
        ppo_args(
            tiny_lm_dir,
            prompts,
            out,
            "--lora",
            "--rank",
            "4",
            "--lr",
            "3e-3",
            "--kl-estimator",
            "k3",
            "--target-kl",
            "1.0",
            "--kl-horizon",
            "100",
        )
    )
    records = read_metrics(out)
    assert len(records) == 2
    assert records[0]["kl"] == 0.0  # LoRA's B starts at 0: the policy is exactly its base
    assert records[1]["kl"] > 0  # after one update the adapter moved away from the (disabled-adapter) reference
    assert records[1]["kl_coef"] < records[0]["kl_coef"]  # adaptive: KL 0 below the target lowers beta
    assert (out / "checkpoints" / "step-0000002" / "adapter_config.json").exists()
    ppo.main(
        ppo_args(
            tiny_lm_dir,
            prompts,
            out,
            "--lora",
            "--rank",
            "4",
            "--lr",
            "3e-3",
            "--kl-estimator",
            "k3",
            "--target-kl",
            "1.0",
            "--kl-horizon",
            "100",
            "--resume",
            steps=3,
        )
    )
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3] and records[2]["kl"] > 0  # the adapter came back trained
    error = min(max(records[1]["kl"] / 1.0 - 1, -0.2), 0.2)  # the controller's beta came back and kept moving
    assert records[2]["kl_coef"] == pytest.approx(records[1]["kl_coef"] * (1 + error * 16 / 100))
    exported = AutoModelForCausalLM.from_pretrained(out / "model")  # merged: a plain model
    assert not any("lora" in name for name in exported.state_dict())
    start = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert any(not torch.equal(a, b) for a, b in zip(exported.parameters(), start.parameters(), strict=True))


def test_engine_runs_the_lora_adapters(tiny_lm_dir):
    """The engine is given the PEFT model's base, whose layers carry the active adapters: its greedy output is the
    PEFT model's, not the base's."""
    peft = pytest.importorskip("peft")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    torch.manual_seed(1)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    )
    lm = engine_model(lora)
    assert lm is lora.get_base_model()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is json?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine_ids = Engine(lm, tokenizer, prefix_cache_tokens=0).generate([prompt], params)[0].token_ids
    with torch.no_grad():
        adapted = lora.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD
        )[0, len(prompt) :].tolist()
        with lora.disable_adapter():
            plain = lora.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=PAD,
            )[0, len(prompt) :].tolist()
    assert engine_ids == adapted and adapted != plain


# ---------------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------------
def test_build_batch_masks_prompt_and_padding_and_cuts_at_stop():
    prompts = [[10, 11, 12], [20]]
    responses = [
        [30, STOP, 31],
        [40, 41],
    ]  # the first runs past its stop token (generate() fallback), the second never ends
    input_ids, attention_mask, response_mask, ended = ppo.build_batch(prompts, responses, STOP, PAD)
    assert input_ids.tolist() == [[10, 11, 12, 30, STOP], [20, 40, 41, PAD, PAD]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert response_mask.int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]
    assert ended.tolist() == [True, False]
    with pytest.raises(RuntimeError, match=r"rollouts \[1\] produced no tokens"):
        ppo.build_batch(prompts, [[30], []], STOP, PAD)


def test_engine_and_generate_fallback_give_seeded_responses(tiny_lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in QUESTIONS[:3]
    ]
    kwargs = dict(max_new_tokens=6, temperature=1.0, stop_id=STOP, seeds=[1, 2, 3])
    engine = ppo.make_engine(model, tokenizer, batch_size=3)
    first = ppo.generate_responses(model, tokenizer, prompts, engine=engine, **kwargs)
    assert first == ppo.generate_responses(model, tokenizer, prompts, engine=engine, **kwargs)  # per-request seeds
    alone = ppo.generate_responses(model, tokenizer, prompts[:1], engine=engine, **kwargs | {"seeds": [1]})
    assert alone == first[:1]  # and independent of the batch
    fallback = ppo.generate_responses(model, tokenizer, prompts, **kwargs)  # no engine: generate()
    assert fallback == ppo.generate_responses(model, tokenizer, prompts, **kwargs)
    assert all(1 <= len(r) <= 6 and STOP not in r[:-1] for r in fallback)
    assert ppo.make_engine(torch.nn.Linear(2, 2), tokenizer, batch_size=1) is None


def test_embedded_tasks_give_chat_prompts(small_stdlib):
    verifiable = ppo.load_prompts("verifiable", None, stdlib_dir=str(small_stdlib))
    assert verifiable[0]["prompt"][0]["role"] == "user" and verifiable[0]["answer"]
    docs = ppo.load_prompts("docs", None, stdlib_dir=str(small_stdlib))
    assert docs[0]["prompt"][-1]["role"] == "user" and "answer" not in docs[0]
    right = [[{"role": "assistant", "content": f"`{verifiable[0]['answer']}`"}]]
    got = ppo.score(verifiable[:1], [right[0][0]["content"]], [[5]], reward_fns=[ppo.REWARD_FUNCTIONS["exact_match"]])
    assert got.tolist() == [1.0]


@pytest.fixture(scope="module")
def other_vocab_reward_model(tmp_path_factory):
    """A reward model whose tokenizer (300 tokens, other merges) differs from the policy's (320)."""
    from tiny_hf.bpe import train_tokenizer
    from tiny_hf.corpus import topic_documents

    path = tmp_path_factory.mktemp("reward")
    tokenizer = train_tokenizer([d["text"] for d in topic_documents()[40:60]], vocab_size=300, model_max_length=256)
    torch.manual_seed(0)
    model = TinyForSequenceClassification(
        tiny_config(vocab_size=len(tokenizer), max_position_embeddings=256, num_labels=1, pad_token_id=PAD)
    )
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    return path


def test_reward_model_with_another_vocabulary_scores_the_text(
    tiny_lm_dir, other_vocab_reward_model, prompts, tmp_path
):
    from transformers import AutoModelForSequenceClassification

    rm_dir = other_vocab_reward_model / "model"
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    assert len(rm_tokenizer) != len(AutoTokenizer.from_pretrained(tiny_lm_dir))
    rows = [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS[:2]]
    texts, responses = ["the json module", "a list"], [[11, 12, STOP], [13, 14]]
    got = ppo.score(rows, texts, responses, reward_fns=[even_fraction], reward_model=rm, reward_tokenizer=rm_tokenizer)
    conversations = [r["prompt"] + [{"role": "assistant", "content": t}] for r, t in zip(rows, texts, strict=True)]
    expected = reward_model_rewards(rm, rm_tokenizer, conversations, 512) + torch.tensor(even_fraction(responses))
    assert torch.allclose(got, expected)
    # And through the script: the run folder is resolved, both rewards are summed, one step trains.
    out = tmp_path / "rm"
    ppo.main(ppo_args(tiny_lm_dir, prompts, out, "--reward-model", str(other_vocab_reward_model), steps=1))
    assert len(read_metrics(out)) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before training, and never a checkpoint
# ---------------------------------------------------------------------------------------------------------------------
def _no_chat_template(folder):
    (folder / "chat_template.jinja").unlink()


def _pad_is_eos(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|endoftext|>"}))


@pytest.mark.parametrize(
    ("extra", "edit", "match"),
    [
        (["--kl-coef", "-0.1"], None, r"--kl-coef=-0.1 must be >= 0"),
        (["--clip-range", "0"], None, r"--clip-range=0.0 must be > 0"),
        (["--clip-range-value", "-1"], None, r"--clip-range-value=-1.0 must be > 0"),
        (["--minibatch-size", "32"], None, "larger than --batch-size"),
        (["--reward-fn", "nope"], None, "'nope' is not one of"),
        (["--max-new-tokens", "0"], None, "--max-new-tokens=0 must be at least 1"),
        ([], _no_chat_template, "no chat template"),
        ([], _pad_is_eos, "pad_token_id == eos_token_id"),
    ],
    ids=[
        "kl-coef",
        "clip-range",
        "clip-range-value",
        "minibatch",
        "reward-fn",
        "max-new-tokens",
        "no-template",
        "pad-eos",
    ],
)
def test_bad_input_fails_before_training(tiny_lm_dir, prompts, tmp_path, extra, edit, match):
    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)
    if edit is not None:
        edit(model)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        ppo.main(ppo_args(model, prompts, out, *extra))
    assert not (out / "checkpoints").exists() and not (out / "model").exists()


def test_no_reward_and_missing_answers_fail_early(tiny_lm_dir, prompts, tmp_path):
    args = ppo_args(tiny_lm_dir, prompts, tmp_path / "out")
    without_reward = [a for i, a in enumerate(args) if a != "--reward-fn" and args[i - 1] != "--reward-fn"]
    with pytest.raises(ValueError, match="no reward"):
        ppo.main(without_reward)
    with pytest.raises(ValueError, match="exact_match needs an 'answer'"):
        ppo.main([*without_reward, "--reward-fn", "exact_match"])
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_rollouts_without_tokens_fail_before_any_update(tiny_lm_dir, prompts, tmp_path, monkeypatch):
    monkeypatch.setattr(
        ppo, "generate_responses", lambda policy, tokenizer, prompt_ids, **kw: [[] for _ in prompt_ids]
    )
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="produced no tokens"):
        ppo.main(ppo_args(tiny_lm_dir, prompts, out))
    assert not (out / "checkpoints").exists() and not (out / "model").exists()
    assert read_metrics(out) == []


def test_a_nan_reward_fails_before_any_update(tiny_lm_dir, prompts, tmp_path, monkeypatch):
    monkeypatch.setitem(ppo.REWARD_FUNCTIONS, "even", lambda completion_ids, **kw: [math.nan] * len(completion_ids))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="returned .*nan.*expected 16 finite numbers"):
        ppo.main(ppo_args(tiny_lm_dir, prompts, out))
    assert not (out / "checkpoints").exists() and not (out / "model").exists()
    assert read_metrics(out) == []


@pytest.mark.slow
def test_ppo_speed_bench_runs_tiny(tiny_lm_dir, tmp_path):
    from bench import ppo_speed

    argv = ["--model", str(tiny_lm_dir), "--batch-size", "8", "--new-tokens", "4", "--repeats", "1"]
    figures = ppo_speed.main([*argv, "--ppo-steps", "1", "--out", str(tmp_path)])
    assert figures["rollouts"]["engine_tokens_per_s"] > 0 and set(figures["step_split_s"]) == set(ppo.TIMING_KEYS)
    assert (tmp_path / "ppo_speed_cpu.md").exists()


def test_resume_falls_back_past_a_damaged_checkpoint(tiny_lm_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    ppo.main(ppo_args(tiny_lm_dir, prompts, out, "--save-every", "1", steps=2))
    (out / "checkpoints" / "step-0000002" / "optimizer.pt").write_bytes(b"not a tensor file")
    ppo.main(ppo_args(tiny_lm_dir, prompts, out, "--save-every", "1", "--resume", steps=3))
    captured = capsys.readouterr()
    assert "warning: checkpoint step-0000002 is damaged (optimizer.pt has 17 bytes" in captured.err
    assert "at step 1" in captured.out and [r["step"] for r in read_metrics(out)] == [1, 2, 3]
