"""saetune.saes / run_with_cache / run_with_saes / run_with_hooks on HF models, TransformerBridge and
HookedTransformer: the cache's SAE keys against SAE.encode / decode, error-term semantics against the clean
model and an independent splice (models.replace_activation, TL's own run_with_hooks), latent ablation and
patching against hand computation, SAELens' own HookedSAETransformer / SAETransformerBridge as the
reference, and hook removal on exceptions."""

from __future__ import annotations

import copy

import pytest
import torch

import saetune
from saetune import SAE, SAEConfig
from saetune.errors import SaetuneError
from saetune.hooked import HookCache, SAE_HOOKS, active_places, encode_from_pre
from saetune.models import replace_activation, resolve_hook, run_to_hooks

from hooked_models import D_MODEL, bridge_of, hook_counts, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_HOOK = "model.layers.2"


# ---- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return tiny_llama()  # (model, tokenizer)


@pytest.fixture(scope="module")
def llama_bridge(llama):
    return bridge_of(llama[0], "llama")


def _sae(d_in: int, hook: str, arch: str = "topk", seed: int = 0) -> SAE:
    cfg = SAEConfig(d_in, 4 * d_in, k=6 if arch == "topk" else None, architecture=arch, hook_name=hook)
    sae = SAE(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases so every term of the formulas matters
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.b_enc.copy_(0.05 * torch.randn(cfg.d_sae, generator=g))
    return sae


_BASELINE: dict[int, dict] = {}


def _baseline(model, vocab: int) -> None:
    """Record the hooks ``model`` has of its own after a forward (a bridge adds some lazily)."""
    with torch.no_grad():
        model(_ids(vocab, (1, 4)))
    _BASELINE[id(model)] = hook_counts(model)


def _assert_unhooked(model) -> None:
    assert hook_counts(model) == _BASELINE.get(id(model), {})
    assert active_places(model) == []


@pytest.fixture(scope="module")
def cases(toy_base, llama, llama_bridge):
    """(model, SAE at a block output, the HF model computing the same function)."""
    toy = toy_base[0]
    out = {
        "toy": (toy, _sae(toy.config.hidden_size, TOY_HOOK), toy),
        "llama": (llama[0], _sae(D_MODEL, "model.layers.0"), llama[0]),
        "llama-bridge": (llama_bridge, _sae(D_MODEL, "blocks.0.hook_out"), llama[0]),
    }
    for model, _, hf in out.values():
        _baseline(model, hf.config.vocab_size)
    return out


CASES = ["toy", "llama", "llama-bridge"]


def _ids(model_vocab: int, shape=(2, 9), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model_vocab, shape, generator=torch.Generator().manual_seed(seed))


def _hf_activation(hf, hook: str, ids: torch.Tensor) -> torch.Tensor:
    hp = resolve_hook(hf, hook)
    return run_to_hooks(hf, ids, [hp], stop_early=False)[hp.name]


def _hf_logits_with(hf, hook: str, ids: torch.Tensor, fn) -> torch.Tensor:
    """Independent splice: models.replace_activation, the activation at ``hook`` replaced by fn(x)."""
    with replace_activation(hf, resolve_hook(hf, hook), fn):
        return hf(ids).logits


def _hf_hook(hf, sae_hook: str) -> str:
    """The HF spelling of a test SAE's hook (the bridge case's SAE is named the TL3 way)."""
    return "model.layers.0" if sae_hook == "blocks.0.hook_out" else sae_hook


# ---- cache contents ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_error_term", [False, True])
@torch.no_grad()
def test_cache_keys_follow_the_formulas(cases, case, use_error_term):
    model, sae, hf = cases[case]
    hook = sae.cfg.hook_name
    ids = _ids(hf.config.vocab_size)
    logits, cache = saetune.run_with_cache(model, ids, saes=[sae], use_error_term=use_error_term)
    assert isinstance(cache, HookCache)
    assert sorted(cache) == sorted(f"{hook}.{s}" for s in SAE_HOOKS)  # names_filter=None: SAE keys only
    x = _hf_activation(hf, _hf_hook(hf, hook), ids)  # [B, T, d], captured independently on the HF model
    c = {s: cache[f"{hook}.{s}"] for s in SAE_HOOKS}
    torch.testing.assert_close(c["hook_sae_input"], x, rtol=0, atol=1e-6)
    assert torch.equal(c["hook_sae_acts_pre"], (c["hook_sae_input"] - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.equal(c["hook_sae_acts_post"], sae.encode(c["hook_sae_input"]))
    assert c["hook_sae_acts_post"].shape == (*ids.shape, sae.d_sae)
    assert ((c["hook_sae_acts_post"] > 0).sum(-1) <= sae.cfg.k).all()
    assert torch.equal(c["hook_sae_recons"], sae.decode(c["hook_sae_acts_post"]))
    torch.testing.assert_close(c["hook_sae_error"], c["hook_sae_input"] - c["hook_sae_recons"], rtol=0, atol=0)
    want_out = c["hook_sae_recons"] + c["hook_sae_error"] if use_error_term else c["hook_sae_recons"]
    assert torch.equal(c["hook_sae_output"], want_out)
    _assert_unhooked(model)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_error_term_gives_the_clean_model_and_without_it_the_reconstruction(cases, case):
    model, sae, hf = cases[case]
    ids = _ids(hf.config.vocab_size, seed=1)
    clean = hf(ids).logits
    with_error = saetune.run_with_saes(model, ids, saes=[sae], use_error_term=True)
    torch.testing.assert_close(with_error, clean, rtol=0, atol=2e-5)
    spliced = saetune.run_with_saes(model, ids, saes=[sae])
    reference = _hf_logits_with(hf, _hf_hook(hf, sae.cfg.hook_name), ids, sae)  # x → sae(x), SAE.forward
    torch.testing.assert_close(spliced, reference, rtol=0, atol=2e-5)
    assert (spliced - clean).abs().max() > 1e-2  # the SAE really was in the path
    _assert_unhooked(model)


@torch.no_grad()
def test_bridge_splice_equals_transformer_lens_own_hooks(cases):
    llama_bridge = cases["llama-bridge"][0]
    sae = _sae(D_MODEL, "blocks.1.hook_mlp_out", seed=3)
    ids = _ids(llama_bridge.cfg.d_vocab, seed=2)
    ours = saetune.run_with_saes(llama_bridge, ids, saes=[sae])
    theirs = llama_bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_mlp_out", lambda t, hook: sae(t))])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    _assert_unhooked(llama_bridge)


# ---- interventions ------------------------------------------------------------------------------------

def _active_latent(cache: HookCache, hook: str) -> int:
    acts = cache[f"{hook}.hook_sae_acts_post"]
    return int((acts > 0).flatten(0, -2).sum(0).argmax())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_error_term", [False, True])
@torch.no_grad()
def test_zero_ablating_a_latent_matches_hand_computation(cases, case, use_error_term):
    model, sae, hf = cases[case]
    hook = sae.cfg.hook_name
    ids = _ids(hf.config.vocab_size, seed=3)
    base, cache = saetune.run_with_cache(model, ids, saes=[sae], use_error_term=use_error_term)
    j = _active_latent(cache, hook)

    def ablate(f, hook):
        f[..., j] = 0  # in place, returning None, as TL hooks may
    seen = []
    logits = saetune.run_with_hooks(model, ids, fwd_hooks=[(f"{hook}.hook_sae_acts_post", ablate),
                                                           (f"{hook}.hook_sae_acts_post", lambda f, h: seen.append(h.name))],
                                    saes=[sae], use_error_term=use_error_term)
    assert seen == [f"{hook}.hook_sae_acts_post"]

    def by_hand(x):
        f = sae.encode(x)
        f_j = f[..., j:j + 1].clone()
        f[..., j] = 0
        return x - f_j * sae.W_dec[j] if use_error_term else sae.decode(f)
    torch.testing.assert_close(logits, _hf_logits_with(hf, _hf_hook(hf, hook), ids, by_hand), rtol=0, atol=2e-5)
    assert (logits - base).abs().max() > 1e-4
    _assert_unhooked(model)


@pytest.mark.parametrize("case", ["toy", "llama-bridge"])
@torch.no_grad()
def test_clamping_and_patching_latents(cases, case):
    model, sae, hf = cases[case]
    hook = sae.cfg.hook_name
    ids_a, ids_b = _ids(hf.config.vocab_size, seed=4), _ids(hf.config.vocab_size, seed=5)
    _, cache_a = saetune.run_with_cache(model, ids_a, saes=[sae])
    patched = saetune.run_with_hooks(model, ids_b, saes=[sae], fwd_hooks=[
        (f"{hook}.hook_sae_acts_post", lambda f, h: cache_a[f"{hook}.hook_sae_acts_post"])])
    x_a = _hf_activation(hf, _hf_hook(hf, hook), ids_a)  # run A's activation, captured independently
    want = _hf_logits_with(hf, _hf_hook(hf, hook), ids_b, lambda x: sae.decode(sae.encode(x_a)))
    torch.testing.assert_close(patched, want, rtol=0, atol=2e-5)

    j = _active_latent(cache_a, hook)
    clamped = saetune.run_with_hooks(model, ids_a, saes=[sae], use_error_term=True, fwd_hooks=[
        (f"{hook}.hook_sae_acts_post", lambda f, h: f.index_fill(-1, torch.tensor([j]), 5.0))])

    def by_hand(x):
        return x + (5.0 - sae.encode(x)[..., j:j + 1]) * sae.W_dec[j]
    torch.testing.assert_close(clamped, _hf_logits_with(hf, _hf_hook(hf, hook), ids_a, by_hand), rtol=0, atol=2e-5)


@torch.no_grad()
def test_edited_pre_activations_go_through_the_sae_activation(cases):
    model, sae, hf = cases["toy"]
    ids = _ids(hf.config.vocab_size, seed=6)
    _, cache = saetune.run_with_cache(model, ids, saes=[sae], fwd_hooks=[
        (f"{TOY_HOOK}.hook_sae_acts_pre", lambda pre, h: pre * 2)])
    x = cache[f"{TOY_HOOK}.hook_sae_input"]
    pre2 = 2 * sae.pre_acts(x)
    assert torch.equal(cache[f"{TOY_HOOK}.hook_sae_acts_pre"], pre2)
    v, i = pre2.topk(sae.cfg.k, dim=-1)  # TopK of the edited pre-activation, by hand
    torch.testing.assert_close(cache[f"{TOY_HOOK}.hook_sae_acts_post"],
                               torch.zeros_like(pre2).scatter(-1, i, v.relu()), rtol=0, atol=0)
    # the error stays the unedited SAE's: x − decode(encode(x))
    torch.testing.assert_close(cache[f"{TOY_HOOK}.hook_sae_error"], x - sae.decode(sae.encode(x)), rtol=0, atol=1e-6)


def test_encode_from_pre_equals_encode_for_each_architecture():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    for arch in ("topk", "standard", "jumprelu"):
        sae = _sae(16, "model.layers.0", arch=arch, seed=2)
        assert torch.equal(encode_from_pre(sae, x, sae.pre_acts(x)), sae.encode(x))
        assert "pre_acts" not in vars(sae)  # the override is gone


# ---- against SAELens' own implementation ----------------------------------------------------------------

def _saelens_topk(hook: str, seed: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sl = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=64, k=4))
    sl.cfg.metadata.hook_name = hook
    with torch.no_grad():
        sl.b_dec.normal_(0, 0.1)
        sl.b_enc.normal_(0, 0.05)
    return sl


@pytest.mark.parametrize("use_error_term", [False, True])
@torch.no_grad()
def test_same_cache_as_saelens_sae_transformer_bridge(llama, use_error_term):
    from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge

    from saetune.toy import build_tokenizer

    bridge = SAETransformerBridge.boot_transformers("llama", hf_model=copy.deepcopy(llama[0]),
                                                    tokenizer=build_tokenizer())
    sl = _saelens_topk("blocks.1.hook_resid_post")
    ids = _ids(bridge.cfg.d_vocab, seed=7)
    ref_logits, ref = bridge.run_with_cache_with_saes(ids, saes=[sl], use_error_term=use_error_term)
    _BASELINE[id(bridge)] = hook_counts(bridge)
    logits, cache = saetune.run_with_cache(bridge, ids, saes=[sl], use_error_term=use_error_term)
    assert torch.equal(logits, ref_logits)
    # SAELens on a bridge names the keys by the resolved hook (blocks.1.hook_out); ours by the name given,
    # and a lookup in the other spelling finds them
    steps = [s for s in SAE_HOOKS if use_error_term or s != "hook_sae_error"]  # SAELens skips the error then
    for s in steps:
        assert torch.equal(cache[f"blocks.1.hook_resid_post.{s}"], ref[f"blocks.1.hook_out.{s}"]), s
        assert torch.equal(cache[f"blocks.1.hook_out.{s}"], ref[f"blocks.1.hook_out.{s}"]), s
    _assert_unhooked(bridge)


@torch.no_grad()
def test_same_cache_as_saelens_hooked_sae_transformer():
    from sae_lens.analysis.hooked_sae_transformer import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    ht = HookedSAETransformer(HookedTransformerConfig(n_layers=2, d_model=D_MODEL, d_head=8, n_ctx=32, d_vocab=50,
                                                      act_fn="gelu", d_mlp=64)).eval()
    sl = _saelens_topk("blocks.0.hook_mlp_out", seed=1)
    ids = _ids(50, seed=8)
    ref_logits, ref = ht.run_with_cache_with_saes(ids, saes=[sl], use_error_term=True)
    _BASELINE[id(ht)] = hook_counts(ht)
    logits, cache = saetune.run_with_cache(ht, ids, saes=[sl], use_error_term=True,
                                           names_filter=["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for s in SAE_HOOKS:
        assert torch.equal(cache[f"blocks.0.hook_mlp_out.{s}"], ref[f"blocks.0.hook_mlp_out.{s}"]), s
    assert torch.equal(cache["blocks.1.hook_resid_pre"], ref["blocks.1.hook_resid_pre"])
    _assert_unhooked(ht)


def test_saelens_sae_converts_with_shared_weights():
    from saetune.sae_convert import from_saelens

    sl = _saelens_topk("blocks.0.hook_resid_post", seed=2)
    ours = from_saelens(sl)
    assert (ours.cfg.hook_name, ours.cfg.architecture, ours.cfg.k) == ("blocks.0.hook_resid_post", "topk", 4)
    x = torch.randn(4, D_MODEL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.encode(x), sl.encode(x))
        torch.testing.assert_close(ours.decode(ours.encode(x)), sl.decode(sl.encode(x)), rtol=0, atol=1e-6)
        sl.W_dec.mul_(2)  # shared storage: an edit to one is an edit to the other
        assert torch.equal(ours.W_dec, sl.W_dec)
    from saetune.sae_convert import as_saetune
    first = as_saetune(sl)
    assert as_saetune(sl) is first  # converted once per object...
    sl.W_dec = torch.nn.Parameter(sl.W_dec.detach().clone())
    again = as_saetune(sl)  # ...and again once its tensors are replaced
    assert again is not first and again.W_dec.data_ptr() == sl.W_dec.data_ptr()


def test_saelens_options_that_change_the_maths_are_refused():
    from sae_lens import StandardSAE, StandardSAEConfig

    from saetune.sae_convert import from_saelens

    sl = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16, normalize_activations="expected_average_only_in"))
    with pytest.raises(SaetuneError, match="normalize_activations='expected_average_only_in' is not supported"):
        from_saelens(sl)


# ---- the context manager, nesting, forms of arguments -----------------------------------------------------

@torch.no_grad()
def test_saes_block_splices_plain_forward_calls_and_nests(cases):
    model, sae, _ = cases["toy"]
    ids = _ids(model.config.vocab_size, seed=9)
    clean = model(ids).logits
    want = saetune.run_with_saes(model, ids, saes=[sae])
    inner = _sae(model.config.hidden_size, "blocks.2.hook_resid_post", seed=5)
    inner_want = _hf_logits_with(model, TOY_HOOK, ids, inner)
    with saetune.saes(model, [sae]) as m:
        assert m is model
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
        # a run inside the block records the enclosing block's SAE and adds its own
        other = _sae(model.config.hidden_size, "blocks.0.hook_mlp_out", seed=4)
        _, cache = saetune.run_with_cache(model, ids, saes=[other])
        assert f"{TOY_HOOK}.hook_sae_acts_post" in cache and "blocks.0.hook_mlp_out.hook_sae_acts_post" in cache
        # an inner SAE at the same place takes over, and the outer one is back afterwards
        torch.testing.assert_close(saetune.run_with_saes(model, ids, saes=[inner]), inner_want, rtol=0, atol=2e-5)
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, clean, rtol=0, atol=0)
    _assert_unhooked(model)


@torch.no_grad()
def test_sae_argument_forms(cases):
    model, sae, _ = cases["toy"]
    ids = _ids(model.config.vocab_size, seed=10)
    want = saetune.run_with_saes(model, ids, saes=[sae])
    unnamed = copy.deepcopy(sae)
    unnamed.cfg.hook_name = ""
    for form in (sae, [sae], [(TOY_HOOK, unnamed)], {TOY_HOOK: unnamed}, ("layers.2", unnamed),
                 {"blocks.2.hook_out": unnamed}):
        torch.testing.assert_close(saetune.run_with_saes(model, ids, saes=form), want, rtol=0, atol=0)
    with pytest.raises(SaetuneError, match=r"saes\[0\] has no cfg.hook_name; give its hook"):
        saetune.run_with_saes(model, ids, saes=[unnamed])
    with pytest.raises(SaetuneError, match="two SAEs given for one hook point: 'model.layers.2' and "
                                           "'blocks.2.hook_resid_post' are both 'model.layers.2'"):
        saetune.run_with_saes(model, ids, saes=[sae, ("blocks.2.hook_resid_post", unnamed)])
    with pytest.raises(SaetuneError, match="saes must be an SAE"):
        saetune.run_with_saes(model, ids, saes="model.layers.2")
    with pytest.warns(UserWarning, match="trained at 'model.layers.2' is spliced at 'model.layers.1'"):
        saetune.run_with_saes(model, ids, saes=[("model.layers.1", sae)])
    _assert_unhooked(model)


@torch.no_grad()
def test_names_filter_forms_and_spelling_lookup(cases):
    model, sae, _ = cases["toy"]
    ids = _ids(model.config.vocab_size, seed=11)
    x1 = _hf_activation(model, "model.layers.1.mlp", ids)
    _, c = saetune.run_with_cache(model, ids, names_filter="blocks.1.mlp.hook_out")
    assert list(c) == ["blocks.1.mlp.hook_out"] and torch.equal(c["blocks.1.mlp.hook_out"], x1)
    assert torch.equal(c["model.layers.1.mlp"], x1) and "layers.1.mlp" in c and "model.layers.0.mlp" not in c
    _, c = saetune.run_with_cache(model, ids, saes=[sae], names_filter=lambda n: n.endswith("hook_resid_post"))
    assert sorted(k for k in c if "hook_sae" not in k) == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    # at the SAE's hook the model activation is what flows on: the SAE's output
    assert torch.equal(c["blocks.2.hook_resid_post"], c[f"{TOY_HOOK}.hook_sae_output"])
    _, c = saetune.run_with_cache(model, ids, names_filter=["model.layers.0", "blocks.1.hook_resid_pre"])
    assert torch.equal(c["model.layers.0"], c["blocks.1.hook_resid_pre"])  # the same stream, two places
    with pytest.raises(KeyError, match="'model.layers.3' is not in the cache; it holds: model.layers.0, "
                                       "blocks.1.hook_resid_pre"):
        c["model.layers.3"]
    assert c.get("nonsense") is None
    import pickle
    plain = pickle.loads(pickle.dumps(c))
    assert type(plain) is dict and list(plain) == list(c) and torch.equal(plain["model.layers.0"], c["model.layers.0"])
    with pytest.raises(SaetuneError, match="names_filter must be a hook name, a list"):
        saetune.run_with_cache(model, ids, names_filter=3)


@torch.no_grad()
def test_text_inputs(cases):
    model, sae, _ = cases["toy"]
    llama_bridge = cases["llama-bridge"][0]
    tok = saetune.toy.build_tokenizer()
    text = "what is 3 + 4 ?"
    ids = tok(text, return_tensors="pt")["input_ids"]
    want = saetune.run_with_saes(model, ids, saes=[sae])
    torch.testing.assert_close(saetune.run_with_saes(model, text, saes=[sae], tokenizer=tok), want, rtol=0, atol=0)
    torch.testing.assert_close(saetune.run_with_saes(model, ids[0], saes=[sae]), want, rtol=0, atol=0)  # [T]
    with pytest.raises(SaetuneError, match="inputs are text, but a Hugging Face model needs its tokenizer"):
        saetune.run_with_saes(model, text, saes=[sae])
    logits, cache = saetune.run_with_cache(llama_bridge, [text, "1 + 1"], names_filter="model.layers.1")
    assert logits.shape[:2] == cache["blocks.1.hook_out"].shape[:2] and logits.shape[0] == 2


# ---- cleanup ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_hooks_are_removed_when_a_hook_raises(cases, case):
    model, sae, hf = cases[case]
    hook = sae.cfg.hook_name
    ids = _ids(hf.config.vocab_size, seed=12)
    clean = model(ids)
    clean = clean.logits if hasattr(clean, "logits") else clean

    def boom(t, hook):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        saetune.run_with_cache(model, ids, saes=[sae], names_filter=["blocks.1.hook_resid_pre"],
                               fwd_hooks=[(f"{hook}.hook_sae_recons", boom)])
    _assert_unhooked(model)
    with pytest.raises(ValueError, match="inside"):
        with saetune.saes(model, [sae], use_error_term=False):
            assert hook_counts(model) != _BASELINE[id(model)]
            raise ValueError("inside the block")
    _assert_unhooked(model)
    after = model(ids)
    torch.testing.assert_close(after.logits if hasattr(after, "logits") else after, clean, rtol=0, atol=0)


@torch.no_grad()
def test_unknown_sae_step_and_device_errors(cases):
    model, sae, _ = cases["toy"]
    ids = _ids(model.config.vocab_size, seed=13)
    with pytest.raises(SaetuneError, match=r"hook 'model.layers.1.hook_sae_acts_post' is inside an SAE, but no SAE "
                                           r"is spliced at 'model.layers.1' in this run; SAEs spliced: model.layers.2"):
        saetune.run_with_hooks(model, ids, saes=[sae], fwd_hooks=[("model.layers.1.hook_sae_acts_post",
                                                                  lambda t, h: None)])
    with pytest.raises(SaetuneError, match=r"fwd_hooks\[0\] must be a \(name, fn\) pair"):
        saetune.run_with_hooks(model, ids, fwd_hooks=[("model.layers.1",)])
    _assert_unhooked(model)


# ---- gradients and dtypes -----------------------------------------------------------------------------------

def test_gradients_reach_the_latents_and_not_through_the_error_term(cases):
    """With the error term on, out = decode(f) + e with e a constant, so ∂logit/∂f = (∂logit/∂x) · W_decᵀ."""
    model, sae, _ = cases["toy"]
    ids = _ids(model.config.vocab_size, (1, 7), seed=14)
    kept = {}

    def keep(f, hook):
        f.retain_grad()
        kept["f"] = f
    logits = saetune.run_with_hooks(model, ids, saes=[sae], use_error_term=True,
                                    fwd_hooks=[(f"{TOY_HOOK}.hook_sae_acts_post", keep)])
    logits[0, -1, 5].backward()

    def leaf(x):  # the clean model with the activation at the hook as a leaf
        kept["x"] = x.detach().requires_grad_()
        return kept["x"]
    with replace_activation(model, resolve_hook(model, TOY_HOOK), leaf):
        model(ids).logits[0, -1, 5].backward()
    model.zero_grad(set_to_none=True)
    sae.zero_grad(set_to_none=True)
    torch.testing.assert_close(kept["f"].grad, kept["x"].grad @ sae.W_dec.detach().T, rtol=1e-5, atol=1e-6)
    assert kept["f"].grad.abs().max() > 0
    _assert_unhooked(model)


@torch.no_grad()
def test_bf16_model_with_an_fp32_sae(llama):
    model = copy.deepcopy(llama[0]).to(torch.bfloat16)
    sae = _sae(D_MODEL, "model.layers.1", seed=6)  # float32
    ids = _ids(model.config.vocab_size, seed=15)
    logits, cache = saetune.run_with_cache(model, ids, saes=[sae], use_error_term=True)
    assert logits.dtype == torch.bfloat16 and cache["model.layers.1.hook_sae_acts_post"].dtype == torch.float32
    torch.testing.assert_close(logits, model(ids).logits, rtol=0, atol=0)  # x̂ + (x − x̂) rounds back to x
    x = _hf_activation(model, "model.layers.1", ids)
    assert torch.equal(cache["model.layers.1.hook_sae_input"], x.float())
    spliced = saetune.run_with_saes(model, ids, saes=[sae])
    want = _hf_logits_with(model, "model.layers.1", ids, lambda x: sae.decode(sae.encode(x.float())).to(x.dtype))
    torch.testing.assert_close(spliced, want, rtol=0, atol=0)
