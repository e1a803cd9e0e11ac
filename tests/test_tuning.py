"""SAE-Tuning (Resa Stage II): the loss equals the reference computation, the shared-prefix
saving is exact, training moves the loss, checkpoints resume to the same adapter, bad input is named."""

import json

import pytest
from interrupt import interrupted_run
import torch
import torch.nn.functional as F

from saetune.distill import ce_from_hidden, kl_from_hidden
from saetune.errors import SaetuneError
from saetune.sae import SAE, SAEConfig
from saetune.tuning import SAETuner, TuneConfig, epoch_order, lr_at, tune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sae")
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.1"), seed=0).save(d / "sae")
    return d / "sae"


def _cfg(sae_dir, **kw):
    base = dict(model="toy", sae=str(sae_dir), dataset="toy", max_examples=120, context_size=48, progress=False,
                lora_r=4, lora_alpha=16, log_every=1)
    base.update(kw)
    return TuneConfig(**base)


def test_kl_from_hidden_equals_materialised_kl():
    g = torch.Generator().manual_seed(0)
    h_t, h_s = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g, requires_grad=True)
    W, b = torch.randn(13, 5, generator=g), torch.randn(13, generator=g)
    got = kl_from_hidden(h_t, h_s, W, b, chunk=3)
    ref = F.kl_div(F.log_softmax(h_s @ W.T + b, -1), F.softmax(h_t @ W.T + b, -1), reduction="sum")
    torch.testing.assert_close(got, ref)
    (g1,) = torch.autograd.grad(got, h_s)
    (g2,) = torch.autograd.grad(ref, h_s)
    torch.testing.assert_close(g1, g2)


def test_ce_from_hidden_equals_cross_entropy():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(11, 6, generator=g, requires_grad=True)
    W = torch.randn(9, 6, generator=g)
    y = torch.randint(0, 9, (11,), generator=g)
    y[3] = -100
    torch.testing.assert_close(ce_from_hidden(h, y, W, chunk=4), F.cross_entropy(h @ W.T, y, reduction="sum"))


def test_lr_schedules():
    assert lr_at(0, 10, 1.0, "constant", 0) == 1.0
    assert lr_at(0, 10, 1.0, "constant", 4) == 0.25
    assert lr_at(9, 10, 1.0, "cosine", 0) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.9 * torch.pi)).item()))
    assert lr_at(5, 10, 1.0, "linear", 0) == pytest.approx(0.5)
    assert epoch_order(5, 0, False, 0).tolist() == [0, 1, 2, 3, 4]
    assert epoch_order(50, 1, True, 0).tolist() != epoch_order(50, 2, True, 0).tolist()


def test_loss_matches_the_reference_step(sae_dir):
    """Teacher = target without SAE and adapters, student = SAE spliced in; KL batchmean on (B, T, V)."""
    from saetune.models import load_model, replace_activation, resolve_hook
    tuner = SAETuner(_cfg(sae_dir, lora_dropout=0.0), "cpu")
    ids = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(2))
    loss, m = tuner.loss(ids)

    model, _ = load_model("toy", device="cpu")
    sae = SAE.load(sae_dir)
    hp = resolve_hook(model, "model.layers.1")
    with torch.no_grad():
        p = F.softmax(model(ids).logits.float(), -1)
        with replace_activation(model, hp, lambda x: sae(x)):
            log_q = F.log_softmax(model(ids).logits.float(), -1)
    ref = F.kl_div(log_q, p, reduction="batchmean")
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    assert 0 < m["fvu"] and m["kl"] == pytest.approx(ref.item(), rel=1e-4)


def test_shared_prefix_gives_the_same_training_as_the_full_student(sae_dir):
    fast = SAETuner(_cfg(sae_dir, lora_dropout=0.0), "cpu")
    full = SAETuner(_cfg(sae_dir, lora_dropout=0.0, shared_prefix=False), "cpu")
    assert fast.exact and not full.exact
    assert fast.lora_layers == [2, 3] and full.lora_layers == [0, 1, 2, 3]
    # same initial adapter on the blocks after the hook (B = 0 everywhere, so blocks ≤ hook are inert)
    full_params = dict(full.peft.named_parameters())
    with torch.no_grad():
        for n, p in fast.peft.named_parameters():
            if p.requires_grad:
                full_params[n].copy_(p)
    curves = []
    for t in (fast, full):
        opt = torch.optim.AdamW(t.trainable(), lr=1e-3, weight_decay=0.01)
        losses = []
        for s in range(3):
            ids = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(10 + s))
            loss, _ = t.loss(ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][0] != curves[0][-1]  # training moved the loss
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-5)
    # and the adapters in blocks ≤ hook of the full student got no update that matters: B stayed zero
    for n, p in full.peft.named_parameters():
        if "lora_B" in n and (".layers.0." in n or ".layers.1." in n):
            assert torch.count_nonzero(p) == 0, n


def test_non_default_switches_turn_the_saving_off(sae_dir):
    assert not _cfg(sae_dir, stop_grad=False).exact_prefix
    assert not _cfg(sae_dir, error_term=True).exact_prefix
    t = SAETuner(_cfg(sae_dir, error_term=True, lora_dropout=0.0), "cpu")
    ids = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(3))
    loss, m = t.loss(ids)  # the error term passes x itself: with B = 0 the student is the teacher
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and m["fvu"] > 0
    ce = SAETuner(_cfg(sae_dir, loss="ce"), "cpu")
    loss, m = ce.loss(ids)
    assert "ce" in m and 0 < loss.item() < 20


def test_tune_run_trains_saves_and_resumes_identically(sae_dir, tmp_path, monkeypatch):
    cfg = _cfg(sae_dir, lr=2e-3, max_steps=6, checkpoint_every=3, batch_size=2)
    full = tune(cfg, tmp_path / "full")
    assert full["steps"] == 6 and full["eval_seqs"] == 8
    assert full["eval_loss_after"] < full["eval_loss_before"]  # held-out KL through the SAE went down
    d = tmp_path / "full"
    assert (d / "adapter" / "adapter_config.json").exists() and (d / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((d / "manifest.json").read_text())["status"] == "complete"
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "kl", "fvu", "tokens_per_s", "grad_norm", "lr", "tokens"} <= set(rows[0])

    interrupted_run(monkeypatch, SAETuner, "loss", 5, tune, cfg, tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["status"] == "failed"
    tune(cfg, tmp_path / "killed", resume=True)
    from safetensors.torch import load_file
    a = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_width_mismatch_is_named(tmp_path):
    SAE(SAEConfig(d_in=64, d_sae=128, k=4, hook_name="model.layers.1")).save(tmp_path / "narrow")
    with pytest.raises(SaetuneError, match="d_in=64.*width 128"):
        SAETuner(_cfg(tmp_path / "narrow"), "cpu")


def test_bad_target_modules_and_last_block(sae_dir):
    with pytest.raises(SaetuneError, match="linear modules are named"):
        SAETuner(_cfg(sae_dir, target_modules=["no_such_proj"]), "cpu")
    with pytest.raises(SaetuneError, match="last block"):
        SAETuner(_cfg(sae_dir, hook="model.layers.3"), "cpu")


def test_without_an_sae_it_is_plain_lora_sft(tmp_path):
    res = tune(TuneConfig(model="toy", dataset="toy", max_examples=100, context_size=48, loss="ce", lr=2e-3, lora_alpha=8,
                          max_steps=3, lora_r=4, progress=False, eval_seqs=2), tmp_path / "sft")
    assert res["hook"] is None and res["sae_sha256"] is None and res["lora_layers"] == [0, 1, 2, 3]
    assert res["eval_loss_after"] < res["eval_loss_before"]
    with pytest.raises(SaetuneError, match="loss 'kl' needs an SAE"):
        TuneConfig(model="toy")


def test_fused_head_losses_give_weight_and_bias_gradients_and_scale_with_upstream():
    g = torch.Generator().manual_seed(5)
    h_t, h_s = torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g, requires_grad=True)
    W = torch.randn(11, 6, generator=g, requires_grad=True)
    b = torch.randn(11, generator=g, requires_grad=True)
    got = 3.0 * kl_from_hidden(h_t, h_s, W, b, chunk=4)
    p_teacher = F.softmax((h_t @ W.T + b).detach(), -1)  # a no-grad teacher pass: p is a constant
    ref = 3.0 * F.kl_div(F.log_softmax(h_s @ W.T + b, -1), p_teacher, reduction="sum")
    for a, r in zip(torch.autograd.grad(got, (h_s, W, b)), torch.autograd.grad(ref, (h_s, W, b))):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    y = torch.randint(0, 11, (9,), generator=g)
    y[0] = -100
    got = ce_from_hidden(h_s, y, W, b, chunk=2).sum() * 0.5
    ref = F.cross_entropy(h_s @ W.T + b, y, reduction="sum") * 0.5
    torch.testing.assert_close(got, ref)
    for a, r in zip(torch.autograd.grad(got, (h_s, W, b)), torch.autograd.grad(ref, (h_s, W, b))):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_public_names():
    import saetune
    assert saetune.tune is tune and saetune.TuneConfig is TuneConfig
    from saetune.attach import attach_sae, merge
    assert (saetune.merge, saetune.attach_sae) == (merge, attach_sae)  # saetune.attach is the module
