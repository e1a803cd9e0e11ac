"""``saetune eval-sae`` end to end on the toy: SAELens, sparsify and train-sae-run layouts side by side in one
table, the CLI, and the bad inputs (each refused with a sentence naming the value, before any run dir exists)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saetune.errors import SaetuneError
from saetune.sae_eval import EvalSAEConfig, eval_sae
from saetune.sae import SAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "model.layers.2"
SMALL = dict(n_tokens=512, max_examples=40, progress=False, device="cpu", probe="off")


def _sae(d_in=128, d_sae=256, k=8, seed=0, hook=HOOK) -> SAE:
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, hook_name=hook, model_name="toy"), seed=seed)


@pytest.fixture(scope="module")
def saes(tmp_path_factory) -> dict[str, Path]:
    """One SAE in SAELens layout and the same SAE in sparsify layout (a dir named after its hook, as sparsify
    writes), and another inside a train-sae run dir (manifest.json + sae/)."""
    root = tmp_path_factory.mktemp("saes")
    same = _sae(seed=1)
    same.save(root / "saelens")
    same.save(root / "sparsify" / "layers.2", format="sparsify")
    run = root / "train-run"
    _sae(d_sae=128, k=4, seed=2).save(run / "sae")
    (run / "manifest.json").write_text(json.dumps({"stage": "train-sae", "status": "complete",
                                                   "inputs": {"model": {"path": "toy"}}}))
    return {"saelens": root / "saelens", "sparsify": root / "sparsify" / "layers.2", "run": run}


@pytest.fixture(scope="module")
def side_by_side(saes, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ev"
    cfg = EvalSAEConfig(sae=[str(saes["saelens"]), str(saes["sparsify"]), str(saes["run"])], **SMALL)
    return eval_sae(cfg, out), out


def test_three_layouts_side_by_side(saes, side_by_side, capsys):
    results, out = side_by_side
    labels = [str(saes[k]) for k in ("saelens", "sparsify", "run")]
    assert list(results) == labels
    assert json.loads((out / "results.json").read_text()) == results
    a, b, c = (results[k] for k in labels)
    assert a["hook"] == b["hook"] == c["hook"] == HOOK  # sparsify's 'layers.2' maps onto the block output
    assert (a["d_sae"], a["k"], c["d_sae"], c["k"]) == (256, 8, 128, 4)
    for key in ("ce_loss_score", "kl_div_score", "explained_variance", "fvu", "l0", "frac_alive",
                "log10_density_median"):
        assert a[key] == b[key], key  # one SAE, two layouts: the same numbers
    assert a["ce_loss_score"] != c["ce_loss_score"] and a["frac_alive"] != c["frac_alive"]  # another SAE: others
    assert a["l0"] == 8.0 and c["l0"] == 4.0 and 0 < a["frac_alive"] <= 1
    assert a["n_tokens"] == c["n_tokens"] > 0 and a["n_positions"] == 512
    assert a["definition"].startswith("SAEBench 0.5.0") and a["model"] == "toy"
    csv = (out / "quality.csv").read_text().splitlines()
    assert csv[0].split(",")[:6] == ["sae", "hook", "d_sae", "k", "L0", "EV"] and len(csv) == 4
    md = (out / "quality.md").read_text()
    assert all(lbl in md for lbl in labels) and "**kl_div_score**" in md
    from safetensors import safe_open
    with safe_open(str(out / "feature_density.safetensors"), "pt") as f:
        assert f.metadata() == {"sae0": labels[0], "sae1": labels[1], "sae2": labels[2]}
        dens = f.get_tensor("sae2")
    assert dens.shape == (128,) and float((dens > 0).float().mean()) == pytest.approx(c["frac_alive"], abs=1e-6)
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["stage"] == "eval-sae"
    assert {"model", *(f"sae:{lbl}" for lbl in labels)} <= set(man["inputs"])
    hist = c["density_histogram"]
    assert sum(hist["counts"]) + hist["dead"] == 128


def test_cli_prints_the_table(saes, tmp_path, capsys):
    from saetune.cli import main
    out = tmp_path / "cli"
    rc = main(["eval-sae", "--sae", str(saes["saelens"]), str(saes["run"]), "--n-tokens", "256",
               "--max-examples", "40", "--no-progress", "--device", "cpu", "--probe", "off", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "ce_loss_score" in printed and "kl_div_score" in printed and str(saes["run"]) in printed
    assert f"run dir: {out}" in printed and (out / "quality.md").exists()
    from saetune.pipeline import verb_api
    cls, fn = verb_api("eval-sae")
    assert cls is EvalSAEConfig and fn is eval_sae


def test_a_dir_of_several_hooks_gives_one_row_each(tmp_path):
    d = tmp_path / "multi"
    _sae(seed=3).save(d / "a")
    _sae(seed=4, hook="model.layers.1").save(d / "b")
    r = eval_sae(EvalSAEConfig(sae=[str(d)], model="toy", **{**SMALL, "n_tokens": 128}), tmp_path / "ev")
    assert list(r) == [f"{d}/a", f"{d}/b"] and [v["hook"] for v in r.values()] == [HOOK, "model.layers.1"]


# ---- bad inputs: refused with the value named, nothing written ----------------------------------------

def _refused(tmp_path, match: str, **kw) -> str:
    out = tmp_path / "never"
    with pytest.raises(SaetuneError, match=match) as e:
        eval_sae(EvalSAEConfig(**{**SMALL, **kw}), out)
    assert not out.exists()
    return str(e.value)


def test_sae_width_differs_from_the_hook(tmp_path):
    _sae(d_in=64, d_sae=128).save(tmp_path / "narrow")
    msg = _refused(tmp_path, "d_in=64", sae=[str(tmp_path / "narrow")])
    assert "width 128" in msg and HOOK in msg and "narrow" in msg


def test_a_hook_the_model_lacks(tmp_path):
    _sae().save(tmp_path / "s")
    msg = _refused(tmp_path, "model.layers.9", sae=[str(tmp_path / "s")], hook="model.layers.9")
    assert "--hook" in msg and "4 layers" in msg and "valid hook names" in msg
    _sae(hook="model.layers.7").save(tmp_path / "deep")
    msg = _refused(tmp_path, "model.layers.7", sae=[str(tmp_path / "deep")])
    assert "hook_name of the SAE" in msg and "deep" in msg


def test_an_empty_data_set(tmp_path):
    _sae().save(tmp_path / "s")
    (tmp_path / "empty.jsonl").write_text("")
    msg = _refused(tmp_path, "empty", sae=[str(tmp_path / "s")], dataset=str(tmp_path / "empty.jsonl"))
    assert "empty.jsonl" in msg
    (tmp_path / "tiny.jsonl").write_text(json.dumps({"text": "2 + 2"}) + "\n")
    _refused(tmp_path, "context_size=128", sae=[str(tmp_path / "s")], dataset=str(tmp_path / "tiny.jsonl"))


def test_k_larger_than_d_sae(tmp_path):
    d = tmp_path / "bad_k"
    _sae(d_sae=256, k=8).save(d)
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["k"] = 300
    (d / "cfg.json").write_text(json.dumps(cfg))
    msg = _refused(tmp_path, "k=300", sae=[str(d)])
    assert "d_sae=256" in msg and "bad_k" in msg


def test_missing_and_repeated_saes_and_bad_settings(tmp_path):
    with pytest.raises(SaetuneError, match="at least one SAE"):
        EvalSAEConfig(**SMALL)
    with pytest.raises(SaetuneError, match="n_tokens must be at least 1, got 0"):
        EvalSAEConfig(sae=["x"], **{**SMALL, "n_tokens": 0})
    _refused(tmp_path, "does not exist", sae=[str(tmp_path / "nowhere")])
    _sae().save(tmp_path / "s")
    _refused(tmp_path, "given twice", sae=[str(tmp_path / "s"), str(tmp_path / "s") + "/"])
    gt = _refused(tmp_path, "--ground-truth", sae=[str(tmp_path / "s")], ground_truth=str(tmp_path / "no_gt"))
    assert "no_gt" in gt


def test_an_sae_recording_no_model_needs_model(tmp_path):
    s = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=0)  # model_name ""
    s.save(tmp_path / "anon")
    msg = _refused(tmp_path, "--model", sae=[str(tmp_path / "anon")])
    assert "anon" in msg
    r = eval_sae(EvalSAEConfig(sae=[str(tmp_path / "anon")], model="toy", **{**SMALL, "n_tokens": 128}),
                 tmp_path / "ok")
    assert r[str(tmp_path / "anon")]["l0"] == 8.0
    assert torch.isfinite(torch.tensor(r[str(tmp_path / "anon")]["ce_loss_score"]))


# ---- the optional columns: sparse probing (saetune.probing) and a ground truth (saetune.ground_truth) ---------

def test_probe_columns_on_the_toy(saes, tmp_path, monkeypatch):
    """probe 'auto' probes the toy: each SAE gets probing.probe_summary's scalars of its own probe table, which
    the quality table shows (smallest and largest k, raw baseline). The probe itself (tens of seconds on the
    toy) is tested in test_probing; here a stand-in returns a table in its format, per SAE."""
    import pandas as pd
    from saetune import probing
    seen = []

    def fake(sae, model, tokenizer, hook, n_problems, seed):
        seen.append((sae.d_sae, hook, n_problems))
        acc = 0.5 + sae.d_sae / 1024
        return pd.DataFrame([{"concept": c, "k": k, "latents": [0], "mean_diffs": [0.1], "sae_acc": acc + k / 100,
                              "raw_acc": 0.9, "raw_topk_acc": 0.6, "n_train": 10, "n_test": 4}
                             for c in ("op_add", "is_check") for k in (1, 2, 5)])

    monkeypatch.setattr(probing, "sparse_probe_scores", fake)
    r = eval_sae(EvalSAEConfig(sae=[str(saes["saelens"]), str(saes["run"])], probe_problems=64,
                               **{**SMALL, "probe": "auto", "n_tokens": 128}), tmp_path / "ev")
    assert seen == [(256, HOOK, 64), (128, HOOK, 64)]
    a = r[str(saes["saelens"])]
    assert a["probe_acc_k1"] == pytest.approx(0.76) and a["probe_acc_k5"] == pytest.approx(0.8)
    assert a["probe_raw_acc"] == 0.9 and a["probe_n_concepts"] == 2
    head = (tmp_path / "ev" / "quality.csv").read_text().splitlines()[0].split(",")
    assert {"probe acc k=1", "probe acc k=5", "probe raw"} <= set(head)
    # which latents carry which concept, per SAE, as the explorer's SAE quality page reads it back
    from saetune.analysis.sae_quality_view import concept_frame
    c = concept_frame(tmp_path / "ev")
    assert sorted(set(c["sae"])) == sorted([str(saes["saelens"]), str(saes["run"])])
    assert len(c) == 4 and set(c["concept"]) == {"op_add", "is_check"} and set(c["latent"]) == {0}
    mine = c[c["sae"] == str(saes["saelens"])]
    assert mine["k1_acc"].tolist() == pytest.approx([0.76, 0.76]) and mine["sae_acc"].tolist() == pytest.approx([0.8, 0.8])


def test_which_models_count_as_the_toy(tiny_model_dir):
    """The toy task defines the probed concepts: probing is for the toy and models sharing its tokenizer."""
    from types import SimpleNamespace
    from transformers import AutoTokenizer
    from saetune.sae_eval import _is_toy
    assert _is_toy("toy", None) and _is_toy(str(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir))
    assert not _is_toy("gpt2", SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1}))


def test_ground_truth_mode(tmp_path):
    """--ground-truth: the SAEs are scored on the synthetic activations (no model, no CE/KL) and get
    ground_truth_scores' numbers under gt_; an SAE whose decoder rows are the true directions reaches MCC 1."""
    from saetune.ground_truth import GroundTruthConfig, ground_truth_scores, make_ground_truth, save_ground_truth
    data = make_ground_truth(GroundTruthConfig(num_features=24, hidden_dim=12, n_eval=512, hierarchy_roots=2,
                                               hierarchy_branching=2, hierarchy_depth=1, correlation_rank=2,
                                               orthogonalize_steps=10))
    save_ground_truth(data, tmp_path / "gt")
    exact = SAE(SAEConfig(d_in=12, d_sae=24, architecture="standard"))
    with torch.no_grad():
        exact.W_dec.copy_(data.feature_vectors)
        exact.W_enc.copy_(data.feature_vectors.t())
        exact.b_dec.copy_(data.bias)
        exact.b_enc.zero_()
    exact.save(tmp_path / "exact")
    SAE(SAEConfig(d_in=12, d_sae=48, k=3), seed=5).save(tmp_path / "random")
    r = eval_sae(EvalSAEConfig(sae=[str(tmp_path / "exact"), str(tmp_path / "random")],
                               ground_truth=str(tmp_path / "gt"), **{**SMALL, "probe": "auto"}), tmp_path / "ev")
    e, x = r[str(tmp_path / "exact")], r[str(tmp_path / "random")]
    assert e["gt_mcc"] == pytest.approx(1.0, abs=1e-5) and x["gt_mcc"] < 0.9
    want = ground_truth_scores(SAE.load(tmp_path / "random"), tmp_path / "gt")
    assert x["gt_f1_mean"] == want["f1_mean"] and x["gt_mcc"] == want["mcc"]
    # the core metrics on the same samples agree with the ground truth's own pooled EV and L0
    assert x["explained_variance_pooled"] == pytest.approx(want["explained_variance"], abs=1e-5)
    assert x["l0"] == pytest.approx(want["l0"], abs=1e-6) and x["n_tokens"] == 512
    assert "ce_loss_score" not in x and "hook" not in x
    head = (tmp_path / "ev" / "quality.csv").read_text().splitlines()[0].split(",")
    assert "MCC" in head and "F1" in head
    _sae().save(tmp_path / "wide")  # d_in 128: the toy's width, not the data's
    msg = _refused(tmp_path, "hidden_dim 12", sae=[str(tmp_path / "wide")], ground_truth=str(tmp_path / "gt"))
    assert "d_in=128" in msg and "wide" in msg
    with pytest.raises(SaetuneError, match="--model / --hook do not apply"):
        EvalSAEConfig(sae=["x"], ground_truth=str(tmp_path / "gt"), model="toy")

