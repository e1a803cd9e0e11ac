"""saetune.fit_sae: train-sae's trainer on in-memory data — the same weights as train-sae on the same
batches, tensors and iterables alike, recovery of a planted sparse dictionary, and clear input errors."""

from __future__ import annotations

import os

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

from pathlib import Path

import pytest
import torch

import saetune
from saetune.activations import ActivationStore, CacheConfig, cache
from saetune.errors import SaetuneError
from saetune.fit import FIT_OPTIONS, evaluate_sae, fit_sae
from saetune.runs import read_metrics
from saetune.sae import SAE, SAEConfig
from saetune.sae_trainer import TrainSAEConfig, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: no thread spin-waits

HOOK = "model.layers.1"
BATCH, STEPS = 64, 5


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit_store") / "cache"
    cache(CacheConfig(model=str(tiny_model_dir), hooks=[HOOK], context_size=32, max_examples=40, seqs_per_shard=4,
                      dtype="float32", device="cpu", progress=False), out=out)
    return out


def store_rows(store: Path) -> torch.Tensor:
    """Every activation of the store, in the order train-sae reads it without shuffling."""
    s = ActivationStore(store)
    return torch.cat([s.load_shard(i, HOOK)[HOOK] for i in range(len(s.shards))])


def planted(n: int = 4096, d: int = 16, atoms: int = 32, active: int = 3, seed: int = 0):
    """x = Σ of ``active`` random unit atoms per row with weights in [0.5, 1.5]: (x, atoms [atoms, d])."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n, atoms).scatter(1, idx, 0.5 + torch.rand(n, active, generator=g))
    return codes @ D, D


# ---- the same trainer as train-sae -------------------------------------------------------------------

CASES = {  # architecture, SAEConfig extras, trainer options (each also a train-sae flag)
    "topk-signum_sf": ("topk", {}, {}),
    "topk-adam-warmup-auxk": ("topk", {}, {"optimizer": "adam", "warmup_steps": 3, "auxk_coef": 1 / 32,
                                             "dead_tokens": 64, "auxk_k": 8}),
    "matryoshka-adam": ("matryoshka_batchtopk", {"matryoshka_widths": [8, 24, 64]}, {"optimizer": "adam"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_train_sae_on_the_same_batches(case, tiny_model_dir, store, tmp_path):
    arch, sae_extra, opts = CASES[case]
    out = tmp_path / "run"
    tc = TrainSAEConfig(model=str(tiny_model_dir), activations=str(store), hooks=[HOOK], architecture=arch,
                        d_sae=[64], k=[4], matryoshka_widths=sae_extra.get("matryoshka_widths", []),
                        batch_size=BATCH, max_steps=STEPS, log_every=1, checkpoint_every=0, eval_seqs=0, device="cpu",
                        progress=False, seed=3, **opts)
    train_sae(tc, out=out)
    ref = SAE.load(out)
    rows = read_metrics(out)

    x = store_rows(store)
    sae, m = fit_sae(x, SAEConfig(d_in=x.shape[1], d_sae=64, k=4, architecture=arch, **sae_extra),
                     batch_size=BATCH, max_steps=STEPS, seed=3, device="cpu", progress=False, **opts)
    assert not sae.training
    for name, t in ref.state_tensors().items():
        assert torch.equal(sae.state_tensors()[name], t), name
    assert [h["step"] for h in m["history"]] == [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [h["tokens"] for h in m["history"]] == [r["tokens"] for r in rows]
    for h, r in zip(m["history"], rows):
        for key in ("loss", "fvu", "l0", "dead_frac"):
            assert h[key] == pytest.approx(r[key], abs=2e-6), key
    if "auxk_coef" in opts:
        assert any("auxk" in h for h in m["history"])  # AuxK really ran (latents went dead after 64 tokens)
    assert m["steps"] == STEPS and m["train_tokens"] == STEPS * BATCH


def test_iterable_of_batches_equals_tensor(store):
    x = store_rows(store)[: 6 * BATCH]
    cfg = SAEConfig(d_in=x.shape[1], d_sae=48, k=4)
    ref, m_ref = fit_sae(x, cfg, batch_size=BATCH, progress=False, device="cpu")
    as_list, m_list = fit_sae(list(x.split(BATCH)), cfg, progress=False, device="cpu")  # batches as they come
    recut, m_recut = fit_sae((b for b in x.split(40)), cfg, batch_size=BATCH, progress=False, device="cpu")
    for sae in (as_list, recut):
        for name, t in ref.state_tensors().items():
            assert torch.equal(sae.state_tensors()[name], t), name
    assert m_ref["steps"] == m_list["steps"] == m_recut["steps"] == 6
    # the final metrics: the whole tensor, the list again, and a one-shot generator's last batch
    assert (m_ref["eval_on"], m_list["eval_on"], m_recut["eval_on"]) == ("data", "data (again)", "last batch")
    assert m_list["fvu"] == pytest.approx(m_ref["fvu"], rel=1e-6)
    assert m_recut["eval_tokens"] == BATCH
    # max_steps stops an iterable early
    _, m3 = fit_sae(iter(list(x.split(BATCH))), cfg, max_steps=3, progress=False, device="cpu")
    assert m3["steps"] == 3


def test_final_metrics_on_holdout_and_eval_data():
    x, _ = planted(n=1000)
    cfg = SAEConfig(d_in=16, d_sae=32, k=3)
    sae, m = fit_sae(x, cfg, batch_size=100, holdout=0.1, progress=False, device="cpu")
    assert m["eval_on"] == "holdout" and m["eval_tokens"] == 100 and m["steps"] == 9  # 900 rows train
    held = x[-100:]
    with torch.no_grad():
        f = sae.encode(held)
        x_hat = sae.decode(f)
    want_fvu = float((x_hat - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    assert m["fvu"] == pytest.approx(want_fvu, rel=1e-5)
    assert m["l0"] == pytest.approx(float((f > 0).sum(1).float().mean()), rel=1e-6)
    assert m["dead_frac"] == pytest.approx(float((~(f > 0).any(0)).float().mean()))
    _, m2 = fit_sae(x, cfg, batch_size=100, eval_data=held, progress=False, device="cpu")
    assert m2["eval_on"] == "eval_data" and m2["eval_tokens"] == 100 and m2["steps"] == 10


def test_evaluate_sae_batches_equal_one_batch():
    x, _ = planted(n=300)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=3), seed=1).eval()
    one = evaluate_sae(sae, [x])
    many = evaluate_sae(sae, x.split(7))
    for key in ("fvu", "mse", "l0", "dead_frac"):
        assert many[key] == pytest.approx(one[key], rel=1e-9), key


def test_recovers_a_planted_sparse_dictionary():
    """32 unit atoms in 16 dims, 3 active per row: FVU falls far below 1 and most atoms are found (a
    decoder row with cosine > 0.9), 300 steps: 19 passes over 4096 rows."""
    x, atoms = planted()
    sae, m = fit_sae(x, SAEConfig(d_in=16, d_sae=64, k=3), batch_size=256, max_steps=300, optimizer="adam",
                     lr=1e-2, seed=0, progress=False, device="cpu")
    assert m["history"][0]["fvu"] > 0.4
    assert m["fvu"] < 0.12, m["fvu"]  # 0.081 when written, all 32 atoms found
    cos = (atoms @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T.detach()).max(1).values
    assert (cos > 0.9).float().mean() > 0.8, cos


def test_lazy_export_and_an_sae_trains_in_place():
    assert saetune.fit_sae is fit_sae
    x, _ = planted(n=512)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=3), seed=0)
    before = sae.W_enc.detach().clone()
    out, m = fit_sae(x, sae, batch_size=128, progress=False, device="cpu")
    assert out is sae and not torch.equal(sae.W_enc.detach(), before) and m["steps"] == 4


def test_progress_bar(capsys):
    x, _ = planted(n=256)
    fit_sae(x, SAEConfig(d_in=16, d_sae=32, k=3), batch_size=128, progress=True, device="cpu")
    assert "fit_sae" in capsys.readouterr().err
    fit_sae(x, SAEConfig(d_in=16, d_sae=32, k=3), batch_size=128, progress=False, device="cpu")
    assert "fit_sae" not in capsys.readouterr().err


# ---- bad input --------------------------------------------------------------------------------------

CFG = SAEConfig(d_in=16, d_sae=32, k=3)


@pytest.mark.parametrize("data,match", [
    (torch.zeros(0, 16), r"empty \(shape \(0, 16\)\)"),
    (torch.zeros(64, 12), r"width 12.*d_in is 16"),
    (torch.zeros(4, 16, 16), r"2-D.*shape \(4, 16, 16\).*reshape\(-1, 16\)"),
    (torch.zeros(64), r"2-D.*shape \(64,\)"),
    (torch.zeros(64, 16, dtype=torch.long), r"floating-point.*torch.int64"),
    ([], r"no training batch"),
    ([torch.zeros(8, 16), torch.zeros(8, 15)], r"batch 1 of data has width 15"),
    ([torch.zeros(8, 16), "text"], r"batch 1 of data is a str"),
    ("not data", r"tensor or an iterable.*str"),
    (torch.zeros(10, 16), r"10 training rows, fewer than one batch of batch_size=4096"),
])
def test_bad_data_is_named(data, match):
    with pytest.raises(SaetuneError, match=match):
        fit_sae(data, CFG, progress=False, device="cpu")


def test_k_above_d_sae_is_named():
    cfg = SAEConfig(d_in=16, d_sae=32, k=3)
    cfg.k = 40  # changed after construction: fit_sae checks again
    with pytest.raises(SaetuneError, match=r"k=40.*d_sae=32"):
        fit_sae(torch.randn(64, 16), cfg, progress=False, device="cpu")


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(SaetuneError, match=r"'learning_rate'.*valid: optimizer, lr, .*holdout, eval_data") as e:
        fit_sae(torch.randn(64, 16), CFG, learning_rate=1e-3)
    assert all(o in str(e.value) for o in FIT_OPTIONS)
    with pytest.raises(SaetuneError, match=r"'hooks' \(a train-sae option that does not apply"):
        fit_sae(torch.randn(64, 16), CFG, hooks=["x"])
    with pytest.raises(SaetuneError, match=r"'architecture' \(set it in the SAEConfig\)"):
        fit_sae(torch.randn(64, 16), CFG, architecture="batchtopk")
    with pytest.raises(SaetuneError, match=r"unknown optimizer 'sgd'"):
        fit_sae(torch.randn(64, 16), CFG, optimizer="sgd")
    with pytest.raises(SaetuneError, match=r"holdout.*\[0, 1\).*1\.5"):
        fit_sae(torch.randn(64, 16), CFG, holdout=1.5)
    with pytest.raises(SaetuneError, match=r"holdout splits a \[N, d_in\] tensor"):
        fit_sae([torch.randn(64, 16)], CFG, holdout=0.1)
    with pytest.raises(SaetuneError, match=r"eval_data has width 8"):
        fit_sae(torch.randn(64, 16), CFG, batch_size=32, eval_data=torch.randn(5, 8), device="cpu")
    with pytest.raises(SaetuneError, match=r"holdout or eval_data, not both"):
        fit_sae(torch.randn(64, 16), CFG, batch_size=32, holdout=0.2, eval_data=torch.randn(5, 16))
    with pytest.raises(SaetuneError, match=r"SAEConfig.*got dict"):
        fit_sae(torch.randn(64, 16), {"d_in": 16})


def test_non_finite_data_stops_with_the_step():
    x = torch.randn(256, 16)
    x[200, 3] = float("nan")
    with pytest.raises(SaetuneError, match=r"non-finite loss.*at step 4"):
        fit_sae(x, CFG, batch_size=64, progress=False, device="cpu")


def test_step_count_from_max_steps_and_total_tokens():
    x, _ = planted(n=256)
    cfg = SAEConfig(d_in=16, d_sae=32, k=3)
    for opts, steps in (({}, 4), ({"max_steps": 10}, 10), ({"total_tokens": 640}, 10),
                        ({"total_tokens": 640, "max_steps": 3}, 3), ({"total_tokens": 640, "max_steps": 30}, 10)):
        _, m = fit_sae(x, cfg, batch_size=64, progress=False, device="cpu", **opts)
        assert m["steps"] == steps, opts
    with pytest.raises(SaetuneError, match=r"total_tokens=10 is less than one batch of batch_size=64"):
        fit_sae(x, cfg, batch_size=64, total_tokens=10, max_steps=5, device="cpu")


def test_shuffle_is_seeded_and_changes_the_order():
    x, _ = planted(n=512)
    cfg = SAEConfig(d_in=16, d_sae=32, k=3)
    a, _ = fit_sae(x, cfg, batch_size=64, max_steps=12, shuffle=True, seed=1, progress=False, device="cpu")
    b, _ = fit_sae(x, cfg, batch_size=64, max_steps=12, shuffle=True, seed=1, progress=False, device="cpu")
    c, _ = fit_sae(x, cfg, batch_size=64, max_steps=12, shuffle=False, seed=1, progress=False, device="cpu")
    assert torch.equal(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_dec, c.W_dec)
