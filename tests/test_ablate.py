"""training/ablate.py's bookkeeping: variant overrides, seeds, the spread over seeds and the beyond-noise mark. The
runs themselves are exercised tiny in tests/test_docs.py::test_ablate_runs_tiny."""

from pathlib import Path

import pytest

from training import ablate, pretrain


def test_a_variant_sets_config_fields_and_pretraining_options():
    base = pretrain.PretrainOptions(set=["hidden_size=32"])
    options = ablate.variant_options(
        base, ["qk_norm=true", "--optimizer=muon", "--muon-lr=0.04", "--schedule=wsd"], out=Path("x"), seed=2
    )
    assert options.set == ["hidden_size=32", "qk_norm=true"] and base.set == ["hidden_size=32"]
    assert (options.optimizer, options.muon_lr, options.schedule, options.seed) == ("muon", 0.04, "wsd", 2)
    with pytest.raises(ValueError, match="'no_such' is not a pretraining option"):
        ablate.variant_options(base, ["--no-such=1"])


def test_every_recipe_piece_is_added_to_the_muon_baseline_and_builds():
    recipe = ablate.STUDIES["recipe"]
    assert next(iter(recipe)) == "muon" and recipe["adamw"] == []
    for name, overrides in recipe.items():
        assert name == "adamw" or overrides[0] == "--optimizer=muon"
        options = ablate.variant_options(pretrain.PretrainOptions(), overrides)
        pretrain.check_options(options)
        pretrain.parse_overrides(options.set)


def test_seeds_parse_and_bad_ones_are_named():
    assert ablate.chosen_seeds(None, 7) == [7] and ablate.chosen_seeds("0,1,2", 7) == [0, 1, 2]
    for bad in ("0,a", "1,1", ""):
        with pytest.raises(ValueError, match="--seeds"):
            ablate.chosen_seeds(bad, 0)


def test_a_gap_is_beyond_noise_only_past_the_sum_of_the_spreads():
    assert ablate.spread([1.0, 2.0, 3.0]) == (2.0, 1.0) and ablate.spread([4.0]) == (4.0, None)

    def figures(bpb, std):
        return {"val_bits_per_byte": bpb, "val_bits_per_byte_std": std}

    assert ablate.compare(figures(2.0, 0.02), figures(1.9, 0.03)) == {
        "delta_bits_per_byte": -0.1,
        "beyond_noise": True,
    }
    assert ablate.compare(figures(2.0, 0.06), figures(1.9, 0.05))["beyond_noise"] is False
    assert ablate.compare(figures(2.0, None), figures(1.9, None))["beyond_noise"] is None  # one seed: no verdict
    assert ablate.delta_cell({"delta_bits_per_byte": -0.1, "beyond_noise": True}) == "**-0.100** ✓"
    assert ablate.delta_cell({"delta_bits_per_byte": 0.01, "beyond_noise": False}) == "+0.010 (noise)"


def test_variants_pick_rows_of_the_studies_in_their_order():
    assert ablate.chosen_variants(["mlp"], None) == {"mlp": list(ablate.STUDIES["mlp"])}
    picked = ablate.chosen_variants(["mlp", "recipe"], "adamw,relu2,muon")
    assert picked == {"mlp": ["relu2"], "recipe": ["muon", "adamw"]}
    with pytest.raises(ValueError, match=r"--variants 'swish': \['swish'\]"):
        ablate.chosen_variants(["mlp"], "swish")
