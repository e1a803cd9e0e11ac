"""GPU checks of the Triton kernels (compiled, not interpreted): fast path equals the torch path at
realistic shapes, bf16 dot in the entropy kernel, no host syncs in the SAE step, entropy memory.
Marked ``gpu``; skipped without CUDA and under TRITON_INTERPRET=1 (which `make test` sets only where there
is no NVIDIA GPU). On a GPU machine `make test` runs them, or alone: ``python -m pytest -m gpu tests/gpu``."""

import os

import pytest
import torch

COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not COMPILED, reason="needs CUDA and compiled (not interpreted) "
                                                                       "Triton kernels")]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("SAETUNE_KERNELS", "triton")


def _sae_params(B, d, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, d, device="cuda", generator=g), torch.randn(d, n, device="cuda", generator=g) / d ** 0.5,
            torch.zeros(n, device="cuda"), torch.randn(n, d, device="cuda", generator=g) / d ** 0.5,
            torch.randn(d, device="cuda", generator=g) * 0.1]


def test_topk_select_large_rows():
    from saetune.kernels import topk_select
    pre = torch.randn(257, 16_411, device="cuda")
    pre[:, 100:140] = pre[:, 99:100]  # ties
    dead = torch.rand(16_411, device="cuda") < 0.1
    v, i, va, ia = topk_select(pre, 64, dead, 97)
    assert torch.equal(pre.gather(1, i).sort(-1).values, pre.topk(64, dim=-1).values.sort(-1).values)
    ref = pre.masked_fill(~dead, float("-inf")).topk(97, dim=-1).values.relu()
    assert torch.equal(va.sort(-1).values, ref.sort(-1).values)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_topk_autoencode_equals_torch_path(autocast, monkeypatch):
    from saetune.kernels import topk_autoencode
    from saetune.kernels.topk_sae import TopKAutoencode
    ps = _sae_params(1000, 96, 3001)
    a = [p.clone().requires_grad_() for p in ps]
    r = [p.clone().requires_grad_() for p in ps]
    with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
        x_hat, v, i = topk_autoencode(*a, 32)
        x_ref, v_ref, i_ref = TopKAutoencode.apply(*r, 32)
    assert torch.equal(i.sort(-1).values, i_ref.sort(-1).values)
    tol = 1e-4 if autocast is None else 2e-2
    assert (x_hat - x_ref).abs().max() <= tol * x_ref.abs().max()
    x_hat.float().sum().backward()  # stride-0 upstream gradient
    x_ref.float().sum().backward()
    for p, q in zip(a, r):
        assert (p.grad - q.grad).abs().max() <= tol * q.grad.abs().max().clamp_min(1e-6)


def test_sae_step_has_no_host_sync():
    from saetune.kernels import topk_autoencode
    ps = [p.requires_grad_() for p in _sae_params(512, 64, 2048)]
    topk_autoencode(*ps, 16)[0].sum().backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x_hat, v, i = topk_autoencode(*ps, 16)
        x_hat.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("optimizer", ["adam", "signum_sf"])
def test_training_curve_kernels_on_vs_off(optimizer, monkeypatch):
    from saetune.sae import SAE, SAEConfig
    from saetune.sae_trainer import SAETrainer, TrainSAEConfig
    xs = [torch.randn(2048, 128, device="cuda", generator=torch.Generator(device="cuda").manual_seed(s))
          for s in range(10)]
    curves = {}
    for mode in ("triton", "torch"):
        monkeypatch.setenv("SAETUNE_KERNELS", mode)
        t = SAETrainer("s", SAE(SAEConfig(128, 4096, k=32), seed=0).cuda(),
                       TrainSAEConfig(d_sae=[4096], k=[32], optimizer=optimizer), "cuda")
        curves[mode] = torch.tensor([float(t.step(x, None)["loss"]) for x in xs])
    assert torch.allclose(curves["triton"], curves["torch"], rtol=1e-3), curves


def test_entropy_bf16_against_fp32_reference():
    import saetune.kernels as K
    from saetune.kernels.entropy import linear_entropy_logprob_naive
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(777, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    W = (torch.randn(5003, 256, device="cuda", generator=g) / 16).bfloat16().requires_grad_()
    t = torch.randint(0, 5003, (777,), device="cuda", generator=g)
    t[::7] = -100
    ent, lp = K.linear_entropy_logprob(h, W, t)
    (0.1 * ent.sum() - lp.sum()).backward()
    hr, Wr = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    er, lr = linear_entropy_logprob_naive(hr, Wr, t)
    (0.1 * er.sum() - lr.sum()).backward()
    assert (ent - er).abs().max() < 2e-2 and (lp - lr).abs().max() < 2e-2
    assert (h.grad.float() - hr.grad).abs().max() <= 3e-2 * hr.grad.abs().max()
    assert (W.grad.float() - Wr.grad).abs().max() <= 3e-2 * Wr.grad.abs().max()


def test_entropy_memory_on_the_qwen_shape():
    """PERF.md's shape (V 151,936, D 1,536, N 16,384, bf16): the forward needs ≤ 300 MB beyond its inputs."""
    import saetune.kernels as K
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(16384, 1536, device="cuda", generator=g).bfloat16()
    W = (torch.randn(151936, 1536, device="cuda", generator=g) / 40).bfloat16()
    t = torch.randint(0, 151936, (16384,), device="cuda", generator=g)
    with torch.no_grad():
        K.linear_entropy_logprob(h, W, t)  # compile
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ent, lp = K.linear_entropy_logprob(h, W, t)
        torch.cuda.synchronize()
    assert torch.isfinite(ent).all() and torch.isfinite(lp).all()
    assert torch.cuda.max_memory_allocated() - base <= 300 * 2**20
