"""Sparse probing on the toy: labels at the right tokens, SAEBench's selection rule, the probe, the table."""

import pandas as pd
import pytest
import torch

from saetune import SAE, SAEConfig, SaetuneError
from saetune.probing import (CONCEPTS, balanced_indices, char_to_token, concept_latents, fit_logistic,
                             probe_accuracy, probe_summary, select_by_mean_diff, sparse_probe_scores,
                             toy_step_positions)
from saetune.toy import build_tokenizer, make_problem, prompt

# ( 3 - 5 ) * 2 with the first step re-checked
TEXT = ("User : compute ( 3 - 5 ) * 2 . Assistant : <think> 3 - 5 = -2 . wait , let me check : 3 - 5 = -2 . "
        "-2 * 2 = -4 . therefore the answer is -4 . </think> <answer> -4 </answer>")


def test_toy_labels_sit_on_the_hand_checked_equals_signs():
    assert prompt(make_problem((3, 5, 2), ("-", "*"))) in TEXT
    steps = toy_step_positions(TEXT)
    words = TEXT.split(" ")
    # counted by hand: "User"=0 … "<think>"=13; 3 - 5 = → word 17; the re-check's = → 29; -2 * 2 = → 35
    assert [s.word for s in steps] == [17, 29, 35]
    assert all(TEXT[s.char] == "=" and words[s.word] == "=" for s in steps)
    assert [(s.step, s.op, s.is_check, s.result) for s in steps] == [(1, "-", False, -2), (1, "-", True, -2),
                                                                      (2, "*", False, -4)]
    assert [s.labels for s in steps] == [
        {"op_add": 0, "op_sub": 1, "op_mul": 0, "is_check": 0, "second_step": 0, "result_negative": 1, "result_even": 1},
        {"op_add": 0, "op_sub": 1, "op_mul": 0, "is_check": 1, "second_step": 0, "result_negative": 1, "result_even": 1},
        {"op_add": 0, "op_sub": 0, "op_mul": 1, "is_check": 0, "second_step": 1, "result_negative": 1, "result_even": 1},
    ]
    assert set(steps[0].labels) == set(CONCEPTS)
    # the toy tokenizer: one token per word, no BOS, so the token index is the word index
    tok = build_tokenizer()
    enc = tok(TEXT, return_offsets_mapping=True)
    idx = char_to_token(enc["offset_mapping"], [s.char for s in steps])
    assert idx == [17, 29, 35]
    assert [tok.convert_ids_to_tokens(enc["input_ids"][i]) for i in idx] == ["=", "=", "="]


def test_step_parsing_names_a_broken_step():
    with pytest.raises(SaetuneError, match="does not read 'x op y = r'"):
        toy_step_positions("<think> 3 + 4 = seven . </think>")
    with pytest.raises(SaetuneError, match="no <think>"):
        toy_step_positions("3 + 4 = 7")


def _planted(n=400, d=20, col=7, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.5).long()
    x = torch.randn(n, d, generator=g).relu()  # SAE-like: non-negative noise
    x[:, col] = scale * y + 0.3 * torch.rand(n, generator=g)
    return x, y


def test_mean_difference_selection_picks_the_planted_latent():
    x, y = _planted(col=7)
    latents, diffs = select_by_mean_diff(x, y, 1)
    assert latents == [7] and diffs[0] == pytest.approx(float(x[y == 1, 7].mean() - x[y == 0, 7].mean()))
    # a latent that fires on the negative class ranks by |difference|, and keeps its sign
    x[:, 3] = 5.0 * (1 - y)
    latents, diffs = select_by_mean_diff(x, y, 2)
    assert latents == [3, 7] and diffs[0] < 0 < diffs[1]
    # ties go to the lower index
    assert select_by_mean_diff(torch.zeros(4, 5).index_fill(1, torch.tensor([1, 4]), 1.0) * torch.tensor(
        [[1.], [1.], [0.], [0.]]), torch.tensor([1, 1, 0, 0]), 2)[0] == [1, 4]
    with pytest.raises(SaetuneError, match="k must lie in 1…20"):
        select_by_mean_diff(x, y, 21)


def test_k_sparse_probe_reads_a_planted_latent_and_not_shuffled_labels():
    x, y = _planted(n=800, seed=1)
    tr, te = slice(0, 600), slice(600, 800)
    latents, _ = select_by_mean_diff(x[tr], y[tr], 1)
    w, b = fit_logistic(x[tr][:, latents], y[tr])
    assert probe_accuracy(x[te][:, latents], y[te], w, b) > 0.97
    # labels shuffled: nothing to find, held-out accuracy near chance
    ys = y[torch.randperm(800, generator=torch.Generator().manual_seed(2))]
    x_noise = x.clone()
    x_noise[:, 7] = torch.rand(800, generator=torch.Generator().manual_seed(3))
    latents, _ = select_by_mean_diff(x_noise[tr], ys[tr], 5)
    w, b = fit_logistic(x_noise[tr][:, latents], ys[tr])
    assert abs(probe_accuracy(x_noise[te][:, latents], ys[te], w, b) - 0.5) < 0.1


def test_logistic_fit_equals_scipy_lbfgs_on_the_same_objective():
    import numpy as np
    from scipy.optimize import minimize

    x, y = _planted(n=120, d=4, col=2, scale=0.7, seed=4)  # overlapping classes: a unique finite optimum
    C = 0.5
    w, b = fit_logistic(x, y, C=C)
    X, Y = x.double().numpy(), y.double().numpy()

    def objective(p):  # C·Σ logloss + ½‖w‖², intercept p[4] unpenalised, with its gradient
        z = X @ p[:4] + p[4]
        r = C * (1 / (1 + np.exp(-z)) - Y)
        return (C * np.sum(np.logaddexp(0, z) - Y * z) + 0.5 * p[:4] @ p[:4],
                np.concatenate([X.T @ r + p[:4], [r.sum()]]))

    ref = minimize(objective, np.zeros(5), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    assert w.tolist() == pytest.approx(ref.x[:4].tolist(), abs=1e-5)
    assert b == pytest.approx(ref.x[4], abs=1e-5)
    # separable data: the L2 term keeps the solution finite, and the probe separates it
    xs = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    ys = torch.tensor([0, 0, 1, 1])
    w, b = fit_logistic(xs, ys)
    assert torch.isfinite(w).all() and probe_accuracy(xs, ys, w, b) == 1.0


def test_balanced_indices_keep_the_smaller_class_whole():
    y = torch.tensor([1, 0, 0, 0, 1, 0, 0])
    idx = balanced_indices(y, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == idx.tolist()
    assert int(y[idx].sum()) == 2 and len(idx) == 4 and {0, 4} <= set(idx.tolist())


def test_summary_and_concept_latents_on_a_hand_made_table():
    df = pd.DataFrame([
        {"concept": "a", "k": 1, "latents": [4], "mean_diffs": [2.0], "sae_acc": 0.9, "raw_acc": 1.0,
         "raw_topk_acc": 0.7, "n_train": 10, "n_test": 4},
        {"concept": "a", "k": 2, "latents": [4, 1], "mean_diffs": [2.0, -1.0], "sae_acc": 0.95, "raw_acc": 1.0,
         "raw_topk_acc": 0.8, "n_train": 10, "n_test": 4},
        {"concept": "b", "k": 1, "latents": [0], "mean_diffs": [0.5], "sae_acc": 0.5, "raw_acc": 0.8,
         "raw_topk_acc": 0.6, "n_train": 10, "n_test": 4},
        {"concept": "b", "k": 2, "latents": [0, 3], "mean_diffs": [0.5, 0.25], "sae_acc": 0.6, "raw_acc": 0.8,
         "raw_topk_acc": 0.6, "n_train": 10, "n_test": 4},
    ])
    assert probe_summary(df) == pytest.approx({"probe_acc_k1": 0.7, "probe_acc_k2": 0.775, "probe_raw_acc_k1": 0.65,
                                               "probe_raw_acc_k2": 0.7, "probe_raw_acc": 0.9, "probe_n_concepts": 2})
    cl = concept_latents(df)
    assert cl[["concept", "rank", "latent"]].values.tolist() == [["a", 0, 4], ["a", 1, 1], ["b", 0, 0], ["b", 1, 3]]
    assert cl["mean_diff"].tolist() == [2.0, -1.0, 0.5, 0.25]
    assert cl["sae_acc"].tolist() == [0.95, 0.95, 0.6, 0.6] and cl["k1_acc"].tolist() == [0.9, 0.9, 0.5, 0.5]
    with pytest.raises(SaetuneError, match="lacks the columns"):
        probe_summary(df.drop(columns=["latents"]))


def test_sparse_probe_scores_end_to_end_on_the_toy(toy_base, one_thread):
    model, tok = toy_base
    sae = SAE(SAEConfig(d_in=128, d_sae=64, k=8, hook_name="model.layers.2"), seed=0)
    df = sparse_probe_scores(sae, model, tok, "model.layers.2", n_problems=128, ks=(1, 2, 5), seed=0)
    assert list(df.columns) == ["concept", "k", "latents", "mean_diffs", "sae_acc", "raw_acc", "raw_topk_acc",
                                "n_train", "n_test"]
    assert df[["concept", "k"]].values.tolist() == [[c, k] for c in CONCEPTS for k in (1, 2, 5)]
    assert all(len(l) == k and len(set(l)) == k and all(0 <= i < 64 for i in l) for l, k in zip(df.latents, df.k))
    for _, part in df.groupby("concept"):  # one selection per concept: the k-lists are prefixes of each other
        lists = part.sort_values("k").latents.tolist()
        assert lists[0] == lists[1][:1] and lists[1] == lists[2][:2]
        assert part.raw_acc.nunique() == 1 and part.n_train.nunique() == 1
    assert ((df.n_train % 2 == 0) & (df.n_test % 2 == 0) & (df.n_test > 0)).all()  # balanced classes
    assert df[["sae_acc", "raw_acc", "raw_topk_acc"]].apply(lambda c: c.between(0, 1)).all().all()
    # the shipped toy model's layer-2 activations carry the task's concepts: the full probe reads them
    assert probe_summary(df)["probe_raw_acc"] > 0.8
    with pytest.raises(SaetuneError, match="exceeds the SAE's 64 latents"):
        sparse_probe_scores(sae, model, tok, "model.layers.2", n_problems=160, ks=(65,))
    with pytest.raises(SaetuneError, match=r"split, fewer than \d; raise n_problems \(got 8\)"):
        sparse_probe_scores(sae, model, tok, "model.layers.2", n_problems=8)
    with pytest.raises(SaetuneError, match="d_in is 32"):
        sparse_probe_scores(SAE(SAEConfig(d_in=32, d_sae=64, k=4)), model, tok, "model.layers.2", n_problems=16)
