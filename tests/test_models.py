"""Hook points (names, capture, replace, early stop) on tensor- and tuple-returning blocks; model paths."""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from saetune.errors import SaetuneError
from saetune.models import (HookPoint, StopForward, capture, decoder_layers, first_tensor, load_model,
                            model_width, parse_dtype, replace_activation, replace_first, resolve_hook,
                            resolve_model_path, run_to_hooks, valid_hook_names)

N_LAYERS = 4


# ---- fixtures ---------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen():
    from saetune.toy.model import build_model
    from saetune.toy.tokenizer import build_tokenizer

    return build_model(build_tokenizer(), seed=1).eval()


@pytest.fixture(scope="module")
def ids(qwen):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, qwen.config.vocab_size, (2, 12), generator=g)


class TupleBlock(nn.Module):
    """A decoder block as older transformers / remote-code models have it: returns ``(hidden, None)``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        # keep the real block's children at this level, so model.layers.N.mlp still exists
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self._layer = [layer]  # not a submodule: its children are registered above

    def forward(self, hidden_states, **kwargs):
        return (self._layer[0](hidden_states, **kwargs), None)


class TupleLM(nn.Module):
    """The toy model with tuple-returning blocks and a parent loop that unpacks them (and checks it)."""

    def __init__(self, base):
        super().__init__()
        base = copy.deepcopy(base)
        self.config = base.config
        self.model = nn.Module()
        self.model.embed_tokens = base.model.embed_tokens
        self.model.rotary_emb = base.model.rotary_emb
        self.model.layers = nn.ModuleList(TupleBlock(layer) for layer in base.model.layers)
        self.model.norm = base.model.norm
        self.lm_head = base.lm_head
        self.seen = []  # types of what the blocks returned to the parent

    def forward(self, input_ids, attention_mask=None, use_cache=False, output_hidden_states=False):
        h = self.model.embed_tokens(input_ids)  # (B, T, d)
        pos = torch.arange(input_ids.shape[1])[None]
        pe = self.model.rotary_emb(h, pos)
        hidden = [h]
        for layer in self.model.layers:
            # keyword call: exercises the kwargs branch of the resid_pre pre-hook
            out = layer(hidden_states=h, attention_mask=None, position_embeddings=pe, position_ids=pos)
            self.seen.append((type(out), len(out) if isinstance(out, tuple) else None,
                              out[1] if isinstance(out, tuple) else "n/a"))
            h = out[0]
            hidden.append(h)
        logits = self.lm_head(self.model.norm(h))
        return SimpleNamespace(logits=logits, hidden_states=tuple(hidden))


@pytest.fixture(scope="module")
def tuple_lm(qwen):
    return TupleLM(qwen).eval()


def hook_counts(model) -> list[int]:
    """How many forward / pre-forward hooks each module holds (transformers adds its own, permanently)."""
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def reference_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def block_outputs(model, ids):
    """Each block's output via a plain forward hook (no saetune code)."""
    outs = {}
    handles = [layer.register_forward_hook(
        lambda m, a, o, i=i: outs.__setitem__(i, (o if isinstance(o, torch.Tensor) else o[0]).detach()))
        for i, layer in enumerate(decoder_layers(model)[1])]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return outs


# ---- the two block kinds really are what the tests claim -----------------------------------------

def test_qwen2_blocks_return_tensors_and_tuple_blocks_return_tuples(qwen, tuple_lm, ids):
    kinds = []
    h = qwen.model.layers[0].register_forward_hook(lambda m, a, o: kinds.append(type(o)))
    with torch.no_grad():
        qwen(input_ids=ids)
    h.remove()
    assert kinds == [torch.Tensor]
    tuple_lm.seen.clear()
    with torch.no_grad():
        out = tuple_lm(ids)
    assert [s[0] for s in tuple_lm.seen] == [tuple] * N_LAYERS
    # the tuple model computes the same function as the Qwen2 model
    with torch.no_grad():
        ref = qwen(input_ids=ids).logits
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


def test_gpt2_blocks_in_this_transformers_version(ids):
    """Record which kind GPT-2 blocks return here, and check hooks agree with output_hidden_states."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=300, n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    kinds = []
    h = model.transformer.h[0].register_forward_hook(lambda m, a, o: kinds.append(type(o)))
    hs = reference_states(model, ids)
    h.remove()
    assert kinds and kinds[0] in (torch.Tensor, tuple)
    assert decoder_layers(model)[0] == "transformer.h"
    hp = resolve_hook(model, "blocks.1.hook_resid_post")
    assert hp.module_path == "transformer.h.1"
    acts = run_to_hooks(model, ids, [hp, resolve_hook(model, "layers.0")])
    torch.testing.assert_close(acts["transformer.h.1"], hs[2])
    torch.testing.assert_close(acts["transformer.h.0"], hs[1])
    assert resolve_hook(model, "blocks.0.hook_mlp_out").module_path == "transformer.h.0.mlp"
    assert resolve_hook(model, "blocks.0.hook_attn_out").module_path == "transformer.h.0.attn"


# ---- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,module_path,layer,site", [
    ("model.layers.0", "model.layers.0", 0, "block"),
    ("model.layers.3", "model.layers.3", 3, "block"),
    ("blocks.2.hook_resid_post", "model.layers.2", 2, "block"),
    ("blocks.2.hook_resid_pre", "model.layers.2", 2, "resid_pre"),
    ("blocks.1.hook_mlp_out", "model.layers.1.mlp", 1, "mlp"),
    ("blocks.1.hook_attn_out", "model.layers.1.self_attn", 1, "attn"),
    ("layers.2", "model.layers.2", 2, "block"),
    ("layers.2.mlp", "model.layers.2.mlp", 2, "mlp"),
    ("model.layers.0.self_attn", "model.layers.0.self_attn", 0, "attn"),
    ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj", 0, "module"),
])
def test_resolve_hook(qwen, tuple_lm, name, module_path, layer, site):
    for model in (qwen, tuple_lm):
        hp = resolve_hook(model, name)
        assert (hp.module_path, hp.layer, hp.site) == (module_path, layer, site)
        assert hp.is_input == (site == "resid_pre")
        model.get_submodule(hp.module_path)  # the path exists


def test_tl_and_sparsify_names_map_to_canonical(qwen):
    assert resolve_hook(qwen, "blocks.2.hook_resid_post").name == "model.layers.2"
    assert resolve_hook(qwen, "layers.2").name == "model.layers.2"
    assert resolve_hook(qwen, "layers.1.mlp").name == "model.layers.1.mlp"
    assert valid_hook_names(qwen) == [f"model.layers.{i}" for i in range(N_LAYERS)]


@pytest.mark.parametrize("name", ["model.layers.4", "blocks.7.hook_resid_post", "layers.9", "layers.4.mlp",
                                  "blocks.4.hook_mlp_out"])
def test_out_of_range_layer(qwen, name):
    with pytest.raises(SaetuneError) as e:
        resolve_hook(qwen, name)
    msg = str(e.value)
    assert repr(name) in msg
    assert "has 4 layers (0…3)" in msg
    assert "model.layers.0 … model.layers.3" in msg and "blocks.N.hook_resid_post" in msg


@pytest.mark.parametrize("name", ["model.layer.1", "blocks.1.hook_resid_mid", "decoder.1", "model.layers.1.nope",
                                  "model.layers.-1", "", "blocks.1"])
def test_unknown_hook_name_lists_valid_names(qwen, name):
    with pytest.raises(SaetuneError) as e:
        resolve_hook(qwen, name)
    msg = str(e.value)
    assert f"unknown hook name {name!r}" in msg
    assert "valid hook names: model.layers.0 … model.layers.3" in msg
    assert "hook_mlp_out" in msg and "hook_attn_out" in msg and "hook_resid_pre" in msg


def test_decoder_layers_without_any_module_list():
    with pytest.raises(SaetuneError, match="cannot find the decoder blocks of Linear"):
        decoder_layers(nn.Linear(2, 2))


# ---- capture ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tensor", "tuple"])
def test_capture_equals_output_hidden_states(qwen, tuple_lm, ids, kind):
    model = qwen if kind == "tensor" else tuple_lm
    hs = reference_states(model, ids)
    assert len(hs) == N_LAYERS + 1
    for n in range(N_LAYERS):
        hp = resolve_hook(model, f"model.layers.{n}")
        got = run_to_hooks(model, ids, [hp])[hp.name]
        assert got.shape == (2, 12, qwen.config.hidden_size)
        if kind == "tensor" and n == N_LAYERS - 1:
            # HF puts the *final-normed* state last in hidden_states; the block output is before the norm
            torch.testing.assert_close(qwen.model.norm(got), hs[-1], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, hs[-1], atol=1e-3)
        else:
            torch.testing.assert_close(got, hs[n + 1], rtol=0, atol=0)  # hidden_states[N+1] = block N
    # capture() itself, every block in one full forward
    hps = [resolve_hook(model, f"model.layers.{n}") for n in range(N_LAYERS)]
    with capture(model, hps) as acts, torch.no_grad():
        model(input_ids=ids)
    assert list(acts) == [hp.name for hp in hps]
    for n in range(N_LAYERS - 1):
        torch.testing.assert_close(acts[f"model.layers.{n}"], hs[n + 1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
def test_several_hooks_one_forward_and_all_sites(qwen, tuple_lm, ids, kind):
    model = qwen if kind == "tensor" else tuple_lm
    hs = reference_states(model, ids)
    names = ["model.layers.0", "blocks.2.hook_resid_post", "blocks.2.hook_resid_pre", "blocks.1.hook_mlp_out",
             "blocks.1.hook_attn_out", "layers.1.mlp"]
    hps = [resolve_hook(model, n) for n in names]
    # reference mlp / attn outputs from plain hooks
    ref = {}
    hooks = [model.get_submodule("model.layers.1.mlp").register_forward_hook(
                 lambda m, a, o: ref.__setitem__("mlp", o.detach())),
             model.get_submodule("model.layers.1.self_attn").register_forward_hook(
                 lambda m, a, o: ref.__setitem__("attn", first_tensor(o).detach()))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    calls = []
    counter = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    acts = run_to_hooks(model, ids, hps)
    counter.remove()
    assert len(calls) == 1  # one forward for all hooks
    assert set(acts) == {"model.layers.0", "model.layers.2", "blocks.2.hook_resid_pre", "model.layers.1.mlp",
                         "model.layers.1.self_attn"}
    torch.testing.assert_close(acts["model.layers.0"], hs[1], rtol=0, atol=0)
    torch.testing.assert_close(acts["model.layers.2"], hs[3], rtol=0, atol=0)
    torch.testing.assert_close(acts["blocks.2.hook_resid_pre"], hs[2], rtol=0, atol=0)
    torch.testing.assert_close(acts["model.layers.1.mlp"], ref["mlp"], rtol=0, atol=0)
    torch.testing.assert_close(acts["model.layers.1.self_attn"], ref["attn"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
def test_stop_early_really_stops(qwen, tuple_lm, ids, kind):
    model = qwen if kind == "tensor" else tuple_lm
    reference_states(model, ids)  # let transformers install its own capture hooks first
    n_hooks = hook_counts(model)
    ran = []
    handles = [model.model.layers[-1].register_forward_hook(lambda *a: ran.append("last")),
               model.lm_head.register_forward_hook(lambda *a: ran.append("head"))]
    try:
        acts = run_to_hooks(model, ids, [resolve_hook(model, "model.layers.1")])
        assert ran == []  # neither the last block nor the head ran
        assert acts["model.layers.1"].shape[-1] == qwen.config.hidden_size
        run_to_hooks(model, ids, [resolve_hook(model, "model.layers.1")], stop_early=False)
        assert ran == ["last", "head"]  # the probes do fire when the forward runs to the end
    finally:
        for h in handles:
            h.remove()
    # the early stop leaves no hooks behind and the model works normally afterwards
    assert hook_counts(model) == n_hooks
    hs = reference_states(model, ids)
    assert len(hs) == N_LAYERS + 1


def test_capture_stop_early_raises_stopforward_outside_run_to_hooks(qwen, ids):
    hp = resolve_hook(qwen, "model.layers.0")
    n_hooks = hook_counts(qwen)
    with capture(qwen, [hp], stop_early=True) as acts:
        with pytest.raises(StopForward), torch.no_grad():
            qwen(input_ids=ids)
    assert set(acts) == {"model.layers.0"}
    assert hook_counts(qwen) == n_hooks


def test_capture_keeps_graph_when_not_detached(qwen, ids):
    hp = resolve_hook(qwen, "model.layers.0")
    with capture(qwen, [hp], detach=False) as acts:
        qwen(input_ids=ids)
    assert acts["model.layers.0"].requires_grad
    with capture(qwen, [hp]) as acts:
        qwen(input_ids=ids)
    assert not acts["model.layers.0"].requires_grad


def test_hook_that_never_fires_is_reported(qwen, ids):
    bogus = HookPoint("model.layers.1", "model.layers.1", 1, "block")
    qwen.model.unused = nn.Linear(2, 2)
    try:
        with pytest.raises(SaetuneError, match="never fired"):
            run_to_hooks(qwen, ids, [bogus, HookPoint("model.unused", "model.unused", 0, "module")])
    finally:
        del qwen.model.unused


# ---- replace ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tensor", "tuple"])
def test_replace_activation_changes_output_and_is_removed(qwen, tuple_lm, ids, kind):
    model = qwen if kind == "tensor" else tuple_lm
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    n_hooks = hook_counts(model)
    hp = resolve_hook(model, "model.layers.1")
    seen_next = {}
    pre = model.model.layers[2].register_forward_pre_hook(
        lambda m, a, kw: seen_next.__setitem__("x", (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
    if kind == "tuple":
        tuple_lm.seen.clear()
    with replace_activation(model, hp, lambda h: torch.zeros_like(h)), torch.no_grad():
        during = model(input_ids=ids).logits.clone()
    pre.remove()
    assert not torch.allclose(during, before)
    assert torch.count_nonzero(seen_next["x"]) == 0  # the next block got the replacement
    if kind == "tuple":
        # the replaced output kept its tuple shape, second element included
        assert tuple_lm.seen[1] == (tuple, 2, None)
    assert hook_counts(model) == n_hooks
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
def test_replace_resid_pre(qwen, tuple_lm, ids, kind):
    model = qwen if kind == "tensor" else tuple_lm
    hs = reference_states(model, ids)
    n_hooks = hook_counts(model)
    hp = resolve_hook(model, "blocks.2.hook_resid_pre")
    with replace_activation(model, hp, lambda h: h * 0):
        acts = run_to_hooks(model, ids, [resolve_hook(model, "model.layers.2")])
    assert not torch.allclose(acts["model.layers.2"], hs[3])
    assert hook_counts(model) == n_hooks
    torch.testing.assert_close(run_to_hooks(model, ids, [resolve_hook(model, "model.layers.2")])["model.layers.2"],
                               hs[3], rtol=0, atol=0)


def test_replace_is_removed_after_an_exception(qwen, ids):
    hp = resolve_hook(qwen, "model.layers.0")
    n_hooks = hook_counts(qwen)
    with pytest.raises(RuntimeError):
        with replace_activation(qwen, hp, lambda h: h + 1):
            raise RuntimeError("inside")
    assert hook_counts(qwen) == n_hooks


def test_first_tensor_and_replace_first():
    x, y = torch.ones(2), torch.zeros(2)
    assert first_tensor(x) is x and first_tensor((x, 1)) is x and first_tensor([x]) is x
    assert replace_first(x, y) is y
    out = replace_first((x, "cache"), y)
    assert isinstance(out, tuple) and out[0] is y and out[1] == "cache"
    out = replace_first([x, 3], y)
    assert isinstance(out, list) and out[0] is y and out[1] == 3
    with pytest.raises(TypeError):
        first_tensor(3)


# ---- loading ----------------------------------------------------------------------------------

def test_resolve_model_path_toy(monkeypatch, tiny_model_dir, tmp_path):
    import saetune.toy.build as build

    monkeypatch.setattr(build, "BASE_DIR", tiny_model_dir)
    assert resolve_model_path("toy") == str(tiny_model_dir)
    monkeypatch.setattr(build, "BASE_DIR", tmp_path / "missing")
    with pytest.raises(SaetuneError, match="shipped toy model is missing"):
        resolve_model_path("toy")


def test_existing_dir_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(SaetuneError) as e:
        resolve_model_path(str(tmp_path))
    assert "config.json" in str(e.value) and str(tmp_path) in str(e.value)


def test_local_model_dir_resolves_to_itself(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_hub_id_offline_fails_fast(monkeypatch):
    """Offline, an uncached hub id fails at once: no connection is even tried (no connect timeout, no retries)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried = []

    def no_network(*args, **kwargs):
        tried.append(args)
        raise OSError("a connection tried in an offline test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(SaetuneError) as e:
        resolve_model_path("saetune-test-nonexistent-org/tiny-model-xyz")
    msg = str(e.value)
    assert "hub" in msg and "saetune-test-nonexistent-org/tiny-model-xyz" in msg
    with pytest.raises(SaetuneError, match="hub"):
        load_model("saetune-test-nonexistent-org/tiny-model-xyz")
    assert tried == []


def test_malformed_model_name(tmp_path):
    with pytest.raises(SaetuneError, match="neither an existing directory"):
        resolve_model_path(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(SaetuneError, match="neither an existing directory"):
        resolve_model_path("bad name with spaces")


def test_load_model_from_dir(tiny_model_dir, ids):
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.eos_token_id == model.config.eos_token_id
    assert model_width(model, resolve_hook(model, "model.layers.1")) == 128
    acts = run_to_hooks(model, ids, [resolve_hook(model, "model.layers.1")])
    assert torch.isfinite(acts["model.layers.1"]).all()
    model16, _ = load_model(str(tiny_model_dir), dtype="bf16", device="cpu")
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_loaded_tokenizer_tokenizes_like_the_saved_one(tiny_model_dir):
    """A saved toy dir (qwen2 config + word-level tokenizer.json) must not come back as a byte-level BPE."""
    from saetune.toy import examples
    from saetune.toy.tokenizer import build_tokenizer

    _, tok = load_model(str(tiny_model_dir), device="cpu")
    ref = build_tokenizer()
    for ex in examples(20, seed=0):
        ids = tok(ex["text"], add_special_tokens=False)["input_ids"]
        assert ids == ref(ex["text"], add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
    assert tok.eos_token_id == ref.eos_token_id and tok.chat_template == ref.chat_template


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(SaetuneError, match="unknown dtype 'int4'; valid: float32"):
        parse_dtype("int4")
