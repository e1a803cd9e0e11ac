"""saetune.metrics on hand-computed cases, and the trainer's held-out evaluation against a brute-force reference.

Each case is built so that the plausible mistake gives another number: an uncentred FVU denominator, a sign
flip in CE loss recovered, a wrong shift in the next-token CE, KL in the other direction, a mean of batch
means where batches differ in size.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from saetune.metrics import ce_loss_recovered, fvu, kl_per_token, l0, mse, next_token_ce, total_variance

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- reconstruction metrics ----------------------------------------------------------------------------------

def test_fvu_is_zero_for_a_perfect_and_one_for_the_mean_reconstruction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g) + 5.0  # a large mean: an uncentred denominator would give ≈ 0.04
    assert float(fvu(x, x)) == 0.0
    assert float(fvu(x, x.mean(0))) == pytest.approx(1.0, abs=1e-5)
    assert float(fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0, abs=1e-5)


def test_fvu_mse_and_total_variance_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 1 + 1 = 2
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])  # squared errors per token: 1 and 4
    assert float(total_variance(x)) == 2.0
    assert float(fvu(x, x_hat)) == pytest.approx(5.0 / 2.0)
    assert float(mse(x, x_hat)) == pytest.approx(2.5)  # mean over tokens of ‖x − x̂‖², not over elements (1.25)


def test_l0_counts_active_latents_per_token():
    acts = torch.tensor([[0.0, 2.0, 0.0, 0.5], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert float(l0(acts)) == pytest.approx((2 + 3 + 0) / 3)
    assert float(l0(acts.view(1, 3, 4))) == pytest.approx(5 / 3)  # [B, T, d_sae]: still per token


# ---- CE loss recovered, next-token CE, KL --------------------------------------------------------------------

def test_ce_loss_recovered_on_known_triples():
    # (CE_zero − CE_sae) / (CE_zero − CE_clean): clean 2.0, spliced 2.5, zero-ablated 4.0 → 1.5 / 2.0
    assert ce_loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert ce_loss_recovered(2.0, 2.0, 4.0) == pytest.approx(1.0)  # as good as clean
    assert ce_loss_recovered(2.0, 4.0, 4.0) == pytest.approx(0.0)  # as bad as zeros
    assert ce_loss_recovered(2.0, 5.0, 4.0) == pytest.approx(-0.5)  # worse than zeros
    assert math.isnan(ce_loss_recovered(3.0, 2.0, 3.0))  # zero ablation changes nothing: undefined


def test_next_token_ce_predicts_the_next_token():
    # logits at position t put margin 10 on ids[t + 1]: CE = log(1 + (V − 1)·e^−10) for every pair (t, t+1).
    # An unshifted CE (logits t vs ids t), or one shifted the other way, pays ≈ 10 nats instead.
    ids = torch.tensor([[3, 1, 4, 1, 0], [2, 0, 3, 3, 1]])
    B, T, V = ids.shape[0], ids.shape[1], 5
    logits = torch.zeros(B, T, V)
    for b in range(B):
        for t in range(T - 1):
            logits[b, t, ids[b, t + 1]] = 10.0
    logits[:, -1] = torch.randn(B, V)  # the last position predicts nothing that is scored
    want = math.log(1 + (V - 1) * math.exp(-10.0))  # ≈ 1.8e-4
    assert float(next_token_ce(logits, ids)) == pytest.approx(want, abs=1e-6)


def test_next_token_ce_equals_an_explicit_sum_over_positions():
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 6, 7
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    terms = []
    for b in range(B):
        for t in range(T - 1):
            row = [float(v) for v in logits[b, t]]
            lse = math.log(sum(math.exp(v) for v in row))
            terms.append(lse - row[int(ids[b, t + 1])])
    assert float(next_token_ce(logits, ids)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def _kl64(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_kl_per_token_is_kl_of_the_first_from_the_second():
    p, q = [0.9, 0.05, 0.05], [0.4, 0.3, 0.3]
    lp, lq = torch.tensor(p).log(), torch.tensor(q).log()
    assert _kl64(p, q) == pytest.approx(0.5507, abs=1e-4) and _kl64(q, p) == pytest.approx(0.7507, abs=1e-4)
    assert float(kl_per_token(lp, lq)) == pytest.approx(_kl64(p, q), rel=1e-5)
    assert float(kl_per_token(lq, lp)) == pytest.approx(_kl64(q, p), rel=1e-5)
    assert float(kl_per_token(lp + 7.0, lq - 3.0)) == pytest.approx(_kl64(p, q), rel=1e-5)  # logits, not log-probs


def test_kl_per_token_is_a_mean_over_tokens():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 6, generator=g) * 2, torch.randn(2, 3, 6, generator=g) * 2  # [B, T, V]
    want = []
    for i in range(2):
        for t in range(3):
            p, q = a[i, t].double().softmax(-1).tolist(), b[i, t].double().softmax(-1).tolist()
            want.append(_kl64(p, q))
    assert float(kl_per_token(a, b)) == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert float(kl_per_token(a, a)) == pytest.approx(0.0, abs=1e-6)


# ---- the trainer's held-out evaluation ------------------------------------------------------------------------

HOOK = "model.layers.2"


def _evaluate(model, ids: torch.Tensor, sae, batch_seqs: int) -> dict:
    from saetune.models import resolve_hook
    from saetune.sae_trainer import evaluate_saes
    source = SimpleNamespace(eval_data=lambda: ids, _load_model=lambda: model, hps={HOOK: resolve_hook(model, HOOK)})
    trainer = SimpleNamespace(name="s", sae=sae, dead_mask=lambda: torch.zeros(sae.d_sae, dtype=torch.bool))
    return evaluate_saes(source, [(HOOK, trainer)], cfg=None, batch_seqs=batch_seqs)["s"]


def _toy_ids(tok, n: int, T: int = 24) -> torch.Tensor:
    """[n, T] token ids of toy text (EOS-joined examples): text the toy model predicts well."""
    from saetune.toy import task
    ids: list[int] = []
    for ex in task.examples(4 * n, seed=7):
        ids += tok(ex["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids[:n * T]).view(n, T)


def _identity_sae():
    """A standard (ReLU) SAE that reconstructs x exactly: encode = (relu(x), relu(−x)), decode = their difference."""
    from saetune.sae import SAE, SAEConfig
    d = 128
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, architecture="standard", hook_name=HOOK))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))  # (d, 2d)
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))  # (2d, d)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_evaluation_of_a_perfect_sae_recovers_everything(toy_base):
    model, tok = toy_base
    ids = _toy_ids(tok, 4)
    r = _evaluate(model, ids, _identity_sae(), batch_seqs=4)
    assert r["fvu"] == 0.0 and r["mse"] == 0.0 and r["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-6)
    assert r["ce_zero"] > r["ce_clean"] + 0.5
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)


def test_evaluation_equals_a_brute_force_reference(toy_base):
    """CE by HF's own shifted loss, KL(clean ‖ spliced) in float64, FVU/MSE/L0 per batch; batches of 4 and 2
    sequences, so the averages must weight each batch by its tokens."""
    from saetune.models import replace_activation, resolve_hook
    from saetune.sae import SAE, SAEConfig
    model, tok = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=4)
    ids = _toy_ids(tok, 6)
    ids[4:] = torch.randint(4, 250, (2, 24), generator=torch.Generator().manual_seed(6))  # a batch unlike the first
    r = _evaluate(model, ids, sae, batch_seqs=4)

    hp = resolve_hook(model, HOOK)
    with torch.no_grad():
        clean = model(input_ids=ids, labels=ids, use_cache=False)
        with replace_activation(model, hp, lambda a: sae(a)):
            spliced = model(input_ids=ids, labels=ids, use_cache=False)
        with replace_activation(model, hp, torch.zeros_like):
            zero = model(input_ids=ids, labels=ids, use_cache=False)
        from saetune.models import run_to_hooks
        x = run_to_hooks(model, ids, [hp])[HOOK]  # [6, 24, 128]
    lp, lq = clean.logits.double().log_softmax(-1), spliced.logits.double().log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    per_batch = []
    for rows in (slice(0, 4), slice(4, 6)):
        xb = x[rows].reshape(-1, 128)
        xh = sae(xb).detach()
        per_batch.append((xb.shape[0], float(((xh - xb) ** 2).sum() / ((xb - xb.mean(0)) ** 2).sum()),
                          float(((xh - xb) ** 2).sum(-1).mean()), float((sae.encode(xb) > 0).sum(-1).float().mean())))
    n = sum(b[0] for b in per_batch)

    def weighted(j):
        return sum(b[0] * b[j] for b in per_batch) / n

    assert r["ce_clean"] == pytest.approx(float(clean.loss), abs=2e-5)
    assert r["ce_spliced"] == pytest.approx(float(spliced.loss), abs=2e-5)
    assert r["ce_zero"] == pytest.approx(float(zero.loss), abs=2e-5)
    assert r["kl_spliced"] == pytest.approx(kl, abs=2e-5) and kl > 1e-3
    assert r["fvu"] == pytest.approx(weighted(1), rel=1e-4)
    assert r["mse"] == pytest.approx(weighted(2), rel=1e-4)
    assert r["l0"] == pytest.approx(weighted(3), rel=1e-4)
    want = (float(zero.loss) - float(spliced.loss)) / (float(zero.loss) - float(clean.loss))
    assert r["ce_loss_recovered"] == pytest.approx(want, abs=1e-4)
    assert r["n_eval_tokens"] == ids.numel()
