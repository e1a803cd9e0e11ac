"""Shipped recipes parse into their configs and say what SPEC_RESA.md says; pipeline recipes
resolve every stage (they need a GPU and the hub to run, so CI only resolves them)."""

from pathlib import Path

import pytest

from saetune.config import load_config, read_yaml, resolve_recipe
from saetune.errors import SaetuneError
from saetune.pipeline import load_pipeline, run_pipeline
from saetune.rl.trainer import RLConfig
from saetune.sae_trainer import TrainSAEConfig
from saetune.tuning import TuneConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "saetune" / "recipes").glob("*.yaml"))
PER_VERB = {"resa_stage1": TrainSAEConfig, "toy_stage1": TrainSAEConfig, "resa_stage2": TuneConfig,
            "toy_tune": TuneConfig, "toy_rl": RLConfig}
PIPELINES = {"resa_still_v5", "resa_deepscaler_v3", "resa_modularity"}


def test_every_recipe_is_known():
    assert {p.stem for p in RECIPES} == set(PER_VERB) | PIPELINES


@pytest.mark.parametrize("name", sorted(PER_VERB))
def test_recipe_loads(name):
    cfg = load_config(PER_VERB[name], name, {"sae": "some/sae"} if PER_VERB[name] is TuneConfig else None)
    assert cfg.context_size > 0


def test_resa_stage1_matches_the_reference():
    cfg = load_config(TrainSAEConfig, "resa_stage1")
    assert cfg.hooks == ["model.layers.12"] and cfg.architecture == "topk"
    assert cfg.d_sae == [65536] and cfg.k == [32]
    assert cfg.optimizer == "signum_sf" and cfg.momentum == 0.95
    assert cfg.lr == pytest.approx(5e-3 / (65536 / 2**14) ** 0.5)
    assert cfg.batch_size == 16 * 2048 * 2 and cfg.context_size == 2048
    assert cfg.auxk_coef == 0 and cfg.dead_tokens == 10_000_000 and not cfg.shuffle
    assert cfg.template == "resa" and cfg.init_b_dec == "mean" and cfg.normalize_decoder


def test_resa_stage2_matches_the_reference():
    cfg = load_config(TuneConfig, "resa_stage2", {"sae": "x"})
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (32, 128, 0.05)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cfg.loss == "kl" and cfg.stop_grad and not cfg.error_term and cfg.exact_prefix
    assert cfg.lr == 1e-6 and cfg.weight_decay == 0.01 and cfg.grad_clip == 1.0 and cfg.lr_schedule == "constant"
    assert cfg.epochs == 2 and cfg.context_size == 2048 and cfg.model_dtype == "bfloat16"
    assert cfg.hook == "model.layers.12" and cfg.template == "resa" and cfg.checkpoint_every == 500
    # the tuning defaults are the reference's too
    d = TuneConfig(sae="x")
    assert (d.lora_r, d.lora_alpha, d.lr, d.loss, d.stop_grad, d.error_term) == (32, 128, 1e-6, "kl", True, False)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_recipe_resolves(name, tmp_path):
    data, stages = load_pipeline(name, tmp_path)
    assert data["expected"] and stages[0].verb == "train-sae" and stages[-1].verb == "eval"
    by = {s.name: s for s in stages}
    assert by["tune"].cfg.sae == str(tmp_path / "sae")
    assert stages[-1].cfg.model == str(tmp_path / stages[-2].name)
    assert stages[-1].cfg.benchmarks == ["aime24", "aime25", "amc23", "math500", "minerva"]
    assert stages[-1].cfg.temperature == 0.6 and stages[-1].cfg.top_p == 0.95


def test_modularity_moves_the_adapter_to_r1():
    _, stages = load_pipeline("resa_modularity", "/x")
    by = {s.name: s for s in stages}
    assert by["tune"].cfg.model == "Qwen/Qwen2.5-Math-1.5B"
    assert by["attach"].cfg.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and by["attach"].cfg.adapter == "/x/tune"


def test_still_v5_expected_numbers_are_the_papers():
    data = read_yaml(resolve_recipe("resa_still_v5"))
    assert data["expected"]["aime24"] == 33.33 and data["expected"]["avg_with_gpqa"] == 48.06


def test_bad_pipelines_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: a, verb: tune, set: {sae: '{later}'}}\n")
    with pytest.raises(SaetuneError, match=r"refers to \{later\}, which is not an earlier stage"):
        load_pipeline(bad, tmp_path / "out")
    bad.write_text("stages:\n  - {name: a, verb: fly}\n")
    with pytest.raises(SaetuneError, match="unknown pipeline verb 'fly'"):
        load_pipeline(bad, tmp_path / "out")
    with pytest.raises(SaetuneError, match="not a pipeline recipe"):
        load_pipeline("toy_tune", tmp_path / "out")


def test_a_toy_pipeline_runs_and_resumes(tmp_path):
    sae_dir = tmp_path / "sae"
    from saetune.sae import SAE, SAEConfig
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=0).save(sae_dir)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"""
pipeline: toy-check
stages:
  - name: tune
    verb: tune
    config: toy_tune
    set: {{sae: "{sae_dir}", max_steps: 2, max_examples: 100, eval_seqs: 2, progress: false}}
  - name: merge
    verb: merge
    set: {{adapter: "{{tune}}"}}
""")
    summary = run_pipeline(recipe, tmp_path / "out")
    assert set(summary["seconds"]) == {"tune", "merge"}
    assert (tmp_path / "out" / "merge" / "merged" / "README.md").exists()
    again = run_pipeline(recipe, tmp_path / "out", resume=True)
    assert again["seconds"] == {}  # both complete: kept
    with pytest.raises(SaetuneError, match="not empty"):
        run_pipeline(recipe, tmp_path / "out")


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(SaetuneError, match="resa_stage1"):
        resolve_recipe("no_such_recipe")


def test_flags_override_a_recipe():
    cfg = load_config(TrainSAEConfig, "toy_stage1", {"k": "8 4", "lr": "1e-3"})
    assert cfg.k == [8, 4] and cfg.lr == 1e-3
