"""tiny_hf/pruning.py and training/prune.py: the sparsity asked for is the sparsity got, 2:4 holds in every group,
masks survive fine-tuning, Wanda reacts to activations, structured pruning shrinks config and weights consistently
(forward, generate, save/reload), removing dead heads/neurons changes nothing, bad input fails with a clear message,
and the script writes its results."""

import json

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from tiny_hf import TinyForCausalLM
from tiny_hf.pruning import (
    input_norms,
    linear_layers,
    magnitude_mask,
    prune,
    prune_heads,
    prune_neurons,
    removable_heads,
    sparsity,
    wanda_mask,
)
from training import prune as prune_script
from training.adapt import train_on_blocks


def make_model(**overrides) -> TinyForCausalLM:
    torch.manual_seed(0)
    return TinyForCausalLM(tiny_config(**overrides)).eval()


def calibration_ids(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 99, (n, length), generator=torch.Generator().manual_seed(1))  # (N, T)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------------------------------
# Unstructured and 2:4
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("target", [0.0, 0.25, 0.5, 0.75])
def test_unstructured_sparsity_is_what_was_asked(method, target):
    model = make_model()
    masks = prune(model, method, target, calibration=calibration_ids())
    assert sparsity(model) == pytest.approx(target, abs=1e-9)
    for name, layer in linear_layers(model).items():
        assert float((layer.weight == 0).float().mean()) == pytest.approx(target, abs=1e-9), name
        assert torch.equal(layer.weight != 0, masks[name])
    assert model.model.embed_tokens.weight.count_nonzero() == model.model.embed_tokens.weight.numel()  # head dense


def test_wanda_prunes_per_output_row():
    model = make_model()
    prune(model, "wanda", 0.5, calibration=calibration_ids())
    for layer in linear_layers(model).values():
        assert torch.all((layer.weight == 0).sum(1) == layer.in_features // 2)


@pytest.mark.parametrize("method", ["2:4", "wanda-2:4"])
def test_two_four_pattern_holds_in_every_group_of_four(method):
    model = make_model()
    prune(model, method, calibration=calibration_ids())
    for name, layer in linear_layers(model).items():
        groups = layer.weight.reshape(layer.out_features, -1, 4)  # (out, in / 4, 4)
        assert torch.all((groups != 0).sum(-1) == 2), name
    assert sparsity(model) == 0.5


def test_masks_survive_recovery_steps():
    model = make_model()
    masks = prune(model, "magnitude", 0.5)
    before = {name: layer.weight.clone() for name, layer in linear_layers(model).items()}
    losses = train_on_blocks(model, calibration_ids(8), masks=masks, steps=3, lr=1e-2, batch_size=2)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert sparsity(model) == 0.5
    for name, layer in linear_layers(model).items():
        assert torch.all(layer.weight[~masks[name]] == 0), name
        assert not torch.equal(layer.weight[masks[name]], before[name][masks[name]]), f"{name} did not train"


def test_wanda_differs_from_magnitude_when_activations_are_skewed():
    # The mask functions: input feature 0 has the smallest weights but 1000x the activation of the others.
    weight = torch.rand(4, 8) + 0.5
    weight[:, 0] = 0.01
    norm = torch.ones(8)
    norm[0] = 1000.0
    assert not magnitude_mask(weight, 0.5)[:, 0].any()
    assert wanda_mask(weight, 0.5, norm)[:, 0].all()

    # End to end through the hooks: a norm gain makes hidden feature 0 huge at the MLP's input in block 0.
    model = make_model()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[0] = 1000.0
        model.model.layers[0].mlp.up_proj.weight[:, 0] = 2e-3  # ~0.1 of the median |W| (init std 0.02)
    name = "model.layers.0.mlp.up_proj"
    norms = input_norms(model, calibration_ids(), [name])
    assert norms[name][0] > 100 * norms[name][1:].median()
    magnitude_masks = prune(make_model_like(model), "magnitude", 0.5)
    wanda_masks = prune(make_model_like(model), "wanda", 0.5, calibration=calibration_ids())
    assert not magnitude_masks[name][:, 0].any() and wanda_masks[name][:, 0].all()


def make_model_like(model: TinyForCausalLM) -> TinyForCausalLM:
    copy = TinyForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


# ---------------------------------------------------------------------------------------------------------------------
# Structured
# ---------------------------------------------------------------------------------------------------------------------
STRUCTURED_CONFIGS = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2),
    "biases+gelu": dict(attention_bias=True, mlp_bias=True, mlp="gelu", intermediate_size=64),
    "qk_norm+parallel": dict(qk_norm=True, block="parallel", num_key_value_heads=2),
}


@pytest.mark.parametrize("overrides", STRUCTURED_CONFIGS.values(), ids=STRUCTURED_CONFIGS)
def test_structured_pruning_shrinks_config_and_weights(overrides, tmp_path):
    model = make_model(**overrides)
    heads, kv_heads, head_dim = model.config.num_attention_heads, model.config.num_key_value_heads, 8
    intermediate, hidden = model.config.intermediate_size, model.config.hidden_size
    kept = prune_heads(model, 2, calibration_ids())
    prune_neurons(model, 10, calibration_ids())
    config = model.config
    group = heads // kv_heads
    assert (config.num_attention_heads, config.num_key_value_heads) == (heads - 2, kv_heads - 2 // group)
    assert config.head_dim == head_dim and config.intermediate_size == intermediate - 10
    assert all(len(k) == heads - 2 for k in kept)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (config.num_attention_heads * head_dim, hidden)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (config.num_key_value_heads * head_dim, hidden)
        assert attn.o_proj.weight.shape == (hidden, config.num_attention_heads * head_dim)
        assert mlp.up_proj.weight.shape == (config.intermediate_size, hidden)
        assert mlp.down_proj.weight.shape == (hidden, config.intermediate_size)
        if mlp.gated:
            assert mlp.gate_proj.weight.shape == (config.intermediate_size, hidden)
        if config.attention_bias:
            assert attn.q_proj.bias.shape == (config.num_attention_heads * head_dim,)
    ids = calibration_ids(2, 12)
    out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 9)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_attention_heads == config.num_attention_heads
    assert reloaded.config.intermediate_size == config.intermediate_size
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)
    assert torch.equal(reloaded.generate(ids[:, :4], max_new_tokens=5, do_sample=False), out)


def test_pruning_nothing_changes_nothing():
    model = make_model(num_key_value_heads=2)
    ids = calibration_ids(2, 12)
    expected = logits(model, ids)
    prune_heads(model, 0, calibration_ids())
    prune_neurons(model, 0, calibration_ids())
    assert torch.equal(logits(model, ids), expected)
    masks = prune(model, "magnitude", 0.0)
    assert all(mask.all() for mask in masks.values()) and torch.equal(logits(model, ids), expected)


def test_dead_heads_and_neurons_are_the_ones_removed():
    # A key/value group whose o_proj columns are zero and neurons whose down_proj columns are zero contribute nothing:
    # they score lowest, are removed, and the logits stay the same (this checks the q/k/v/o slicing lines up).
    model = make_model(num_attention_heads=4, num_key_value_heads=2)
    head_dim = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 2 * head_dim :] = 0  # query heads 2 and 3 = key/value group 1
            layer.mlp.down_proj.weight[:, [5, 17, 40]] = 0
    ids = calibration_ids(2, 12)
    expected = logits(model, ids)
    assert prune_heads(model, 2, calibration_ids()) == [[0, 1]] * 2
    kept = prune_neurons(model, 3, calibration_ids())
    assert all({5, 17, 40}.isdisjoint(k) for k in kept)
    torch.testing.assert_close(logits(model, ids), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=rf"sparsity={bad!r} is not in \[0, 1\)"):
        prune(make_model(), "magnitude", bad)


def test_unknown_method_and_missing_calibration_are_rejected():
    with pytest.raises(
        ValueError, match=r"method='random' is not one of \['2:4', 'magnitude', 'wanda', 'wanda-2:4'\]"
    ):
        prune(make_model(), "random", 0.5)
    with pytest.raises(ValueError, match="method='wanda' scores weights by input activations: pass calibration"):
        prune(make_model(), "wanda", 0.5)
    with pytest.raises(ValueError, match="2:4 pattern always removes exactly 0.5"):
        prune(make_model(), "2:4", 0.3)


def test_impossible_structured_pruning_is_rejected():
    model = make_model()  # 4 heads, hidden 32
    assert removable_heads(model.config) == [0, 2, 3]  # leaving 3 heads would not divide hidden_size=32
    with pytest.raises(ValueError, match=r"num_heads=4 cannot be removed from num_attention_heads=4.*allowed: \[0, 2"):
        prune_heads(model, 4, calibration_ids())
    with pytest.raises(ValueError, match=r"num_heads=1 .* allowed: \[0, 2, 3\]"):
        prune_heads(model, 1, calibration_ids())
    gqa = make_model(num_key_value_heads=2)
    with pytest.raises(ValueError, match="whole groups of 2 query heads"):
        prune_heads(gqa, 3, calibration_ids())
    with pytest.raises(ValueError, match=r"num_neurons=96 is not in \[0, intermediate_size=96\)"):
        prune_neurons(model, 96, calibration_ids())
    with pytest.raises(ValueError, match="alibi"):
        prune_heads(make_model(position_embedding="alibi"), 2, calibration_ids())
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 96  # untouched


# ---------------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------------
def test_script_writes_table_plot_and_a_reloadable_pruned_model(tiny_run_dir, tmp_path):
    results, out = tmp_path / "results", tmp_path / "pruned"
    figures = prune_script.main(
        [
            "--model",
            str(tiny_run_dir),
            "--results",
            str(results),
            "--out",
            str(out),
            "--sparsities",
            "0.5",
            "--recovery-steps",
            "2",
            "--batch-size",
            "2",
            "--calibration-blocks",
            "2",
            "--eval-blocks",
            "4",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    for name in ("pruning.md", "pruning.json", "pruning.png"):
        assert (results / name).stat().st_size > 0, name
    rows = figures["results"]
    assert {r["method"] for r in rows} == set(prune_script.ALL_METHODS)
    for r in rows:
        assert r["val_perplexity"] > 1 and r["recovered"]["val_perplexity"] > 1, r
        if r["method"] in ("magnitude", "wanda", "2:4", "wanda-2:4"):
            assert r["removed"] == 0.5, r
    table = (results / "pruning.md").read_text()
    assert "| dense | 0 |" in table and "| wanda-2:4 | 0.5 | 50.0% |" in table
    assert json.loads((results / "pruning.json").read_text())["results"] == json.loads(json.dumps(rows))

    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    assert pruned.config.num_attention_heads == 2 and pruned.config.intermediate_size < 96
    assert (out / "tokenizer.json").exists()
    assert logits(pruned, calibration_ids(1, 8)).shape == (1, 8, pruned.config.vocab_size)


def test_script_rejects_bad_arguments(tiny_run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--methods 'magnitude,random': \['random'\]; choose from"):
        prune_script.main(["--model", str(tiny_run_dir), "--methods", "magnitude,random"])
    with pytest.raises(ValueError, match=r"--sparsities '0.5,1.0': \[1.0\]; each must be in \(0, 1\)"):
        prune_script.main(["--model", str(tiny_run_dir), "--sparsities", "0.5,1.0"])
    with pytest.raises(FileNotFoundError, match="is not a pretraining run folder"):
        prune_script.main(["--model", str(tmp_path)])
