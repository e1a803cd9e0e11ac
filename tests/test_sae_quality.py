"""SAEBench's core metrics (saetune.sae_quality) against hand-computed cases, a perfect and a zero SAE on the
toy model, a brute-force reference, and train-sae's liveness report (dead window, alive over training tokens)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from saetune.sae_quality import (CoreMetrics, ce_loss_score, ce_per_position, density_histogram, density_stats,
                                 explained_variance_per_token, feature_density, format_quality_table, keep_mask,
                                 kl_div_score, kl_per_position, quality_markdown, quality_table)

HOOK = "model.layers.2"


# ---- scalar scores -----------------------------------------------------------------------------------

def test_scores_on_hand_computed_triples():
    assert ce_loss_score(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert ce_loss_score(2.0, 2.0, 4.0) == 1.0  # the SAE loses nothing
    assert ce_loss_score(2.0, 4.0, 4.0) == 0.0  # as bad as zeros
    assert ce_loss_score(2.0, 5.0, 4.0) == pytest.approx(-0.5)
    assert math.isnan(ce_loss_score(3.0, 2.0, 3.0))  # zero ablation changes nothing: undefined
    assert kl_div_score(0.5, 2.0) == pytest.approx(0.75)
    assert kl_div_score(0.0, 2.0) == 1.0 and kl_div_score(2.0, 2.0) == 0.0
    assert math.isnan(kl_div_score(0.1, 0.0))


def test_kl_is_clean_first():
    """KL(P_clean ‖ P_sae), as SAEBench's code computes it: p = (½, ½), q = (0.9, 0.1) by hand."""
    clean = torch.tensor([[0.0, 0.0]])
    other = torch.tensor([[math.log(0.9), math.log(0.1)]])
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108; the other direction is 0.3681
    assert float(kl_per_position(clean, other)[0]) == pytest.approx(want, rel=1e-6)
    assert float(kl_per_position(other, clean)[0]) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-6)


def test_explained_variance_on_a_known_case():
    """Tokens (1,0), (−1,0), (0,2), (0,−2) (mean 0); x̂ halves the last two: per token 1, 1, ¾, ¾ → 0.875 (SAEBench);
    pooled 1 − 2/10 = 0.8 = 1 − FVU."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    x_hat = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    torch.testing.assert_close(explained_variance_per_token(x, x_hat), torch.tensor([1.0, 1.0, 0.75, 0.75]))
    torch.testing.assert_close(explained_variance_per_token(x, x.mean(0).expand_as(x)), torch.zeros(4))
    m = CoreMetrics(d_sae=3)
    ids = torch.zeros(1, 4, dtype=torch.long)
    m.add_batch(ids, torch.ones(1, 4, dtype=torch.bool), None, None, None, x, torch.zeros(4, 3), x_hat)
    r = m.result()
    assert r["explained_variance"] == pytest.approx(0.875) and r["explained_variance_pooled"] == pytest.approx(0.8)
    assert r["fvu"] == pytest.approx(0.2) and r["mse"] == pytest.approx(0.5)
    assert r["cossim"] == pytest.approx(1.0) and r["l2_ratio"] == pytest.approx(0.75)


def test_masked_ce_kl_and_perfect_and_zero_saes():
    """CE keeps a position when its *input* token is kept (SAEBench drops the mask's last column), KL every kept
    position; a 'perfect SAE' (its logits are the clean ones) scores 1, a zero SAE (the ablated ones) scores 0."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 0, 7, 3, 0], [2, 4, 0, 6, 1]])  # 0 = eos, left out
    V = 9
    clean, zero, other = (torch.randn(2, 5, V, generator=g) for _ in range(3))
    keep = keep_mask(ids, [0])
    assert keep.tolist() == [[True, False, True, True, False], [True, True, False, True, True]]

    def brute(lg):
        ce, n = 0.0, 0
        for b in range(2):
            for t in range(4):
                if ids[b, t] != 0:
                    ce -= float(lg[b, t].double().log_softmax(-1)[ids[b, t + 1]])
                    n += 1
        return ce / n

    def run(sae_logits):
        m = CoreMetrics(d_sae=2)
        x = torch.randn(2, 5, 3, generator=g)
        m.add_batch(ids, keep, clean, sae_logits, zero, x, torch.zeros(2, 5, 2), x)
        return m.result()

    r = run(other)
    assert r["ce_loss_without_sae"] == pytest.approx(brute(clean), abs=1e-5)
    assert r["ce_loss_with_sae"] == pytest.approx(brute(other), abs=1e-5)
    assert r["ce_loss_with_ablation"] == pytest.approx(brute(zero), abs=1e-5)
    kl = kl_per_position(clean, other)
    assert r["kl_div_with_sae"] == pytest.approx(float(kl[keep].mean()), abs=1e-6)
    assert r["ce_loss_score"] == pytest.approx(ce_loss_score(brute(clean), brute(other), brute(zero)), abs=1e-4)
    assert r["ce_loss_recovered"] == r["ce_loss_score"] and r["ce_clean"] == r["ce_loss_without_sae"]
    assert r["n_tokens"] == 7
    perfect, zeroed = run(clean), run(zero)
    assert perfect["ce_loss_score"] == 1.0 and perfect["kl_div_score"] == 1.0 and perfect["kl_div_with_sae"] == 0.0
    assert zeroed["ce_loss_score"] == 0.0 and zeroed["kl_div_score"] == 0.0
    assert ce_per_position(clean, ids).shape == (2, 4)


# ---- liveness and density ----------------------------------------------------------------------------

def _acts(n: int, fires: list[int]) -> torch.Tensor:
    """[n, len(fires)] activations: latent j fires (value 1 + j) on its first fires[j] tokens."""
    a = torch.zeros(n, len(fires))
    for j, f in enumerate(fires):
        a[:f, j] = 1.0 + j
    return a


def test_alive_fraction_and_density_statistics_by_hand():
    """200 tokens; latents fire on 100, 1, 0 and 10 of them: densities .5, .005, 0, .05."""
    d = feature_density(_acts(200, [100, 1, 0, 10]).gt(0).sum(0), 200)
    torch.testing.assert_close(d, torch.tensor([0.5, 0.005, 0.0, 0.05], dtype=torch.float64))
    s = density_stats(d)
    assert s["frac_alive"] == 0.75 and s["n_alive"] == 3 and s["n_dead"] == 1
    assert s["freq_over_1_percent"] == 0.5 and s["freq_over_10_percent"] == 0.25
    assert s["normalized_freq_over_1_percent"] == pytest.approx(0.55 / 0.555)
    assert s["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.555)
    assert s["log10_density_mean"] == pytest.approx((math.log10(0.5) + math.log10(0.005) + math.log10(0.05)) / 3)
    assert s["log10_density_median"] == pytest.approx(math.log10(0.05))
    h = density_histogram(d, 200, bins=3)  # edges −3, −2, −1, 0 (⌊log10 1/200⌋ = −3)
    assert h["edges"] == [-3.0, -2.0, -1.0, 0.0] and h["counts"] == [1, 1, 1] and h["dead"] == 1
    h = density_histogram(torch.tensor([1.0, 1 / 200, 0.0], dtype=torch.float64), 200, bins=3)
    assert h["counts"] == [1, 0, 1] and h["dead"] == 1  # density 1 lands in the last bin, 1/n in the first
    nothing = density_stats(torch.zeros(4, dtype=torch.float64))
    assert nothing["frac_alive"] == 0.0 and nothing["normalized_freq_over_1_percent"] == 0.0
    assert math.isnan(nothing["log10_density_mean"])


def test_masked_tokens_count_for_nothing():
    """Liveness, L0 and L1 over the kept tokens only: a latent that fires only on an eos position is dead."""
    ids = torch.tensor([[3, 0, 4, 5]])
    acts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 3.0], [1.0, 0.0, 0.0]])  # latent 1: eos only
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    m = CoreMetrics(d_sae=3)
    m.add_batch(ids, keep_mask(ids, [0]), None, None, None, x, acts, x)
    r = m.result(bins=4)
    assert r["n_tokens"] == 3 and r["frac_alive"] == pytest.approx(2 / 3) and r["n_dead"] == 1
    assert r["l0"] == pytest.approx(4 / 3) and r["l1"] == pytest.approx(6 / 3)
    torch.testing.assert_close(m.density(), torch.tensor([1.0, 0.0, 1 / 3], dtype=torch.float64))
    assert r["density_histogram"]["dead"] == 1 and sum(r["density_histogram"]["counts"]) == 2
    assert r["fvu"] == 0.0 and r["explained_variance"] == 1.0


def test_batches_weigh_tokens_equally():
    """Per-token means over two batches of different sizes equal the mean over all tokens (SAEBench concatenates)."""
    g = torch.Generator().manual_seed(3)
    m = CoreMetrics(d_sae=4)
    evs = []
    for n in (6, 2):
        ids = torch.ones(1, n, dtype=torch.long)
        x, x_hat = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
        m.add_batch(ids, torch.ones(1, n, dtype=torch.bool), None, None, None, x, torch.zeros(n, 4), x_hat)
        evs.append(explained_variance_per_token(x.double(), x_hat.double()))
    got = m.result()["explained_variance"]
    assert got == pytest.approx(float(torch.cat(evs).mean()), abs=1e-6)
    assert abs(got - (float(evs[0].mean()) + float(evs[1].mean())) / 2) > 1e-3  # not a mean of batch means


# ---- on the toy model: perfect and zero SAEs, and a brute-force reference ------------------------------

def _identity_sae():
    """A standard SAE that reconstructs x exactly: encode = (relu(x), relu(−x)), decode = their difference."""
    from saetune.sae import SAE, SAEConfig
    sae = SAE(SAEConfig(d_in=128, d_sae=256, architecture="standard", hook_name=HOOK))
    eye = torch.eye(128)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _zero_sae():
    from saetune.sae import SAE, SAEConfig
    sae = SAE(SAEConfig(d_in=128, d_sae=64, k=4, hook_name=HOOK), seed=0)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def _toy_ids(tok, n: int, T: int = 24) -> torch.Tensor:
    from saetune.toy import task
    ids: list[int] = []
    for ex in task.examples(4 * n, seed=7):
        ids += tok(ex["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids[:n * T]).view(n, T)


def test_perfect_sae_scores_one_and_zero_sae_scores_zero(toy_base):
    from saetune.sae_eval import core_eval, special_ids
    from saetune.models import resolve_hook
    model, tok = toy_base
    hp = resolve_hook(model, HOOK)
    ids = _toy_ids(tok, 4)
    assert special_ids(tok) == [0]
    r, dens = core_eval(model, [("one", hp, _identity_sae()), ("zero", hp, _zero_sae())], ids, batch_seqs=3,
                        ignore_ids=special_ids(tok))
    one, zero = r["one"], r["zero"]
    assert one["ce_loss_score"] == pytest.approx(1.0, abs=1e-5) and one["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    assert one["explained_variance"] == pytest.approx(1.0, abs=1e-6) and one["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert zero["ce_loss_score"] == 0.0 and zero["kl_div_score"] == 0.0  # its x̂ is zeros: exactly the ablation
    assert zero["l0"] == 4.0 and one["ce_loss_with_ablation"] > one["ce_loss_without_sae"] + 0.5
    n_kept = int((ids != 0).sum())
    assert one["n_tokens"] == n_kept and one["n_positions"] == ids.numel() and one["ignored_token_ids"] == [0]
    assert dens["one"].shape == (256,) and one["density_histogram"]["n_tokens"] == n_kept


def test_core_eval_equals_a_brute_force_reference(toy_base):
    """Every SAEBench metric recomputed from scratch: HF's per-token loss, KL in float64, per-token EV with each
    batch's own mean, firing counts over kept tokens; batches of 4 and 2 sequences."""
    from saetune.sae_eval import core_eval
    from saetune.models import replace_activation, resolve_hook, run_to_hooks
    from saetune.sae import SAE, SAEConfig
    model, tok = toy_base
    hp = resolve_hook(model, HOOK)
    sae = SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name=HOOK), seed=4)
    ids = _toy_ids(tok, 6)
    ids[4:] = torch.randint(4, 250, (2, 24), generator=torch.Generator().manual_seed(6))
    r = core_eval(model, [("s", hp, sae)], ids, batch_seqs=4, ignore_ids=[0])[0]["s"]

    keep = ids != 0
    with torch.no_grad():
        logits = {"clean": model(input_ids=ids).logits}
        with replace_activation(model, hp, lambda a: sae.decode(sae.encode(a))):
            logits["sae"] = model(input_ids=ids).logits
        with replace_activation(model, hp, torch.zeros_like):
            logits["zero"] = model(input_ids=ids).logits
        x = run_to_hooks(model, ids, [hp])[HOOK]
    ce = {k: torch.nn.functional.cross_entropy(v[:, :-1].transpose(1, 2).double(), ids[:, 1:], reduction="none")
          for k, v in logits.items()}
    ce = {k: float(v[keep[:, :-1]].mean()) for k, v in ce.items()}
    lp = {k: v.double().log_softmax(-1) for k, v in logits.items()}
    kl = {k: float((lp["clean"].exp() * (lp["clean"] - lp[k])).sum(-1)[keep].mean()) for k in ("sae", "zero")}
    assert r["ce_loss_score"] == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), abs=1e-4)
    assert r["kl_div_score"] == pytest.approx((kl["zero"] - kl["sae"]) / kl["zero"], abs=1e-4)
    assert r["kl_div_with_sae"] == pytest.approx(kl["sae"], abs=2e-5)
    evs, fires, l0 = [], torch.zeros(256), []
    for rows in (slice(0, 4), slice(4, 6)):
        xb = x[rows][keep[rows]].double()
        f = sae.encode(xb.float()).detach()
        xh = sae.decode(f).detach().double()
        evs += (1 - ((xb - xh) ** 2).sum(-1) / ((xb - xb.mean(0)) ** 2).sum(-1)).tolist()
        fires += (f > 0).sum(0)
        l0 += (f != 0).sum(-1).tolist()
    assert r["explained_variance"] == pytest.approx(sum(evs) / len(evs), abs=1e-5)
    assert r["l0"] == pytest.approx(sum(l0) / len(l0), abs=1e-6)
    assert r["frac_alive"] == pytest.approx(float((fires > 0).float().mean()), abs=1e-6)
    assert r["n_tokens"] == int(keep.sum())


# ---- train-sae's liveness report ------------------------------------------------------------------------

def _trainer(sae, silent):
    return SimpleNamespace(name="s", sae=sae, tokens_since_fired=silent,
                           dead_mask=lambda: silent >= 10_000_000)


def test_train_sae_flags_a_dead_window_longer_than_the_run_and_counts_alive_over_training_tokens():
    """A run of 3 × 8 tokens against a 10M-token window: dead_frac is 0 by construction, and the note says so;
    alive over the training tokens (saved weights) is counted from the store, against a brute-force count."""
    from saetune.sae import SAE, SAEConfig
    from saetune.sae_trainer import evaluate_saes
    sae = SAE(SAEConfig(d_in=16, d_sae=64, k=2, hook_name=HOOK), seed=1)
    g = torch.Generator().manual_seed(2)
    batches = [{HOOK: torch.randn(8, 16, generator=g)} for _ in range(3)]
    store = SimpleNamespace(iter_batches=lambda hooks, bs, shuffle=False, seed=0: iter(batches))
    source = SimpleNamespace(n_steps=3, store=store, eval_data=lambda: None)
    silent = torch.tensor([24] * 5 + [3] * 59)  # 5 latents silent since the first token
    cfg = SimpleNamespace(skip_training=False, batch_size=8, dead_tokens=10_000_000, shuffle=False, seed=0)
    r = evaluate_saes(source, [(HOOK, _trainer(sae, silent))], cfg)["s"]
    assert r["dead_frac"] == 0.0 and r["dead_window_could_trigger"] is False
    assert "could not trigger" in r["note"] and "10,000,000" in r["note"] and "24 training tokens" in r["note"]
    assert r["frac_never_fired_in_training"] == pytest.approx(5 / 64, abs=1e-6)
    with torch.no_grad():
        fired = (sae.encode(torch.cat([b[HOOK] for b in batches])) > 0).any(0)
    assert r["frac_alive_train"] == pytest.approx(float(fired.float().mean()), abs=1e-6) and r["n_alive_train_tokens"] == 24
    assert float(fired.float().mean()) < 1  # a case where the count could be wrong
    short = SimpleNamespace(**{**vars(cfg), "dead_tokens": 16})
    r = evaluate_saes(source, [(HOOK, _trainer(sae, silent))], short)["s"]
    assert r["dead_window_could_trigger"] is True and "could not trigger" not in r["note"]


# ---- the table ----------------------------------------------------------------------------------------

def test_quality_table_columns_and_text():
    rows = [{"label": "a|b", "hook": HOOK, "d_sae": 256, "k": 8, "l0": 8.0, "explained_variance": 0.5, "fvu": 0.5,
             "ce_loss_score": 0.9, "kl_div_score": 0.8, "frac_alive": 0.75, "n_tokens": 1000},
            {"label": "c", "hook": HOOK, "d_sae": 512, "k": 16, "l0": 16.0, "explained_variance": 0.7, "fvu": 0.3,
             "ce_loss_score": 0.95, "kl_div_score": 0.9, "frac_alive": 0.5, "n_tokens": 1000, "gt_mcc": 0.6, "gt_f1_mean": 0.4,
             "probe_acc_k1": 0.61, "probe_acc_k2": 0.66, "probe_acc_k5": 0.7, "probe_raw_acc": 0.93}]
    df = quality_table(rows)
    assert list(df.columns) == ["sae", "hook", "d_sae", "k", "L0", "EV", "FVU", "ce_loss_score", "kl_div_score",
                                "alive", "probe acc k=1", "probe acc k=5", "probe raw", "MCC", "F1", "tokens"]
    assert df["probe acc k=5"].tolist()[1] == 0.7 and "top 5 SAE latent" in quality_markdown(df)
    assert df["MCC"].tolist()[1] == 0.6 and df["MCC"].isna().tolist()[0]
    text = format_quality_table(df)
    assert "0.9500" in text and "1,000" in text and "–" in text  # a missing MCC shows as a dash
    md = quality_markdown(df)
    assert "a\\|b" in md and md.count("\n|") >= 3 and "**ce_loss_score**" in md
    df1 = quality_table(rows[:1])
    assert "MCC" not in df1.columns and not any(c.startswith("probe") for c in df1.columns)
    noted = quality_table([{**rows[0], "note": "dead window could not trigger"}])
    assert noted["note"].tolist() == ["dead window could not trigger"]


def test_the_demo_prints_liveness_with_the_saved_weights():
    """The demo's table says how many latents fire with the saved weights (training and held-out tokens) and what
    the training-time dead counter watched, instead of a bare 'dead 0.000'."""
    from saetune.demo_pipeline import format_table
    sae = {"hook": HOOK, "d_sae": 1024, "k": 16, "train_tokens": 264192, "fvu": 0.0281, "l0": 16.0,
           "dead_frac": 0.0, "ce_loss_recovered": 0.98, "kl_div_score": 0.993, "frac_alive": 0.441406,
           "n_tokens": 4004, "frac_alive_train": 0.613281, "n_alive_train_tokens": 264192,
           "dead_tokens": 10_000_000, "dead_window_could_trigger": False}
    s = {"accuracy": {"base": {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 8}}, "rl": {}, "cache_tokens": 265216,
         "cache_bytes_per_token": 260, "sae": sae,
         "tune": {"eval_loss_before": 6.0, "eval_loss_after": 3.0, "steps": 2, "final_fvu": 0.03},
         "seconds": {"sae": 1.0}, "cost_usd": {}, "total_seconds": 1.0}
    text = format_table(s)
    assert "61.3% of 1,024 fire on its 264,192 training tokens, 44.1% on 4,004 held-out (saved weights)" in text
    assert "10,000,000-token window is longer than the run: it could not trigger" in text
    assert "FVU / L0 / dead" not in text and "KL score 0.993" in text


def test_train_sae_without_held_out_text_points_to_eval_sae():
    from saetune.sae import SAE, SAEConfig
    from saetune.sae_trainer import evaluate_saes
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=2, hook_name=HOOK), seed=1)
    silent = torch.zeros(32, dtype=torch.long)
    cfg = SimpleNamespace(skip_training=False, batch_size=8, dead_tokens=16, shuffle=False, seed=0)
    r = evaluate_saes(SimpleNamespace(n_steps=3, eval_data=lambda: None), [(HOOK, _trainer(sae, silent))], cfg)["s"]
    assert "eval_seqs 0" in r["note"] and "saetune eval-sae" in r["note"] and "ce_loss_score" not in r
