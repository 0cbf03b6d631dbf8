"""LoRA and QLoRA: our from-scratch LoRALinear against PEFT with the same weights, learning, merging, adapter
save/reload, and training/finetune.py end to end (causal LM on a tiny run folder, QLoRA, seq-cls on tiny BERT and
GPT-2 built here) with its errors."""

import copy
import json

import pytest
import torch
from conftest import check_stage_record, tiny_config
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
)

from tiny_hf import TinyForCausalLM
from tiny_hf.bpe import train_tokenizer
from tiny_hf.corpus import DOC_SEPARATOR, topic_documents
from tiny_hf.lora import LoRALinear, apply_lora, find_linear, merge_lora
from training import finetune, pretrain

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_and_ours(model: nn.Module, r: int = 4, alpha: float = 8.0) -> tuple[nn.Module, nn.Module]:
    """The same model with PEFT's LoRA (random A and B) and with ours holding PEFT's A and B."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    theirs = get_peft_model(copy.deepcopy(model), config)
    ours = apply_lora(copy.deepcopy(model), TARGETS, r=r, alpha=alpha)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                peft_layer = theirs.base_model.model.get_submodule(name)
                module.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
                module.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    return theirs.eval(), ours.eval()


# --- our LoRALinear --------------------------------------------------------------------------------------------------
def test_lora_linear_equals_peft_for_the_same_weights():
    model = TinyForCausalLM(tiny_config())
    theirs, ours = peft_and_ours(model)
    ids = torch.randint(0, 99, (2, 12))
    assert not torch.allclose(theirs(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)  # B is not 0
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=0)
    trainable = sorted(name for name, p in ours.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * 3 * 2 and all(".lora_" in name for name in trainable)  # A, B x 3 targets x 2 layers
    assert theirs.get_nb_trainable_parameters()[0] == sum(p.numel() for p in ours.parameters() if p.requires_grad)


def test_lora_linear_starts_at_the_base_layer_with_peft_init():
    base = nn.Linear(48, 16)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.1)
    assert torch.equal(layer.lora_B.weight, torch.zeros(16, 4))
    assert layer.lora_A.weight.abs().max() <= 1 / 48**0.5  # kaiming_uniform(a=sqrt(5)) bound: 1/sqrt(fan_in)
    assert not base.weight.requires_grad and not base.bias.requires_grad and layer.scaling == 2.0
    x = torch.randn(3, 48)
    torch.testing.assert_close(layer.eval()(x), base(x))


def test_merge_folds_the_update_into_the_base_weight():
    model = TinyForCausalLM(tiny_config())
    theirs, ours = peft_and_ours(model)
    ids = torch.randint(0, 99, (2, 12))
    expected = ours(input_ids=ids).logits
    merged = merge_lora(ours)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.merge_and_unload()(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_lora_memorises_a_few_sequences_and_leaves_the_base_alone():
    model = TinyForCausalLM(tiny_config(tie_word_embeddings=False))
    with torch.no_grad():  # a head as confident as a trained one's: at std 0.02 no logit can leave [-0.7, 0.7]
        model.lm_head.weight.normal_(0, 0.2)
    frozen = {name: p.clone() for name, p in model.named_parameters()}
    apply_lora(model, finetune.TARGET_MODULES["tiny"], r=8, alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 99, (4, 8))
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, frozen[name.replace(".base.", ".")]), name


def test_lora_errors_name_the_bad_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"r=0 must be a positive integer"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match=r"\['wq'\] match no linear layer.*'q_proj'"):
        apply_lora(TinyForCausalLM(tiny_config()), ["q_proj", "wq"])
    assert len(find_linear(TinyForCausalLM(tiny_config()), ["q_proj"])) == 2


# --- PEFT adapters ---------------------------------------------------------------------------------------------------
def test_peft_adapter_reloads_bit_identical_and_merges(tmp_path):
    model = TinyForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "base")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type=TaskType.CAUSAL_LM
    )
    live = get_peft_model(model, config).eval()
    live.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    ids = torch.randint(0, 99, (2, 12))
    with torch.no_grad():
        expected = live(input_ids=ids).logits
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, expected)
        torch.testing.assert_close(reloaded.merge_and_unload()(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


# --- training/finetune.py --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 2-step pretraining run of a 2-layer, 32-wide model on a local corpus, and a 400-token tokenizer."""
    root = tmp_path_factory.mktemp("finetune")
    texts = [d["text"] for d in topic_documents()[:150]]
    (root / "corpus.txt").write_text(DOC_SEPARATOR.join(texts))
    train_tokenizer(texts, vocab_size=400).save_pretrained(root / "tokenizer")
    tiny = ["hidden_size=32", "num_hidden_layers=2", "num_attention_heads=4", "intermediate_size=64"]
    pretrain.main(
        [
            "--data",
            str(root / "corpus.txt"),
            "--tokenizer",
            str(root / "tokenizer"),
            "--cache-dir",
            str(root / "cache"),
            "--out",
            str(root / "run"),
            "--model",
            "tiny-1m",
            *(x for kv in tiny for x in ("--set", kv)),
            "--block-size",
            "32",
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            "--warmup-steps",
            "1",
            "--eval-blocks",
            "8",
            "--sample-tokens",
            "2",
            "--no-progress",
            "--cpu",
        ]
    )
    return root


def finetune_args(model, out, *extra: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--out",
        str(out),
        "--max-steps",
        "8",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-2",
        "--warmup-steps",
        "0",
        "--eval-blocks",
        "8",
        "--logging-steps",
        "1",
        "--disable-tqdm",
        "true",
        "--use-cpu",
        *extra,
    ]


def test_causal_lm_lora_on_a_run_folder_improves_saves_reloads_and_merges(workspace, tmp_path):
    out = tmp_path / "lora"
    summary = finetune.main(finetune_args(workspace / "run", out, "--merge"))
    assert summary == json.loads((out / "summary.json").read_text())
    _, adapter_card = check_stage_record(out, "lora", "adapter", base_run=workspace / "run")
    _, merged_card = check_stage_record(out, "lora", "merged")
    assert adapter_card.data.library_name == "peft" and "AutoPeftModelForCausalLM" in adapter_card.text
    assert merged_card.data.library_name == "transformers"
    assert summary["target_modules"] == finetune.TARGET_MODULES["tiny"]
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert set(summary["before"]) == {"val_loss", "val_perplexity", "val_bits_per_byte"}
    assert summary["after"]["val_loss"] < summary["before"]["val_loss"]
    assert summary["reload_max_abs_diff"] == 0.0 and summary["merge_max_abs_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(workspace / "run" / "model"), out / "adapter"
    )
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_qlora_trains_a_4bit_base(workspace, tmp_path):
    summary = finetune.main(finetune_args(workspace / "run", tmp_path / "qlora", "--qlora", "--r", "4"))
    assert summary["qlora"] and summary["reload_max_abs_diff"] == 0.0
    assert summary["after"]["val_loss"] < summary["before"]["val_loss"]


def stock_classifier_base(kind: str, folder, tokenizer) -> None:
    """A randomly initialised 2-layer BERT or GPT-2 body saved with our BPE tokenizer: seq-cls adds the head."""
    if kind == "bert":
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
        )
        BertModel(config).save_pretrained(folder)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            pad_token_id=tokenizer.pad_token_id,
        )
        GPT2Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_seq_cls_lora_on_stock_architectures(workspace, tmp_path, kind):
    stock_classifier_base(kind, tmp_path / kind, train_tokenizer([d["text"] for d in topic_documents()[:40]], 300))
    out = tmp_path / "out"
    summary = finetune.main(finetune_args(tmp_path / kind, out, "--task", "seq-cls", "--max-steps", "20", "--merge"))
    assert summary["target_modules"] == finetune.TARGET_MODULES[kind]
    assert 0 <= summary["before"]["accuracy"] <= 1 and 0 <= summary["after"]["accuracy"] <= 1
    assert summary["reload_max_abs_diff"] == 0.0 and summary["merge_max_abs_diff"] < 1e-4
    assert summary["train_loss_last"] < summary["train_loss_first"]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {"classifier", "score"} & set(saved["modules_to_save"])  # the new head is trained in full and saved
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert merged.config.num_labels == 2


def test_sentiment_data_is_deterministic_and_split_by_text():
    first, second = finetune.sentiment_dataset(), finetune.sentiment_dataset()
    assert first["train"]["text"] == second["train"]["text"]
    assert not set(first["train"]["text"]) & set(first["validation"]["text"])
    assert set(first["validation"]["label"]) == {0, 1}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--r", "0"], r"--r=0 must be a positive integer"),
        (["--task", "translation"], r"--task='translation' is not one of \['causal-lm', 'seq-cls'\]"),
        (["--lora-dropout", "1.5"], r"--lora-dropout=1.5 is not in \[0, 1\)"),
        (["--target-modules", "q_proj,wq"], r"\['wq'\] match no linear layer.*'gate_proj'"),
        (
            ["--qlora", "--target-modules", "lm_head"],
            r"left every targeted layer in float \(\['lm_head'\] are \['Linear'\]\).*'q_proj'",
        ),
    ],
)
def test_bad_inputs_fail_with_clear_messages(workspace, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        finetune.main(finetune_args(workspace / "run", tmp_path / "bad", *extra))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, r"already quantized \(quant_method='gptq'\)"),
        ({"dtype": "int8"}, r"holds int8 weights; bitsandbytes quantizes \['float32', 'float16', 'bfloat16'"),
    ],
)
def test_qlora_refuses_weights_bitsandbytes_cannot_quantize(workspace, tmp_path, change, match):
    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((workspace / "run" / "model" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
        finetune.main(finetune_args(folder, tmp_path / "bad", "--qlora", "--tokenizer", str(workspace / "tokenizer")))
