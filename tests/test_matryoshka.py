"""Matryoshka BatchTopK (Bussmann et al. 2025): the nested-prefix loss, its gradients, config checks,
the SAELens layout (loaded by sae_lens itself), and ``train-sae --architecture matryoshka_batchtopk``."""

from __future__ import annotations

import os

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import kernel_env  # noqa: F401  (switches Triton's interpreter on before triton is imported, without a GPU)
import json
import math
from dataclasses import asdict

import pytest
import torch

from kernel_env import DEV, TRITON_OK
from saetune.errors import SaetuneError
from saetune.sae import SAE, SAEConfig
from saetune.sae_losses import block_sparse, matryoshka_loss
from saetune.sae_trainer import SAETrainer, TrainSAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: no thread spin-waits

D_IN, D_SAE, K = 11, 24, 3
WIDTHS = [2, 7, 24]


def make_sae(arch: str = "matryoshka_batchtopk", widths=WIDTHS, seed: int = 0, d_sae: int = D_SAE) -> SAE:
    cfg = SAEConfig(d_in=D_IN, d_sae=d_sae, k=K, architecture=arch,
                    matryoshka_widths=widths if arch == "matryoshka_batchtopk" else None,
                    hook_name="model.layers.1", model_name="toy")
    sae = SAE(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 50)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
    return sae


def dense_prefix_losses(x, acts, W_dec, b_dec, widths):
    """Brute force: each prefix's ‖x − (b_dec + acts[:, :m] W_dec[:m])‖² / Σ‖x − x̄‖², densely, in float64."""
    x, acts, W_dec, b_dec = (t.double() for t in (x, acts, W_dec, b_dec))
    tv = (x - x.mean(0)).pow(2).sum()
    return [(b_dec + acts[:, :m] @ W_dec[:m] - x).pow(2).sum() / tv for m in widths]


# ---- the loss -------------------------------------------------------------------------------------

def test_loss_hand_computed():
    """d_in 2, d_sae 4, prefixes [1, 2, 4]; worked by hand in the comments."""
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    b_dec = torch.zeros(2)
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])  # x̄ = 0, Σ‖x − x̄‖² = 5 + 5 = 10
    acts = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    # m=1: x̂ = [1,0], [0,0] → ‖[0,2]‖² + ‖[−1,−2]‖² = 4 + 5 = 9
    # m=2: latent 1 is silent → 9 again
    # m=4: x̂ = [2,1], [1,−1]; x − x̂ = [−1,1], [−2,−1] → 2 + 5 = 7;  loss = (9 + 9 + 7) / 10 = 2.5
    loss, fvus, x_hat = matryoshka_loss(x, acts, W_dec, b_dec, [1, 2, 4])
    assert [round(float(f), 6) for f in fvus] == [0.9, 0.9, 0.7]
    assert float(loss) == pytest.approx(2.5, abs=1e-6)
    torch.testing.assert_close(x_hat, torch.tensor([[2.0, 1.0], [1.0, -1.0]]))


@pytest.mark.parametrize("widths", [[1, 2, 4], [4], [3, 4]])
def test_loss_equals_brute_force_sum_of_prefix_losses(widths):
    g = torch.Generator().manual_seed(1)
    W_dec, b_dec = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
    x = torch.randn(5, 3, generator=g)
    acts = torch.randn(5, 4, generator=g).relu()  # some zeros, rows with different counts
    loss, fvus, _ = matryoshka_loss(x, acts, W_dec, b_dec, widths)
    want = dense_prefix_losses(x, acts, W_dec, b_dec, widths)
    for got, w in zip(fvus, want):
        assert float(got) == pytest.approx(float(w), rel=1e-5)
    assert float(loss) == pytest.approx(float(sum(want)), rel=1e-5)


def test_block_sparse_holds_exactly_the_nonzeros():
    acts = torch.tensor([[0.0, 3.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0, 5.0], [4.0, 0.0, 6.0, 0.0, 0.0]])
    v, i = block_sparse(acts, 1, 4)  # latents 1, 2, 3; at most 2 non-zeros in a row
    assert v.shape == (3, 2)
    dense = torch.zeros(3, 3).scatter_add(1, i, v)
    torch.testing.assert_close(dense, acts[:, 1:4])
    v0, i0 = block_sparse(torch.zeros(2, 5), 0, 3)  # a silent block decodes to nothing
    assert v0.shape == (2, 0) and i0.shape == (2, 0)


def _trainer(sae: SAE) -> SAETrainer:
    w = sae.cfg.matryoshka_widths or []
    return SAETrainer("s", sae, TrainSAEConfig(architecture=sae.cfg.architecture, d_sae=[sae.d_sae], k=[K],
                                               matryoshka_widths=list(w)), "cpu")


def _grads(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, _, _ = _trainer(sae).loss(x)
    sae.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_single_prefix_equals_batchtopk():
    """widths [d_sae]: the same loss and the same gradients as BatchTopK on the same weights."""
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(2))
    mat = make_sae(widths=[D_SAE], seed=3)
    bt = make_sae("batchtopk", seed=3)
    l_m, g_m = _grads(mat, x)
    l_b, g_b = _grads(bt, x)
    torch.testing.assert_close(l_m, l_b, rtol=1e-6, atol=1e-7)
    for name in g_b:
        torch.testing.assert_close(g_m[name], g_b[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(g.abs().sum() > 0 for g in g_b.values())


def test_gradients_equal_dense_reference_and_reach_every_prefix():
    """∂loss/∂θ of the trainer's Matryoshka loss = autograd through the dense brute force, for every
    parameter; each prefix's own term moves the decoder rows of every block inside it."""
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(4))
    sae = make_sae(seed=5)
    loss, grads = _grads(sae, x)

    ref = make_sae(seed=5)
    pre = (x - ref.b_dec) @ ref.W_enc + ref.b_enc
    flat = pre.relu().reshape(-1)
    top = flat.topk(K * x.shape[0]).indices
    acts = torch.zeros_like(flat).scatter(0, top, flat[top]).reshape(pre.shape)  # BatchTopK, densely
    terms = dense_prefix_losses(x, acts, ref.W_dec, ref.b_dec, WIDTHS)
    sum(terms).backward()
    assert float(loss) == pytest.approx(float(sum(terms).detach()), rel=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad.float(), rtol=1e-4, atol=1e-6, msg=name)

    # every prefix's term reaches the decoder rows of each block it contains (that fired)
    fired = (acts > 0).any(0)
    lo = 0
    for j, m in enumerate(WIDTHS):
        ref.zero_grad()
        terms = dense_prefix_losses(x, acts.detach(), ref.W_dec, ref.b_dec, WIDTHS)
        terms[j].backward()
        row_norms = ref.W_dec.grad.norm(dim=1)
        assert (row_norms[:m][fired[:m]] > 0).all(), (j, m)
        assert (row_norms[m:] == 0).all()  # latents outside the prefix get nothing from its term
        assert (grads["W_dec"][lo:m].norm(dim=1)[fired[lo:m]] > 0).all()
        lo = m


def test_training_step_updates_threshold_and_logs_prefix_fvus():
    sae = make_sae(seed=6)
    t = _trainer(sae)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(7))
    m = t.step(x, None)
    assert {"fvu_2", "fvu_7", "fvu", "loss", "l0"} <= m.keys()
    assert float(m["fvu_2"]) >= float(m["fvu_7"]) - 1e-6  # more latents reconstruct at least as well (same acts)
    assert float(m["loss"]) == pytest.approx(float(m["fvu_2"] + m["fvu_7"] + m["fvu"]), rel=1e-5)
    assert float(m["l0"]) == pytest.approx(K)
    assert (sae.threshold > 0).all()


@pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_triton_path_equals_torch_path(monkeypatch):
    """The Triton ops (batch_topk, topk_select, sparse_decode) give the torch path's loss and gradients."""
    monkeypatch.setenv("SAETUNE_POISON", "1")
    x = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(8)).to(DEV)
    out = {}
    for mode in ("triton", "torch"):
        monkeypatch.setenv("SAETUNE_KERNELS", mode)
        sae = make_sae(seed=9).to(DEV)
        out[mode] = _grads(sae, x)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    for name, g in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][name], g, rtol=1e-4, atol=1e-5, msg=name)


# ---- config checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("widths,match", [
    (None, r"needs matryoshka_widths.*d_sae=24"),
    ([], r"needs matryoshka_widths"),
    ([0, 8, 24], r"≥ 1.*\[0, 8, 24\]"),
    ([8, 8, 24], r"strictly increasing.*\[8, 8, 24\].*8 after 8"),
    ([16, 8, 24], r"strictly increasing.*8 after 16"),
    ([4, 8, 20], r"last.*d_sae=24.*\[4, 8, 20\]"),
    ([4, 8, 30], r"last.*d_sae=24"),
    ([4, 8.5, 24], r"list of integers.*8\.5"),
])
def test_bad_widths_are_named(widths, match):
    with pytest.raises(SaetuneError, match=match):
        SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, architecture="matryoshka_batchtopk", matryoshka_widths=widths)


def test_widths_on_another_architecture_refused():
    with pytest.raises(SaetuneError, match=r"'batchtopk' has no nested prefixes"):
        SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, architecture="batchtopk", matryoshka_widths=[4, 24])


def test_k_still_checked():
    with pytest.raises(SaetuneError, match=r"k=24.*d_sae=24"):
        SAEConfig(d_in=D_IN, d_sae=D_SAE, k=24, architecture="matryoshka_batchtopk", matryoshka_widths=WIDTHS)


def test_train_config_checks():
    with pytest.raises(SaetuneError, match=r"last.*d_sae=64"):
        TrainSAEConfig(architecture="matryoshka_batchtopk", d_sae=[64], k=[4], matryoshka_widths=[8, 32])
    with pytest.raises(SaetuneError, match=r"exactly one d_sae"):
        TrainSAEConfig(architecture="matryoshka_batchtopk", d_sae=[32, 64], k=[4], matryoshka_widths=[8, 32])
    with pytest.raises(SaetuneError, match=r"exactly one d_sae.*expansion_factor"):
        TrainSAEConfig(architecture="matryoshka_batchtopk", k=[4], matryoshka_widths=[8, 32])
    with pytest.raises(SaetuneError, match=r"'topk' has no nested prefixes"):
        TrainSAEConfig(architecture="topk", d_sae=[64], k=[4], matryoshka_widths=[8, 64])


# ---- formats ---------------------------------------------------------------------------------------

def test_saelens_round_trip(tmp_path):
    """Saved as SAELens saves a trained Matryoshka BatchTopK SAE (JumpReLU with θ); sae_lens loads it and
    its encode/decode equal ours at inference; SAE.load gives back the Matryoshka config."""
    import sae_lens

    sae = make_sae(seed=10)
    with torch.no_grad():
        sae.threshold.fill_(0.15)  # as training leaves it: one θ for every latent
    sae.eval()
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["saetune"]["architecture"] == "matryoshka_batchtopk"
    assert cfg["metadata"]["saetune"]["matryoshka_widths"] == WIDTHS

    sl = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(11)) * 2
    with torch.no_grad():
        f = sae.encode(x)
        assert 0 < int((f > 0).sum()) < f.numel()  # the threshold really selects
        torch.testing.assert_close(sl.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sl.decode(f), sae.decode(f), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sl(x), sae(x), rtol=1e-5, atol=1e-5)

    back = SAE.load(tmp_path)
    assert asdict(back.cfg) == asdict(sae.cfg)
    assert back.cfg.matryoshka_widths == WIDTHS and back.cfg.architecture == "matryoshka_batchtopk"
    for name, t in sae.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], t), name
    assert torch.equal(back(x), sae(x))


def test_trained_prefix_reconstructs_better_than_batchtopk_prefix():
    """The point of the nesting: after training, the first m_i latents alone reconstruct well, better than
    the same prefix of a plain BatchTopK SAE trained on the same data."""
    from saetune.fit import fit_sae

    g = torch.Generator().manual_seed(12)
    dirs = torch.randn(48, D_IN, generator=g)
    freq = torch.linspace(0.4, 0.02, 48)  # a few frequent directions, many rare ones
    codes = (torch.rand(2048, 48, generator=g) < freq) * (0.5 + torch.rand(2048, 48, generator=g))
    x = codes @ dirs
    prefix = {}
    for arch in ("matryoshka_batchtopk", "batchtopk"):
        cfg = SAEConfig(d_in=D_IN, d_sae=48, k=4, architecture=arch,
                        matryoshka_widths=[4, 16, 48] if arch != "batchtopk" else None)
        sae, _ = fit_sae(x, cfg, batch_size=128, max_steps=120, optimizer="adam", lr=3e-3, seed=0, progress=False,
                         device="cpu")
        with torch.no_grad():
            f = sae.encode(x)
            f[:, 4:] = 0
            prefix[arch] = float(((sae.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()))
    assert prefix["matryoshka_batchtopk"] < 0.85 * prefix["batchtopk"], prefix  # 0.72 vs 0.89 when written


def test_train_sae_cli_trains_matryoshka(tiny_model_dir, tmp_path):
    """``saetune train-sae --architecture matryoshka_batchtopk --matryoshka-widths …`` end to end."""
    from saetune.cli import main
    from saetune.runs import read_metrics

    out = tmp_path / "run"
    rc = main(["train-sae", "--model", str(tiny_model_dir), "--hooks", "model.layers.1", "--architecture",
               "matryoshka_batchtopk", "--d-sae", "64", "--k", "4", "--matryoshka-widths", "8", "32", "64",
               "--batch-size", "64", "--context-size", "32", "--max-examples", "40", "--max-steps", "4",
               "--eval-seqs", "0", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows][-1] == 4
    assert all(math.isfinite(r["loss"]) and {"fvu_8", "fvu_32"} <= r.keys() for r in rows)
    sae = SAE.load(out)
    assert sae.cfg.architecture == "matryoshka_batchtopk" and sae.cfg.matryoshka_widths == [8, 32, 64]
    assert (sae.threshold > 0).all()
