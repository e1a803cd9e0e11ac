"""Fused SAE parameter pass (Adam, signum + schedule-free, with decoder upkeep) vs the torch sweeps."""

import copy

from kernel_env import DEV, NO_SHRINK, needs_triton  # noqa: I001  (first: switches the interpreter on)

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

pytestmark = needs_triton


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("SAETUNE_KERNELS", "triton")


@settings(max_examples=4, deadline=None, database=None, phases=NO_SHRINK)
@given(d=st.integers(1, 11), n=st.integers(2, 19), seed=st.integers(0, 2**31),
       optimizer=st.sampled_from(["adam", "signum_sf"]), renorm=st.booleans(), zero_grads=st.booleans())
def test_fused_update_matches_torch_sweeps(d, n, seed, optimizer, renorm, zero_grads):
    from saetune.kernels import triton_optim
    from saetune.optim import build_optimizer
    from saetune.sae import SAE, SAEConfig
    a = SAE(SAEConfig(d, n, k=1), seed=seed).to(DEV)
    r = copy.deepcopy(a)
    oa = build_optimizer(optimizer, a.parameters(), 3e-2)
    orf = build_optimizer(optimizer, r.parameters(), 3e-2)
    gen = torch.Generator().manual_seed(seed)
    for step in range(3):
        for pa, pr in zip(a.parameters(), r.parameters()):
            g = torch.randn(pa.shape, generator=gen)
            if zero_grads:  # exact zeros: sign(0) = 0, Adam's m and v stay put there
                g[..., ::2] = 0
            pa.grad, pr.grad = g.to(DEV), g.clone().to(DEV)
        assert triton_optim.fusable(oa, a)
        triton_optim.sae_update_triton(oa, a, renorm)
        triton_optim.sae_update_torch(orf, r, renorm)
        for (name, pa), pr in zip(a.named_parameters(), r.parameters()):
            assert torch.allclose(pa, pr, atol=2e-6, rtol=1e-5), (name, step)
    sa, sr = oa.state_dict(), orf.state_dict()
    assert sa["param_groups"] == sr["param_groups"]
    for pid in sr["state"]:
        assert sa["state"][pid].keys() == sr["state"][pid].keys()
        for key, val in sr["state"][pid].items():
            assert torch.allclose(sa["state"][pid][key], val, atol=2e-6, rtol=1e-5), (pid, key)
    if renorm:
        assert torch.allclose(a.W_dec.norm(dim=1), torch.ones(n, device=DEV), atol=1e-6)


def test_unsupported_optimiser_falls_back_to_the_same_result():
    from saetune.kernels import triton_optim
    from saetune.sae import SAE, SAEConfig
    a = SAE(SAEConfig(5, 9, k=2), seed=0).to(DEV)
    r = copy.deepcopy(a)
    oa = torch.optim.Adam(a.parameters(), lr=1e-2, weight_decay=0.1)  # weight decay: not fused
    orf = torch.optim.Adam(r.parameters(), lr=1e-2, weight_decay=0.1)
    for pa, pr in zip(a.parameters(), r.parameters()):
        pa.grad = torch.ones_like(pa)
        pr.grad = torch.ones_like(pr)
    assert not triton_optim.fusable(oa, a)
    triton_optim.sae_update_triton(oa, a, True)
    triton_optim.sae_update_torch(orf, r, True)
    for pa, pr in zip(a.parameters(), r.parameters()):
        assert torch.equal(pa, pr)
