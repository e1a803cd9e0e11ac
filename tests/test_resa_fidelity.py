"""Fidelity to the Resa reference (SPEC_RESA.md): the training text byte for byte, the fine-tuned
SAE's b_dec re-centred on the first batch, no held-out split in the recipes that reproduce the
paper, the reference's global batch under every launcher shown, and the bf16 KL variant."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saetune.config import load_config, read_yaml
from saetune.data import R1_ZERO_SYSTEM, DataConfig, record_texts, resa_text
from saetune.errors import SaetuneError
from saetune.sae import SAE, SAEConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "saetune" / "recipes"
RESA_RECIPES = sorted(RECIPES.glob("resa_*.yaml"))
REFERENCE_GLOBAL_BATCH = 2  # Stage II: 1 sequence per GPU × 2 GPUs

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- 1. training text -------------------------------------------------------------------------

# SPEC_RESA.md's text for one record, written out by hand: SYSTEM opens with a newline and each of
# its five lines ends with one; then "User:\n {problem}\n\nAssistant:\n <think> {answer} </think>\n…".
EXPECTED_TEXT = (
    "\n"
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "The assistant first thinks about the reasoning process in the mind and then provides the user\n"
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and\n"
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think>\n"
    "<answer> answer here </answer>.\n"
    "User:\n"
    " What is $3 \\times 4$?\n"
    "\n"
    "Assistant:\n"
    " <think> 12 </think>\n"
    "<answer> Answer: 12</answer>"
)


def test_resa_text_is_the_reference_text_byte_for_byte():
    text = resa_text("What is $3 \\times 4$?", "12")
    assert text.encode("utf-8") == EXPECTED_TEXT.encode("utf-8")
    assert R1_ZERO_SYSTEM.startswith("\n") and R1_ZERO_SYSTEM.count("\n") == 6
    assert not any(line.endswith(" ") for line in R1_ZERO_SYSTEM.split("\n"))


def test_problem_falls_back_to_question_then_prompt():
    cfg = DataConfig(dataset="x.jsonl", template="resa")  # problem_field: the default 'problem'
    rows = [{"problem": "What is $3 \\times 4$?", "question": "no", "answer": "12"},
            {"question": "What is $3 \\times 4$?", "prompt": "no", "answer": "12"},
            {"prompt": "What is $3 \\times 4$?", "answer": "12"},
            {"problem": None, "question": "What is $3 \\times 4$?", "answer": "12"}]
    assert record_texts(rows, cfg) == [EXPECTED_TEXT] * 4
    with pytest.raises(SaetuneError, match="no field 'problem'"):
        record_texts([{"answer": "12"}], cfg)
    with pytest.raises(SaetuneError, match="field 'question' is empty"):
        record_texts([{"question": " ", "answer": "12"}], cfg)
    # an explicit problem_field is read as named, with no fallback
    with pytest.raises(SaetuneError, match="no field 'q'"):
        record_texts([{"question": "P", "answer": "1"}], DataConfig(dataset="x.jsonl", template="resa",
                                                                    problem_field="q"))


def test_other_users_of_the_system_prompt_take_the_constant():
    from saetune.generation import render_prompt

    assert render_prompt(None, "P", "r1zero") == R1_ZERO_SYSTEM + "User:\n P\n\nAssistant:\n <think>"
    src = (ROOT / "analysis" / "reasoning_features.py").read_text(encoding="utf-8")
    assert "prompt or R1_ZERO_SYSTEM" in src and "A conversation between" not in src


# ---- 2. fine-tuned SAE mode: b_dec re-centred on the first batch ------------------------------------

HOOK, BATCH = "model.layers.2", 256


def _pretrained_sae(path: Path) -> SAE:
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=5)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(128, generator=torch.Generator().manual_seed(1)) * 3.0)
        sae.b_enc.copy_(torch.randn(256, generator=torch.Generator().manual_seed(2)) * 0.1)
    sae.save(path)
    return SAE.load(path)


def _first_step_b_dec(monkeypatch, store: Path, out: Path, **kw) -> tuple[dict, dict]:
    """Train one step from the pretrained SAE; return the SAE's tensors as the first step begins
    (after the set-up, before any optimiser step) and results.json."""
    import saetune.sae_trainer as train_mod

    seen: dict[str, torch.Tensor] = {}
    real_step = train_mod.SAETrainer.step

    def spy(self, x, autocast):
        if not seen:
            seen.update({k: v.detach().clone() for k, v in self.sae.state_tensors().items()})
        return real_step(self, x, autocast)

    monkeypatch.setattr(train_mod.SAETrainer, "step", spy)
    cfg = train_mod.TrainSAEConfig(model="toy", activations=str(store), hooks=[HOOK], k=[8], batch_size=BATCH,
                                   max_steps=1, eval_seqs=0, checkpoint_every=0, device="cpu", progress=False,
                                   init_from=str(out.parent / "pretrained"), **kw)
    train_mod.train_sae(cfg, out=out)
    return seen, json.loads((out / "results.json").read_text())[HOOK]


def test_fine_tuned_sae_b_dec_is_the_first_batch_mean(toy_store, tmp_path, monkeypatch):
    from saetune.activations import ActivationStore

    pre = _pretrained_sae(tmp_path / "pretrained")
    mean = next(ActivationStore(toy_store).iter_batches([HOOK], BATCH, shuffle=False))[HOOK].float().mean(0)
    assert (mean - pre.b_dec).abs().max() > 1.0  # keeping the pretrained b_dec could not pass

    seen, results = _first_step_b_dec(monkeypatch, toy_store, tmp_path / "recentred")
    torch.testing.assert_close(seen["b_dec"], mean, atol=1e-5, rtol=0)
    for name in ("W_enc", "b_enc", "W_dec"):  # the other weights are the pretrained SAE's
        torch.testing.assert_close(seen[name], getattr(pre, name).detach(), atol=0, rtol=0)
    assert results["b_dec_init"] == "first-batch mean (re-centred from the pretrained SAE)"
    manifest = json.loads((tmp_path / "recentred" / "manifest.json").read_text())
    assert json.dumps(manifest).count("re-centred from the pretrained SAE") >= 1

    seen, results = _first_step_b_dec(monkeypatch, toy_store, tmp_path / "kept", init_b_dec="keep")
    torch.testing.assert_close(seen["b_dec"], pre.b_dec.detach(), atol=0, rtol=0)
    assert results["b_dec_init"] == "pretrained (kept)"


# ---- 3. no held-out split in the recipes that reproduce the paper ----------------------------------

def _resa_stage_configs() -> list[tuple[str, object]]:
    from saetune.pipeline import load_pipeline
    from saetune.sae_trainer import TrainSAEConfig
    from saetune.tuning import TuneConfig

    per_verb = {"resa_stage1": TrainSAEConfig, "resa_stage2": TuneConfig}
    out = []
    for path in RESA_RECIPES:
        if "stages" in read_yaml(path):
            _, stages = load_pipeline(path, "/runs/x")
            out += [(f"{path.stem}:{s.name}", s.cfg) for s in stages if s.verb in ("train-sae", "tune")]
        else:
            cls = per_verb[path.stem]  # a new per-verb Resa recipe: add it here
            out.append((path.stem, load_config(cls, path, {"sae": "x"} if cls is TuneConfig else None)))
    return out


def test_resa_recipes_train_on_every_sequence():
    configs = _resa_stage_configs()
    names = {n for n, _ in configs}
    assert {"resa_stage1", "resa_stage2", "resa_still_v5:sae", "resa_still_v5:tune"} <= names
    held = {n: c.eval_seqs for n, c in configs if c.eval_seqs}
    assert not held, f"these Resa recipes hold data out of training: {held}"


def test_resa_pipelines_evaluate_with_the_reference_preset():
    from saetune.pipeline import load_pipeline

    evals = {}
    for path in RESA_RECIPES:
        if "stages" in read_yaml(path):
            _, stages = load_pipeline(path, "/runs/x")
            evals.update({path.stem: s.cfg for s in stages if s.verb == "eval"})
    assert set(evals) == {"resa_still_v5", "resa_deepscaler_v3", "resa_modularity"}
    wrong = {n: c.preset for n, c in evals.items() if c.preset != "resa"}
    assert not wrong, f"these Resa pipelines would grade unlike the paper: {wrong}"


# ---- 4. the reference's global batch under every launcher shown ------------------------------------

def _launches() -> list[tuple[str, int, dict]]:
    """(where, processes, overrides) of every ``tune --config resa_stage2`` command that README.md or
    an accelerate config's header shows."""
    cmds = []
    readme = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    cmds += [(f"README.md: {line.strip()[:60]}", line) for line in readme.splitlines()
             if "resa_stage2" in line and re.match(r"(saetune|torchrun|accelerate) ", line.strip())]
    for cfg in sorted((RECIPES / "accelerate").glob("*.yaml")):
        head = [ln.lstrip("# ") for ln in cfg.read_text().splitlines() if ln.startswith("#")]
        cmds += [(f"{cfg.name} header", ln.replace(cfg.name, str(cfg))) for ln in head if "resa_stage2" in ln]
    out = []
    for where, line in cmds:
        words = shlex.split(line.split("#")[0])
        flag = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
        if "--nproc_per_node" in flag:
            world = int(flag["--nproc_per_node"])
        elif "--num_processes" in flag:
            world = int(flag["--num_processes"])
        elif "--config_file" in flag:
            acc = flag["--config_file"]
            acc = acc if Path(acc).is_absolute() else str(ROOT / acc)
            world = int(read_yaml(acc)["num_processes"])
        else:
            world = 1
        over = {"sae": "x"}
        if "--batch-size" in flag:
            over["batch_size"] = int(flag["--batch-size"])
        out.append((where, world, over))
    return out


def test_every_shown_launch_of_resa_stage2_gives_the_reference_global_batch():
    from saetune.tuning import TuneConfig, per_process_batch

    launches = _launches()
    assert len(launches) >= 4 and any("header" in w for w, _, _ in launches)
    for where, world, over in launches:
        cfg = load_config(TuneConfig, "resa_stage2", over)
        assert world * per_process_batch(cfg, world) == REFERENCE_GLOBAL_BATCH, where
    from saetune.pipeline import load_pipeline
    for name in ("resa_still_v5", "resa_deepscaler_v3", "resa_modularity"):  # run in one process
        _, stages = load_pipeline(name, "/runs/x")
        tune_cfg = next(s.cfg for s in stages if s.verb == "tune")
        assert per_process_batch(tune_cfg, 1) == REFERENCE_GLOBAL_BATCH, name


def test_a_batch_size_that_changes_the_global_batch_is_refused():
    from saetune.tuning import TuneConfig, per_process_batch

    cfg = load_config(TuneConfig, "resa_stage2", {"sae": "x"})
    assert cfg.global_batch == REFERENCE_GLOBAL_BATCH
    assert [per_process_batch(cfg, w) for w in (1, 2)] == [2, 1]
    two = load_config(TuneConfig, "resa_stage2", {"sae": "x", "batch_size": 2})
    assert per_process_batch(two, 1) == 2
    with pytest.raises(SaetuneError, match=r"global batch of 4 .* global_batch is 2.*--batch-size 1\b"):
        per_process_batch(two, 2)
    with pytest.raises(SaetuneError, match="does not divide over 4 processes"):
        per_process_batch(cfg, 4)
    # without global_batch nothing is checked: world × batch_size, as before
    free = TuneConfig(sae="x", batch_size=3)
    assert per_process_batch(free, 2) == 3
    with pytest.raises(SaetuneError, match="batch_size must be at least 1"):
        TuneConfig(sae="x", batch_size=0)


def test_tune_refuses_the_mismatch_before_touching_the_run_dir(tmp_path, monkeypatch):
    from saetune.tuning import TuneConfig, tune

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun / accelerate launch with 2 processes
    cfg = load_config(TuneConfig, "resa_stage2", {"sae": "x", "batch_size": 2})
    with pytest.raises(SaetuneError, match=r"--batch-size 1\b"):
        tune(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- 5. the KL's dtype ---------------------------------------------------------------------------------

def _kl_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, d, v = 11, 13, 123  # odd shapes, several blocks of 4 positions
    h_t = torch.randn(n, d, generator=g)
    h_s = (h_t + 0.5 * torch.randn(n, d, generator=g)).requires_grad_()
    w = torch.randn(v, d, generator=g) * 0.5
    b = torch.randn(v, generator=g) * 0.1
    return h_t, h_s, w, b


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_kl_from_hidden_equals_a_direct_kl_div_in_that_dtype(dtype, tol):
    from saetune.distill import kl_from_hidden

    h_t, h_s, w, b = _kl_inputs()
    got = kl_from_hidden(h_t, h_s, w, b, chunk=4, dtype=dtype)
    got.backward()
    g_got = h_s.grad.clone()

    h_s.grad = None
    log_q = F.log_softmax(h_s.to(dtype) @ w.to(dtype).t() + b.to(dtype), dim=-1)  # the reference's computation
    p = F.softmax(h_t.to(dtype) @ w.to(dtype).t() + b.to(dtype), dim=-1)
    ref = F.kl_div(log_q, p, reduction="sum")
    assert ref.dtype == dtype
    ref.backward()
    torch.testing.assert_close(got, ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(g_got, h_s.grad.float(), rtol=tol, atol=tol * h_s.grad.abs().max().item())


def test_bf16_kl_differs_from_fp32_and_is_a_tune_switch():
    from saetune.distill import kl_from_hidden
    from saetune.tuning import TuneConfig

    h_t, h_s, w, b = _kl_inputs(1)
    a = kl_from_hidden(h_t, h_s, w, b, dtype=torch.float32)
    c = kl_from_hidden(h_t, h_s, w, b, dtype=torch.bfloat16)
    assert a != c and torch.isclose(a, c, rtol=3e-2)
    assert TuneConfig(sae="x").kl_dtype == "float32"  # more exact than the reference; bf16 on request
    with pytest.raises(SaetuneError, match="kl_dtype"):
        TuneConfig(sae="x", kl_dtype="float16")


def test_tune_takes_the_derived_batch_and_the_kl_dtype(tmp_path, monkeypatch):
    import saetune.tuning as tuning

    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=0).save(tmp_path / "sae")
    dtypes = []
    real = tuning.kl_from_hidden

    def spy(*a, dtype=torch.float32, **kw):
        dtypes.append(dtype)
        return real(*a, dtype=dtype, **kw)

    monkeypatch.setattr(tuning, "kl_from_hidden", spy)
    cfg = load_config(tuning.TuneConfig, "toy_tune", {"sae": str(tmp_path / "sae"), "max_steps": 1,
                                                      "max_examples": 100, "eval_seqs": 0, "global_batch": 2,
                                                      "batch_size": 0, "kl_dtype": "bfloat16", "progress": False})
    tuning.tune(cfg, tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["global_batch"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens"] == 2 * cfg.context_size
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert re.search(r"batch_size: 0\b", (tmp_path / "run" / "config.yaml").read_text())


# ---- the reasoning-feature rule: the page and the README state the threshold they speak of ------------

def _records(*features):
    return {"hooks": {"model.layers.2": {"layer": 2, "d_sae": 8, "features": [list(f) for f in features]}}}


def test_passing_bands_are_exactly_where_the_rule_holds():
    import numpy as np

    from saetune.analysis.reasoning_features import is_reasoning, passing_bands, reasoning_counts
    # feature 1: silent elsewhere (passes from 0); 2: passes only for 0.4 ≤ τ < 0.5; 3: never (other ≥ tags)
    recs = _records((1, 0.9, 0.7, 0.0), (2, 0.5, 0.6, 0.4), (3, 0.4, 0.5, 0.45))
    bands = passing_bands(recs)
    assert bands[["feature", "tau_from", "tau_to"]].values.tolist() == [[1, 0.0, 0.7], [2, 0.4, 0.5]]
    for tau in np.linspace(0, 1, 101):  # the bands agree with the rule at every τ
        expect = sum(is_reasoning(o, c, x, tau) for _, o, c, x in recs["hooks"]["model.layers.2"]["features"])
        inside = sum(b.tau_from <= tau < b.tau_to for b in bands.itertuples())
        assert int(reasoning_counts(recs, tau)["count"].sum()) == expect == inside


def test_the_page_says_the_threshold_and_where_features_pass(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "features" / "features").mkdir(parents=True)
    (tmp_path / "features" / "manifest.json").write_text(json.dumps({"stage": "features", "status": "complete"}))
    (tmp_path / "features" / "features" / "reasoning.json").write_text(json.dumps(
        {**_records((2, 0.5, 0.6, 0.4), (3, 0.4, 0.5, 0.45)), "threshold": 0.0}))
    monkeypatch.setenv("SAETUNE_RUN_DIR", str(tmp_path))
    at = AppTest.from_file(str(root / "app" / "pages" / "3_Reasoning_features.py"), default_timeout=60).run()
    text = " ".join(m.value for m in at.markdown)
    assert "0 reasoning features at τ = 0" in text and "feature 2 at `model.layers.2` for 0.4 ≤ τ < 0.5" in text
    at.slider(key="threshold").set_value(0.45).run()
    assert "1 reasoning feature at τ = 0.45" in " ".join(m.value for m in at.markdown)
