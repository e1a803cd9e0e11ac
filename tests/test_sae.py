"""saetune.sae: config checks, init (SPEC_RESA Stage I), encode semantics, SAELens/sparsify formats."""

from __future__ import annotations

import os

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # before sparsify is imported anywhere

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from saetune.errors import SaetuneError
from saetune.sae import SAE, SAEConfig

ARCHS = ("topk", "batchtopk", "standard", "jumprelu")
D_IN, D_SAE, K = 13, 37, 5  # odd sizes: nothing divides anything


def make_sae(arch: str, seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE, k: int = K) -> SAE:
    """An SAE with every parameter away from its init value, so a format that drops one shows."""
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, k=k if arch in ("topk", "batchtopk") else None, architecture=arch,
                    hook_name="model.layers.3", model_name="toy")
    sae = SAE(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.05 + 0.3 * torch.rand(d_sae, generator=g))
    return sae.eval()


def pre_ref(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Hand-written pre-activations (x − b_dec) W_enc + b_enc, in float64."""
    x, W, be, bd = (t.detach().double() for t in (x, sae.W_enc, sae.b_enc, sae.b_dec))
    return (x - bd) @ W + be


# ---- SAEConfig errors ------------------------------------------------------------------------

def test_config_unknown_architecture_names_it():
    with pytest.raises(SaetuneError, match=r"'gated'.*topk.*batchtopk.*standard.*jumprelu"):
        SAEConfig(d_in=4, d_sae=8, k=2, architecture="gated")


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [37, 40])
def test_config_k_not_below_d_sae(arch, k):
    with pytest.raises(SaetuneError, match=rf"k={k}.*d_sae=37"):
        SAEConfig(d_in=13, d_sae=37, k=k, architecture=arch)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_config_k_missing_or_zero(arch):
    with pytest.raises(SaetuneError, match=rf"{arch!r}.*needs k"):
        SAEConfig(d_in=13, d_sae=37, architecture=arch)
    with pytest.raises(SaetuneError, match=r"k=0"):
        SAEConfig(d_in=13, d_sae=37, k=0, architecture=arch)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "13", None])
@pytest.mark.parametrize("name", ["d_in", "d_sae"])
def test_config_bad_width_names_value(name, bad):
    kw = {"d_in": 13, "d_sae": 37, "k": 5, name: bad}
    with pytest.raises(SaetuneError, match=rf"{name}.*{bad!r}".replace("(", r"\(").replace(")", r"\)")):
        SAEConfig(**kw)


def test_config_k_optional_for_dense_architectures():
    assert SAEConfig(d_in=3, d_sae=5, architecture="standard").k is None
    assert SAEConfig(d_in=3, d_sae=5, architecture="jumprelu").k is None


# ---- init (SPEC_RESA: Linear default init, b_enc = 0, W_dec = W_encᵀ unit rows, b_dec = 0) -----

@pytest.mark.parametrize("arch", ARCHS)
def test_init_follows_spec(arch):
    d_in, d_sae = 29, 211
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=7 if arch in ("topk", "batchtopk") else None,
                        architecture=arch), seed=3)
    names = {n for n, _ in sae.named_parameters()}
    assert names == ({"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set()))
    assert sae.W_enc.shape == (d_in, d_sae) and sae.W_dec.shape == (d_sae, d_in)
    assert sae.b_enc.shape == (d_sae,) and sae.b_dec.shape == (d_in,)
    bound = 1 / math.sqrt(d_in)
    W = sae.W_enc.detach()
    assert W.abs().max() <= bound
    assert W.abs().max() > 0.95 * bound  # uniform over the whole range, not a narrower init
    assert abs(W.mean().item()) < 0.05 * bound
    assert torch.equal(sae.b_enc.detach(), torch.zeros(d_sae))
    assert torch.equal(sae.b_dec.detach(), torch.zeros(d_in))
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(d_sae), atol=1e-6, rtol=0)
    expect = W.t() / W.t().norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.detach(), expect, atol=1e-7, rtol=1e-6)
    if arch == "jumprelu":
        assert torch.equal(sae.threshold.detach(), torch.full((d_sae,), 0.001))


def test_init_seeded_reproducible():
    a = SAE(SAEConfig(d_in=11, d_sae=23, k=3), seed=5)
    b = SAE(SAEConfig(d_in=11, d_sae=23, k=3), seed=5)
    c = SAE(SAEConfig(d_in=11, d_sae=23, k=3), seed=6)
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_enc, c.W_enc)


# ---- encode semantics ---------------------------------------------------------------------------

def test_topk_encode_exactly_k_when_positive():
    sae = make_sae("topk", seed=1)
    with torch.no_grad():
        sae.b_enc.add_(50.0)  # every pre-activation positive
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(0))
    f = sae.encode(x)
    pre = pre_ref(sae, x)
    assert (pre > 0).all()
    assert f.shape == (9, D_SAE)
    assert ((f != 0).sum(-1) == K).all()
    for b in range(9):
        top = pre[b].topk(K).indices
        assert set(torch.nonzero(f[b]).flatten().tolist()) == set(top.tolist())
        torch.testing.assert_close(f[b, top].double(), pre[b, top].relu(), rtol=1e-5, atol=1e-5)


def test_topk_encode_relu_of_topk_with_negative_preacts():
    sae = make_sae("topk", seed=2)
    with torch.no_grad():
        sae.b_enc.sub_(1.0)  # many pre-activations negative: ReLU clips some of the top k
    x = torch.randn(4, 3, D_IN, generator=torch.Generator().manual_seed(1))  # leading dims kept
    f = sae.encode(x)
    assert f.shape == (4, 3, D_SAE)
    pre = pre_ref(sae, x)
    ref = torch.zeros_like(pre).scatter(-1, pre.topk(K, dim=-1).indices, pre.topk(K, dim=-1).values.relu())
    torch.testing.assert_close(f.double(), ref, rtol=1e-5, atol=1e-5)
    nnz = (f != 0).sum(-1)
    assert (nnz <= K).all() and (nnz < K).any()  # the case tested really clipped something
    assert (f >= 0).all()


def test_encode_topk_matches_encode():
    sae = make_sae("topk", seed=3)
    x = torch.randn(6, D_IN)
    v, i = sae.encode_topk(x)
    dense = torch.zeros(6, D_SAE).scatter(-1, i, v)
    torch.testing.assert_close(dense, sae.encode(x))
    with pytest.raises(SaetuneError, match="'standard'"):
        make_sae("standard").encode_topk(x)


def test_batchtopk_train_keeps_k_times_batch():
    sae = make_sae("batchtopk", seed=4)
    with torch.no_grad():
        sae.b_enc.add_(50.0)
    sae.train()
    x = torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(2))  # B = 6 tokens
    f = sae.encode(x)
    pre = pre_ref(sae, x)
    assert int((f != 0).sum()) == K * 6
    flat_pre = pre.flatten()
    top = flat_pre.topk(K * 6).indices
    assert set(torch.nonzero(f.flatten()).flatten().tolist()) == set(top.tolist())
    torch.testing.assert_close(f.flatten()[top].double(), flat_pre[top], rtol=1e-5, atol=1e-5)


def test_batchtopk_train_is_not_per_token_topk():
    """With one token far stronger than the others, batch top-k gives it more than k latents."""
    sae = make_sae("batchtopk", seed=5)
    sae.train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, D_IN, generator=g) * 0.01
    x[0] = 30 * torch.randn(D_IN, generator=g)
    f = sae.encode(x)
    nnz = (f != 0).sum(-1)
    assert int(nnz.sum()) <= 4 * K
    assert int(nnz[0]) > K


def test_batchtopk_eval_uses_threshold():
    sae = make_sae("batchtopk", seed=6)
    sae.eval()
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(4))
    f = sae.encode(x)
    pre = pre_ref(sae, x)
    theta = sae.threshold.detach().double()
    ref = pre * (pre > theta)
    torch.testing.assert_close(f.double(), ref, rtol=1e-5, atol=1e-5)
    # independent of the batch: each token alone gives the same features
    torch.testing.assert_close(torch.cat([sae.encode(x[i:i + 1]) for i in range(7)]), f)


def test_standard_is_relu():
    sae = make_sae("standard", seed=7)
    x = torch.randn(5, D_IN)
    pre = pre_ref(sae, x)
    torch.testing.assert_close(sae.encode(x).double(), pre.relu(), rtol=1e-5, atol=1e-5)
    assert (sae.encode(x) == 0).any() and (sae.encode(x) > 0).any()


def test_jumprelu_zeroes_below_threshold():
    sae = make_sae("jumprelu", seed=8)
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(5))
    pre = pre_ref(sae, x)
    theta = sae.threshold.detach().double()
    f = sae.encode(x).double()
    torch.testing.assert_close(f, pre * (pre > theta), rtol=1e-5, atol=1e-5)
    between = (pre > 0) & (pre <= theta)  # positive but under the threshold: ReLU would keep these
    assert between.any()
    assert (f[between] == 0).all()
    # straight-through: ∂f/∂pre = H(pre − θ)
    xr = x.clone().requires_grad_(True)
    sae.encode(xr).sum().backward()
    expect = ((pre > theta).double() @ sae.W_enc.detach().double().t()).float()
    torch.testing.assert_close(xr.grad, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train", [False, True])
def test_forward_is_decode_of_encode(arch, train):
    sae = make_sae(arch, seed=9)
    sae.train(train)
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(6))
    out = sae(x)
    assert out.shape == x.shape
    ref = sae.decode(sae.encode(x))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    f = sae.encode(x).double()
    torch.testing.assert_close(out.double(), f @ sae.W_dec.detach().double() + sae.b_dec.detach().double(),
                               rtol=1e-5, atol=1e-5)


def test_forward_does_not_renormalise_decoder():
    sae = make_sae("topk", seed=10)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    before = sae.W_dec.detach().clone()
    x = torch.randn(4, D_IN)
    out = sae(x)
    assert torch.equal(sae.W_dec.detach(), before)
    torch.testing.assert_close(out, sae.encode(x) @ before + sae.b_dec.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_d_in_mismatch_is_clear(arch):
    sae = make_sae(arch)
    for fn in (sae, sae.encode):
        with pytest.raises(SaetuneError, match=rf"width 12.*d_in is {D_IN}"):
            fn(torch.randn(4, 12))
        with pytest.raises(SaetuneError, match=rf"width 14.*d_in is {D_IN}"):
            fn(torch.randn(2, 3, 14))


# ---- SAELens format ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_round_trip(arch, tmp_path):
    import sae_lens

    sae = make_sae(arch, seed=11)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu" if arch == "batchtopk" else arch)
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    assert (tmp_path / "sae_weights.safetensors").exists()

    sl = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(7)) * 2
    with torch.no_grad():
        ours = sae(x)
        theirs = sl(x)
        # the reconstruction must depend on the encoding (not just b_dec)
        assert (ours - sae.b_dec).abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sl.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)

    back = SAE.load(tmp_path)
    assert asdict(back.cfg) == asdict(sae.cfg)
    assert back.state_tensors().keys() == sae.state_tensors().keys()
    for name, t in sae.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], t), name
    assert not back.training
    assert torch.equal(back(x), sae(x))


def test_saelens_options_we_do_not_implement_are_refused(tmp_path):
    """A SAELens SAE with apply_b_dec_to_input=False would otherwise load and compute something else."""
    import sae_lens

    sl = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    sl.save_model(str(tmp_path))
    with pytest.raises(SaetuneError, match="apply_b_dec_to_input"):
        SAE.load(tmp_path)


def test_saelens_native_topk_loads(tmp_path):
    import sae_lens

    sl = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    with torch.no_grad():
        for p in sl.parameters():
            p.copy_(torch.randn_like(p))
    sl.save_model(str(tmp_path))
    sae = SAE.load(tmp_path)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == K
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), sl(x), rtol=1e-5, atol=1e-4)


# ---- sparsify format -----------------------------------------------------------------------------

def _sparse_coder(d_in: int, n: int, k: int, seed: int):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    sc = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=k))
    with torch.no_grad():
        sc.encoder.bias.normal_(0, 0.2)
        sc.b_dec.normal_()
    return sc


def test_sparsify_dir_loads_with_same_output(tmp_path):
    sc = _sparse_coder(19, 53, 7, seed=0)
    sc.save_to_disk(tmp_path)
    sae = SAE.load(tmp_path)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k, sae.cfg.architecture) == (19, 53, 7, "topk")
    x = torch.randn(10, 19, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = sc(x)
        torch.testing.assert_close(sae(x), out.sae_out, rtol=1e-5, atol=1e-5)
        v, i = sae.encode_topk(x)
        ours = torch.zeros(10, 53).scatter(-1, i, v)
        theirs = torch.zeros(10, 53).scatter(-1, out.latent_indices, out.latent_acts)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_saetune_sparsify_save_loads_in_sparsify(tmp_path):
    from sparsify import SparseCoder

    sae = make_sae("topk", seed=12, d_in=19, d_sae=53, k=7)
    sae.save(tmp_path, format="sparsify")
    assert (tmp_path / "sae.safetensors").exists()
    sc = SparseCoder.load_from_disk(tmp_path)
    assert sc.num_latents == 53 and sc.cfg.k == 7 and sc.d_in == 19
    x = torch.randn(10, 19, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(sc(x).sae_out, sae(x), rtol=1e-5, atol=1e-5)
    back = SAE.load(tmp_path)
    for name, t in sae.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], t), name


@pytest.mark.parametrize("arch", ["batchtopk", "standard", "jumprelu"])
def test_sparsify_format_refuses_non_topk(arch, tmp_path):
    with pytest.raises(SaetuneError, match=rf"{arch!r}.*saelens"):
        make_sae(arch).save(tmp_path, format="sparsify")


def test_unknown_format(tmp_path):
    with pytest.raises(SaetuneError, match="'onnx'"):
        make_sae("topk").save(tmp_path, format="onnx")


# ---- multi-hook dirs -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["saelens", "sparsify", "sparsify-native"])
def test_multi_hook_dir(fmt, tmp_path):
    if fmt == "sparsify-native":  # sparsify's own naming: layers.N
        names = ["layers.1", "layers.2"]
        coders = [_sparse_coder(D_IN, D_SAE, K, seed=s) for s in (1, 2)]
        for name, sc in zip(names, coders):
            sc.save_to_disk(tmp_path / name)
        refs = [lambda x, sc=sc: sc(x).sae_out for sc in coders]
    else:
        names = ["model.layers.1", "model.layers.2"]
        saes = [make_sae("topk", seed=s) for s in (1, 2)]
        for name, s in zip(names, saes):
            s.save(tmp_path / name, format=fmt)
        refs = saes
    (tmp_path / "README.txt").write_text("not an SAE")
    (tmp_path / "empty_dir").mkdir()

    with pytest.raises(SaetuneError, match=r"several hooks.*hook=.*layers\.1.*layers\.2"):
        SAE.load(tmp_path)
    with pytest.raises(SaetuneError, match=r"'layers\.7'.*layers\.1.*layers\.2"):
        SAE.load(tmp_path, hook="layers.7")

    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(10))
    for i, ref in enumerate(refs):
        for spelling in (f"layers.{i + 1}", f"model.layers.{i + 1}"):
            sae = SAE.load(tmp_path, hook=spelling)
            with torch.no_grad():
                torch.testing.assert_close(sae(x), ref(x), rtol=1e-5, atol=1e-5)
    # the two hooks really hold different SAEs
    with torch.no_grad():
        assert not torch.allclose(refs[0](x), refs[1](x))


def test_single_hook_subdir_needs_no_hook(tmp_path):
    s = make_sae("topk", seed=13)
    s.save(tmp_path / "model.layers.4")
    assert torch.equal(SAE.load(tmp_path).W_enc, s.W_enc)


# ---- broken files ------------------------------------------------------------------------------------

def _saved(tmp_path: Path, fmt: str = "saelens") -> tuple[Path, Path]:
    d = tmp_path / "sae"
    make_sae("topk", seed=14).save(d, format=fmt)
    return d, d / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors")


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
@pytest.mark.parametrize("damage", ["truncate", "truncate_header", "garbage", "empty", "flip_header"])
def test_damaged_weights_file_names_it(fmt, damage, tmp_path):
    d, f = _saved(tmp_path, fmt)
    b = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(b[: len(b) - 17])
    elif damage == "truncate_header":
        f.write_bytes(b[:20])
    elif damage == "garbage":
        f.write_bytes(os.urandom(len(b)))
    elif damage == "empty":
        f.write_bytes(b"")
    else:  # break the JSON header, keep the length
        f.write_bytes(b[:8] + b"#" + b[9:])
    with pytest.raises(SaetuneError, match=r"truncated or corrupted") as e:
        SAE.load(d)
    assert str(f) in str(e.value)


def _drop_k(cfg: dict) -> None:
    cfg.pop("k", None)
    cfg.get("metadata", {}).get("saetune", {}).pop("k", None)


CFG_DAMAGE = {
    "not_json": "{not json",
    "a_list": "[1, 2]",
    "empty_file": "",
    "empty_object": {},
    "no_d_in": lambda c: c.pop("d_in"),
    "no_k": _drop_k,
    "k_too_big": lambda c: c.update(k=10_000),
    "d_in_not_int": lambda c: c.update(d_in="x"),
}


@pytest.mark.parametrize("fmt,damage", [(f, d) for f in ("saelens", "sparsify") for d in CFG_DAMAGE
                                         # sparsify's d_in is redundant with the weights' shape
                                         if not (f == "sparsify" and d == "no_d_in")])
def test_bad_cfg_json_names_it(fmt, damage, tmp_path):
    d, _ = _saved(tmp_path, fmt)
    cfg_file = d / "cfg.json"
    how = CFG_DAMAGE[damage]
    if isinstance(how, str):
        text = how
    elif isinstance(how, dict):
        text = json.dumps(how)
    else:
        cfg = json.loads(cfg_file.read_text())
        how(cfg)
        text = json.dumps(cfg)
    cfg_file.write_text(text)
    with pytest.raises(SaetuneError) as e:
        SAE.load(d)
    assert str(d) in str(e.value) and "cfg.json" in str(e.value)
    if damage in ("not_json", "a_list", "empty_file", "empty_object", "no_d_in", "d_in_not_int"):
        assert str(cfg_file) in str(e.value)


def test_missing_and_mismatched_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    d, f = _saved(tmp_path)
    t = {k: v.contiguous() for k, v in make_sae("topk", seed=14).state_tensors().items()}
    save_file({k: v for k, v in t.items() if k != "b_dec"}, str(f))
    with pytest.raises(SaetuneError, match=r"lack 'b_dec'") as e:
        SAE.load(d)
    assert str(d) in str(e.value)
    save_file({**t, "b_dec": torch.zeros(D_IN + 1)}, str(f))
    with pytest.raises(SaetuneError, match=rf"'b_dec' has shape \({D_IN + 1},\)"):
        SAE.load(d)

    d2, f2 = _saved(tmp_path / "sp", "sparsify")
    t2 = load_file(str(f2))
    save_file({k: v for k, v in t2.items() if k != "encoder.bias"}, str(f2))
    with pytest.raises(SaetuneError, match=r"sparsify weights lack 'encoder\.bias'") as e:
        SAE.load(d2)
    assert str(d2) in str(e.value)


def test_missing_path_and_missing_weights(tmp_path):
    with pytest.raises(SaetuneError, match="does not exist"):
        SAE.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaetuneError, match="holds no SAE"):
        SAE.load(tmp_path / "empty")
    d, f = _saved(tmp_path)
    f.unlink()
    with pytest.raises(SaetuneError, match=r"neither sae_weights\.safetensors.*nor sae\.safetensors"):
        SAE.load(d)
