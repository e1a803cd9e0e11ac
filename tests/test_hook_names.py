"""Hook names from four worlds — HF module paths, TransformerLens, TransformerBridge (transformer-lens 3),
sparsify — reach the same place on a HF model, its TransformerBridge and a HookedTransformer; the errors
for unknown names, wrong widths and a transformer-lens without TransformerBridge."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import saetune
from saetune import SAE, SAEConfig
from saetune.errors import SaetuneError
from saetune.hooked import hook_names, to_bridge
from saetune.models import parse_standard_hook, resolve_hook, tl_hook_names

from hooked_models import D_MODEL, N_LAYERS, bridge_of, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- pure name parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("model.layers.12", (12, "block")), ("transformer.h.3", (3, "block")), ("layers.5", (5, "block")),
    ("gpt_neox.layers.1", (1, "block")), ("model.layers.2.mlp", (2, "mlp")), ("layers.2.mlp", (2, "mlp")),
    ("transformer.h.0.attn", (0, "attn")), ("model.layers.4.self_attn", (4, "attn")),
    ("blocks.7.hook_resid_post", (7, "block")), ("blocks.7.hook_out", (7, "block")),
    ("blocks.7.hook_resid_pre", (7, "resid_pre")), ("blocks.7.hook_in", (7, "resid_pre")),
    ("blocks.7.hook_mlp_out", (7, "mlp")), ("blocks.7.mlp.hook_out", (7, "mlp")),
    ("blocks.7.hook_attn_out", (7, "attn")), ("blocks.7.attn.hook_out", (7, "attn")),
    ("model.layers.2.mlp.down_proj", None), ("blocks.7.hook_resid_mid", None),
    ("model.layers.x", None), ("hook_embed", None), ("", None), ("blocks.7", (7, "block")),
])
def test_parse_standard_hook(name, expected):
    assert parse_standard_hook(name) == expected


def test_tl_hook_names_round_trip():
    for site in ("block", "resid_pre", "mlp", "attn"):
        for name in tl_hook_names(3, site):
            assert parse_standard_hook(name) == (3, site)


# ---- models ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    """kind → (HF model, its TransformerBridge over a copy, HF block prefix, HF attention child name)."""
    llama, _ = tiny_llama()
    gpt2, _ = tiny_gpt2()
    return {"llama": (llama, bridge_of(llama, "llama"), "model.layers", "self_attn"),
            "gpt2": (gpt2, bridge_of(gpt2, "gpt2"), "transformer.h", "attn")}


def _spellings(prefix: str, attn: str, i: int) -> dict[str, list[str]]:
    return {
        "block": [f"{prefix}.{i}", f"layers.{i}", f"blocks.{i}.hook_resid_post", f"blocks.{i}.hook_out"],
        "resid_pre": [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_in"],
        "mlp": [f"{prefix}.{i}.mlp", f"layers.{i}.mlp", f"blocks.{i}.hook_mlp_out", f"blocks.{i}.mlp.hook_out"],
        "attn": [f"{prefix}.{i}.{attn}", f"blocks.{i}.hook_attn_out", f"blocks.{i}.attn.hook_out"],
    }


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_transformer_bridge_names_resolve_on_hf_models(models, kind):
    hf, _, prefix, attn = models[kind]
    assert resolve_hook(hf, "blocks.1.hook_out").module_path == f"{prefix}.1"
    hp = resolve_hook(hf, "blocks.1.hook_in")
    assert (hp.module_path, hp.site, hp.is_input) == (f"{prefix}.1", "resid_pre", True)
    assert resolve_hook(hf, "blocks.0.mlp.hook_out").module_path == f"{prefix}.0.mlp"
    assert resolve_hook(hf, "blocks.0.attn.hook_out").module_path == f"{prefix}.0.{attn}"
    names = hook_names(hf)
    assert f"{prefix}.1" in names and "blocks.1.hook_resid_post" in names and f"{prefix}.0.mlp" in names
    assert len(names) == N_LAYERS * 7


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_every_spelling_reads_the_same_activation_on_hf_and_bridge(models, kind):
    hf, bridge, prefix, attn = models[kind]
    ids = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    i = 1
    names = [n for group in _spellings(prefix, attn, i).values() for n in group] + [f"{prefix}.0"]
    hf_logits, hf_cache = saetune.run_with_cache(hf, ids, names_filter=names)
    br_logits, br_cache = saetune.run_with_cache(bridge, ids, names_filter=names)
    torch.testing.assert_close(br_logits, hf_logits, rtol=0, atol=1e-5)
    assert sorted(hf_cache) == sorted(br_cache) == sorted(set(names))
    for site, group in _spellings(prefix, attn, i).items():
        ref = hf_cache[group[0]]
        assert ref.shape == (2, 7, D_MODEL)
        for name in group:
            assert torch.equal(hf_cache[name], ref), (site, name)
            torch.testing.assert_close(br_cache[name], ref, rtol=0, atol=1e-5, msg=f"{site} {name}")
    # an independent reference for the block outputs: HF's own hidden states (block 0's, before the final norm)
    hidden = hf(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hf_cache[f"{prefix}.0"], hidden[1], rtol=0, atol=0)
    # resid_pre of block 1 is the output of block 0
    torch.testing.assert_close(br_cache["blocks.1.hook_in"], hf_cache[f"{prefix}.0"], rtol=0, atol=1e-5)
    # resid_post = resid_pre + attn_out + mlp_out for these pre-norm blocks
    total = hf_cache["blocks.1.hook_resid_pre"] + hf_cache["blocks.1.hook_attn_out"] + hf_cache["blocks.1.hook_mlp_out"]
    torch.testing.assert_close(hf_cache["blocks.1.hook_resid_post"], total, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_splicing_at_each_spelling_changes_hf_and_bridge_alike(models, kind):
    hf, bridge, prefix, attn = models[kind]
    ids = torch.randint(0, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    clean = hf(ids).logits
    for site, group in _spellings(prefix, attn, 0).items():
        sae = SAE(SAEConfig(D_MODEL, 64, k=4, hook_name=group[0]), seed=3).eval()
        want = saetune.run_with_saes(hf, ids, saes=[sae])
        assert (want - clean).abs().max() > 1e-3, site
        for name in group:
            for model in (hf, bridge):
                got = saetune.run_with_saes(model, ids, saes=[(name, sae)])
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{site} {name} {type(model).__name__}")


@torch.no_grad()
def test_hooked_transformer_names():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    ht = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=D_MODEL, d_head=8, n_ctx=32, d_vocab=50,
                                                   act_fn="gelu", d_mlp=64)).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    _, ref = ht.run_with_cache(ids)
    names = {"model.layers.1": "blocks.1.hook_resid_post", "blocks.1.hook_out": "blocks.1.hook_resid_post",
             "blocks.1.hook_in": "blocks.1.hook_resid_pre", "layers.0.mlp": "blocks.0.hook_mlp_out",
             "blocks.0.mlp.hook_out": "blocks.0.hook_mlp_out", "transformer.h.0.attn": "blocks.0.hook_attn_out",
             "blocks.0.attn.hook_out": "blocks.0.hook_attn_out", "blocks.0.ln2.hook_normalized":
             "blocks.0.ln2.hook_normalized"}
    _, cache = saetune.run_with_cache(ht, ids, names_filter=list(names))
    for ours, theirs in names.items():
        assert torch.equal(cache[ours], ref[theirs]), ours


# ---- errors ------------------------------------------------------------------------------------------

@torch.no_grad()
def test_unknown_hook_names_list_the_valid_ones(models):
    hf, bridge, _, _ = models["llama"]
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(SaetuneError) as e:
        saetune.run_with_cache(hf, ids, names_filter=["blocks.1.hook_resid_mid"])
    msg = str(e.value)
    assert "unknown hook name 'blocks.1.hook_resid_mid'" in msg
    assert "valid hook names: model.layers.0 … model.layers.1" in msg and "blocks.N.hook_out" in msg
    with pytest.raises(SaetuneError) as e:
        saetune.run_with_cache(bridge, ids, names_filter=["blocks.1.hook_resid_pots"])
    msg = str(e.value)
    assert "unknown hook name 'blocks.1.hook_resid_pots'" in msg and "blocks.N.hook_resid_pre / hook_resid_post" in msg
    assert "close matches: blocks.1.hook_resid_post" in msg and "N in 0…1" in msg
    with pytest.raises(SaetuneError, match=r"hook 'model.layers.5' names layer 5, but the model has 2 layers \(0…1\)"):
        saetune.run_with_cache(bridge, ids, names_filter="model.layers.5")


@pytest.mark.parametrize("which", ["hf", "bridge"])
@torch.no_grad()
def test_width_mismatch_is_one_sentence_naming_both_widths_and_the_hook(models, which):
    hf, bridge, _, _ = models["llama"]
    model = hf if which == "hf" else bridge
    ids = torch.zeros(1, 3, dtype=torch.long)
    wide = SAE(SAEConfig(48, 96, k=4, hook_name="blocks.1.hook_resid_post"), seed=0)
    with pytest.raises(SaetuneError, match=r"the SAE for hook 'blocks.1.hook_resid_post'.* has d_in=48, but the "
                                           r"model's activation there is 32 wide; use an SAE trained at this hook of this model$"):
        saetune.run_with_saes(model, ids, saes=[wide])
    if which == "hf":  # a module whose width is known only once it runs: checked on the activation itself
        at_up = SAE(SAEConfig(D_MODEL, 64, k=4, hook_name="model.layers.0.mlp.up_proj"), seed=0)
        with pytest.raises(SaetuneError, match=r"'model.layers.0.mlp.up_proj' has d_in=32, but the model's "
                                               r"activation there is 64 wide"):
            saetune.run_with_saes(model, ids, saes=[at_up])
    assert saetune.hooked.active_places(model) == []


def test_to_bridge_boots_and_says_when_transformer_lens_has_no_bridge(monkeypatch):
    hf, tok = tiny_llama()
    ids = torch.randint(0, hf.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
        bridge = to_bridge(copy.deepcopy(hf), tok)
        torch.testing.assert_close(bridge(ids), want, rtol=0, atol=1e-5)
    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge", None)  # as in transformer-lens 2
    with pytest.raises(SaetuneError, match=r"^transformer-lens \S+ has no TransformerBridge \(it came with "
                                           r"transformer-lens 3\); upgrade"):
        to_bridge(hf, tok)
    monkeypatch.setitem(sys.modules, "transformer_lens", None)
    with pytest.raises(SaetuneError, match="^transformer-lens is not installed"):
        to_bridge(hf, tok)
