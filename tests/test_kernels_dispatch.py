"""Dispatch (SAETUNE_KERNELS read per call, torch default on CPU) and the whole SAE training step with
the Triton kernels on vs off: the same loss curve."""

import os

import torch

if not torch.cuda.is_available():  # no GPU: the kernels run in Triton's interpreter (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from saetune.errors import SaetuneError
from saetune.kernels import dispatch
from saetune.kernels.dispatch import interpreting

TRITON_OK = (interpreting() or torch.cuda.is_available()) and dispatch.triton_available()
DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def test_backend_is_read_at_call_time(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("SAETUNE_KERNELS", raising=False)
    assert dispatch.use_triton(x) == (x.is_cuda and dispatch.triton_available())  # CPU default: torch
    monkeypatch.setenv("SAETUNE_KERNELS", "torch")
    assert not dispatch.use_triton(x)
    monkeypatch.setenv("SAETUNE_KERNELS", "nonsense")
    with pytest.raises(SaetuneError, match="SAETUNE_KERNELS"):
        dispatch.use_triton(x)
    if TRITON_OK:
        monkeypatch.setenv("SAETUNE_KERNELS", "triton")
        assert dispatch.use_triton(x)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        if not x.is_cuda:
            with pytest.raises(SaetuneError, match="TRITON_INTERPRET"):
                dispatch.use_triton(x)


def test_cpu_default_does_not_import_triton_kernels():
    import subprocess
    import sys
    code = ("import sys, torch; from saetune.sae import SAE, SAEConfig; from saetune.sae_trainer import SAETrainer, "
            "TrainSAEConfig; t = SAETrainer('a', SAE(SAEConfig(4, 9, k=2), seed=0), TrainSAEConfig(d_sae=[9], k=[2]), "
            "'cpu'); t.step(torch.randn(5, 4), None); print(any(m.startswith('saetune.kernels.triton') for m in "
            "sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "SAETUNE_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def _curve(mode, arch, optimizer, auxk, monkeypatch, steps=3):
    from saetune.sae import SAE, SAEConfig
    from saetune.sae_trainer import SAETrainer, TrainSAEConfig
    monkeypatch.setenv("SAETUNE_KERNELS", mode)
    if mode == "triton":  # the fused optimiser pass must really run, not fall back to the torch sweeps
        from saetune.kernels import triton_optim

        def no_fallback(*args):
            raise AssertionError("sae_update_triton fell back to the torch reference")
        monkeypatch.setattr(triton_optim, "sae_update_torch", no_fallback)
    d, n, k = 7, 19, 3
    cfg = TrainSAEConfig(d_sae=[n], k=[k], optimizer=optimizer, architecture=arch, auxk_coef=auxk, auxk_k=4,
                         dead_tokens=6, lr=2e-2)
    t = SAETrainer("s", SAE(SAEConfig(d, n, k=k, architecture=arch), seed=1).to(DEV), cfg, DEV)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, d, generator=g).to(DEV) for _ in range(steps)]
    out = []
    for x in xs:
        m = t.step(x, None)
        out.append([float(m[key]) for key in ("loss", "fvu", "l0")])
    return torch.tensor(out), {name: p.detach().clone() for name, p in t.sae.named_parameters()}


@pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("arch,optimizer,auxk", [("topk", "adam", 0.0), ("topk", "signum_sf", 0.0),
                                                 ("topk", "adam", 1 / 32), ("batchtopk", "signum_sf", 0.0)])
def test_training_step_kernels_on_vs_off(arch, optimizer, auxk, monkeypatch):
    monkeypatch.setenv("SAETUNE_POISON", "1")
    on, p_on = _curve("triton", arch, optimizer, auxk, monkeypatch)
    off, p_off = _curve("torch", arch, optimizer, auxk, monkeypatch)
    assert torch.allclose(on, off, atol=1e-5, rtol=1e-4), (on, off)
    for name in p_off:
        assert torch.allclose(p_on[name], p_off[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_sae_forward_same_on_both_paths_frozen_sae(monkeypatch):
    """sae(x) on the Triton path equals the torch path, and ∂x flows through a frozen SAE (SAE-Tuning)."""
    from saetune.sae import SAE, SAEConfig
    monkeypatch.setenv("SAETUNE_POISON", "1")
    sae = SAE(SAEConfig(6, 17, k=4), seed=2).to(DEV).requires_grad_(False)
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1)).to(DEV)
    outs = {}
    for mode in ("triton", "torch"):
        monkeypatch.setenv("SAETUNE_KERNELS", mode)
        xx = x.clone().requires_grad_()
        y = sae(xx)
        y.pow(2).sum().backward()
        outs[mode] = (y.detach(), xx.grad)
    assert outs["triton"][0].shape == x.shape
    assert torch.allclose(outs["triton"][0], outs["torch"][0], atol=1e-5)
    assert torch.allclose(outs["triton"][1], outs["torch"][1], atol=1e-4)
