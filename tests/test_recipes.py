"""Shipped recipes parse into their configs and say what SPEC_RESA.md's Stage I says."""

from pathlib import Path

import pytest

from saetune.config import load_config, resolve_recipe
from saetune.errors import SaetuneError
from saetune.train_sae import TrainSAEConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "saetune" / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.stem for p in RECIPES} >= {"resa_stage1", "toy_stage1"}


@pytest.mark.parametrize("name", [p.stem for p in RECIPES])
def test_recipe_loads(name):
    cfg = load_config(TrainSAEConfig, name)
    assert cfg.hooks and cfg.batch_size > 0


def test_resa_stage1_matches_the_reference():
    cfg = load_config(TrainSAEConfig, "resa_stage1")
    assert cfg.hooks == ["model.layers.12"] and cfg.architecture == "topk"
    assert cfg.d_sae == [65536] and cfg.k == [32]
    assert cfg.optimizer == "signum_sf" and cfg.momentum == 0.95
    assert cfg.lr == pytest.approx(5e-3 / (65536 / 2**14) ** 0.5)
    assert cfg.batch_size == 16 * 2048 * 2 and cfg.context_size == 2048
    assert cfg.auxk_coef == 0 and cfg.dead_tokens == 10_000_000 and not cfg.shuffle
    assert cfg.template == "resa" and cfg.init_b_dec == "mean" and cfg.normalize_decoder


def test_flags_override_a_recipe():
    cfg = load_config(TrainSAEConfig, "toy_stage1", {"k": "8 4", "lr": "1e-3"})
    assert cfg.k == [8, 4] and cfg.lr == 1e-3


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(SaetuneError, match="resa_stage1"):
        resolve_recipe("no_such_recipe")
