"""Merge, adapter transplant ("reasoning as an adapter") and the SAE as an inference hook."""

import json

import pytest
import torch

from saetune.attach import (AttachConfig, MergeConfig, adapter_shapes, attach, attach_sae, check_adapter_fits,
                            merge, parse_steer, resolve_adapter, steer_activation)
from saetune.errors import SaetuneError
from saetune.models import load_model, replace_activation, resolve_hook, run_to_hooks
from saetune.sae import SAE, SAEConfig
from saetune.tuning import TuneConfig, tune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("tuned")
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.1"), seed=0).save(d / "sae")
    cfg = TuneConfig(model="toy", sae=str(d / "sae"), dataset="toy", max_examples=100, context_size=48, lora_r=4,
                     lora_alpha=16, lr=5e-3, max_steps=4, progress=False, eval_seqs=2)
    tune(cfg, d / "tune")
    return d / "tune"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(4, 200, (1, 20), generator=torch.Generator().manual_seed(0))


def test_merge_writes_a_model_equal_to_model_plus_adapter(tuned, tmp_path):
    from peft import PeftModel
    card = merge(MergeConfig(adapter=str(tuned)), tmp_path / "m")
    merged_dir = tmp_path / "m" / "merged"
    assert (merged_dir / "config.json").exists() and (merged_dir / "model.safetensors").exists()
    text = (merged_dir / "README.md").read_text()
    assert card["adapter_sha256"] in text and card["sae_sha256"] in text and "model.layers.1" in text
    assert "lr:" in text  # the recipe
    merged, _ = load_model(str(merged_dir), device="cpu")
    base, _ = load_model("toy", device="cpu")
    ref = PeftModel.from_pretrained(base, str(tuned / "adapter")).eval()
    torch.testing.assert_close(_logits(merged, IDS), _logits(ref, IDS), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(merged, IDS), _logits(load_model("toy", device="cpu")[0], IDS))


def test_transplant_onto_another_model_of_the_same_shapes(tuned, tiny_model_dir, tmp_path):
    from peft import PeftModel
    res = attach(AttachConfig(model=str(tiny_model_dir), adapter=str(tuned)), tmp_path / "a")
    assert res["adapted_modules"] == len(adapter_shapes(resolve_adapter(tuned))) == 14  # 7 projections × 2 blocks
    conf = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tiny_model_dir)
    merged, _ = load_model(str(tmp_path / "a" / "merged"), device="cpu")
    b, _ = load_model(str(tiny_model_dir), device="cpu")
    ref = PeftModel.from_pretrained(b, str(tuned / "adapter")).eval()
    torch.testing.assert_close(_logits(merged, IDS), _logits(ref, IDS), rtol=1e-4, atol=1e-4)


def test_transplant_mismatch_names_the_module(tuned, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from saetune.toy.tokenizer import build_tokenizer
    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "narrow")
    tok.save_pretrained(tmp_path / "narrow")
    with pytest.raises(SaetuneError, match=r"model\.layers\.\d\.[\w.]+_proj.* maps \d+ → \d+ features, this model's "
                                           r"maps \d+ → \d+"):
        attach(AttachConfig(model=str(tmp_path / "narrow"), adapter=str(tuned)), tmp_path / "bad")
    cfg.num_hidden_layers = 2
    cfg.hidden_size, cfg.intermediate_size = 128, 512
    shallow = Qwen2ForCausalLM(cfg)
    with pytest.raises(SaetuneError, match=r"adapts 'model\.layers\.[23]\..*which this model does not have"):
        check_adapter_fits(shallow, resolve_adapter(tuned))
    with pytest.raises(SaetuneError, match="holds no peft adapter"):
        resolve_adapter(tmp_path)


def test_attach_sae_records_while_generating_and_replace_equals_splicing(toy_base):
    model, tok = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=1)
    ids = IDS[:, :10]
    with attach_sae(model, sae, top_k=4) as rec, torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, plain)  # record mode changes nothing
    pos = rec.per_position(0)
    assert len(pos) == 10 + 5 - 1 and all(0 < len(p) <= 4 for p in pos)
    hp = resolve_hook(model, "model.layers.2")
    with attach_sae(model, sae, mode="replace"):
        got = _logits(model, ids)
    with replace_activation(model, hp, lambda x: sae(x)):
        want = _logits(model, ids)
    torch.testing.assert_close(got, want)


def test_steering_moves_the_feature_contribution():
    g = torch.Generator().manual_seed(0)
    x, acts, W = torch.randn(3, 5, generator=g), torch.rand(3, 7, generator=g), torch.randn(7, 5, generator=g)
    y = steer_activation(x, acts, W, {2: 4.0})
    torch.testing.assert_close(y - x, (4.0 - acts[:, 2:3]) * W[2])
    assert parse_steer(["3=1.5", " 0 = -2 "]) == {3: 1.5, 0: -2.0}
    with pytest.raises(SaetuneError, match="not FEATURE=VALUE"):
        parse_steer(["x=1"])


def test_attach_sae_cli_run_writes_features(tmp_path):
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=1)
    sae.save(tmp_path / "sae")
    res = attach(AttachConfig(model="toy", sae=str(tmp_path / "sae"), prompts=["3 + 4 ="], max_new_tokens=4,
                              mode="steer", steer=["5=3.0"]), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "features.jsonl").read_text().splitlines()]
    assert res["prompts"] == 1 and rows[0]["steer"] == {"5": 3.0} and len(rows[0]["features"]) >= 4
    with pytest.raises(SaetuneError, match="out of range"):
        with attach_sae(load_model("toy", device="cpu")[0], sae, mode="steer", steer={999: 1.0}):
            pass
    with pytest.raises(SaetuneError, match="exactly one of adapter"):
        AttachConfig(model="toy")


# ---- attach_sae against a reference computed from the hook's own input ------------------------------------------

def _block_output(model, hook: str, into: list):
    """A forward hook on ``hook``'s block that appends the output it sees (registered before attach_sae: the
    activation the SAE reads; after: the activation the rest of the model gets)."""
    def grab(mod, args, out):
        into.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    return model.get_submodule(hook).register_forward_hook(grab)


@torch.no_grad()
def _top(sae, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return sae.encode(x).topk(k, dim=-1)


def test_attach_sae_records_the_top_k_of_sae_encode_at_every_position(toy_base):
    model, _ = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=1)
    seen: list[torch.Tensor] = []
    handle = _block_output(model, "model.layers.2", seen)
    try:
        with attach_sae(model, sae, top_k=4) as rec, torch.no_grad():
            model.generate(IDS[:, :10], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert [x.shape[1] for x in seen] == [10, 1, 1, 1, 1]  # the prompt, then one position per decoding step
        want_pos = []
        for x, v, i in zip(seen, rec.values, rec.indices, strict=True):
            rv, ri = _top(sae, x, 4)
            torch.testing.assert_close(v, rv)
            assert torch.equal(i, ri)
            want_pos += [[(int(j), round(float(a), 4)) for j, a in zip(ri[0, t], rv[0, t]) if a > 0]
                         for t in range(x.shape[1])]
        assert rec.per_position(0) == want_pos

        seen.clear()  # a batch of two rows: each row's positions are its own
        with attach_sae(model, sae, top_k=4) as rec, torch.no_grad():
            model(torch.cat([IDS[:, :10], IDS[:, 5:15]]))
    finally:
        handle.remove()
    rv, ri = _top(sae, seen[0], 4)
    for row in (0, 1):
        assert rec.per_position(row) == [[(int(j), round(float(a), 4)) for j, a in zip(ri[row, t], rv[row, t]) if a > 0]
                                         for t in range(10)]
    assert rec.per_position(0) != rec.per_position(1)


def test_attach_sae_steer_moves_the_features_to_their_values_and_changes_the_logits(toy_base):
    model, _ = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=1)
    ids = IDS[:, :12]
    with torch.no_grad():
        active = (sae.encode(run_to_hooks(model, ids, [resolve_hook(model, "model.layers.2")])["model.layers.2"]) > 0)
    on = int(active[0].sum(0).argmax())  # active at some positions: its current value must be taken out
    off = int((~active[0]).all(0).nonzero()[0])  # active nowhere
    steer = {on: 0.0, off: 5.0}
    read, got = [], []
    before = _block_output(model, "model.layers.2", read)
    try:
        with torch.no_grad():
            clean = model(ids).logits
            with attach_sae(model, sae, mode="steer", steer=steer):
                after = _block_output(model, "model.layers.2", got)
                try:
                    steered = model(ids).logits
                finally:
                    after.remove()
    finally:
        before.remove()
    x = read[-1]  # [1, T, d]
    with torch.no_grad():  # x + Σ_f (v_f − a_f(x))·W_dec[f]
        a = sae.encode(x)
        want = x + (0.0 - a[..., on:on + 1]) * sae.W_dec[on] + (5.0 - a[..., off:off + 1]) * sae.W_dec[off]
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    assert (got[0] - x).norm(dim=-1).min() > 1.0  # every position moved (feature `off` set to 5 everywhere)
    with torch.no_grad(), replace_activation(model, resolve_hook(model, "model.layers.2"), lambda h: want):
        torch.testing.assert_close(steered, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert (steered - clean).abs().max() > 0.1
