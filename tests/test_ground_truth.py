"""Ground-truth SAE scores: MCC, uniqueness, firing F1, explained variance, and the synthetic datasets."""

import itertools

import pytest
import torch

from saetune import SAE, SAEConfig, SaetuneError
from saetune.ground_truth import (GroundTruthConfig, GroundTruthData, explained_variance, f1_from_counts,
                                  firing_counts, ground_truth_scores, load_ground_truth, make_ground_truth, mcc,
                                  save_ground_truth, uniqueness)

SMALL = GroundTruthConfig(num_features=24, hidden_dim=12, n_eval=512, hierarchy_roots=2, hierarchy_branching=2,
                          correlation_rank=2, orthogonalize_steps=10, seed=3)


def _unit_rows(n, d, seed):
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True)


def test_mcc_of_the_true_dictionary_is_one_under_permutation_rescale_and_extra_latents():
    true = _unit_rows(16, 8, 0)
    assert mcc(true, true) == pytest.approx(1.0, abs=1e-12)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    scale = torch.rand(16, 1, generator=torch.Generator().manual_seed(2)) * 5 + 0.1  # positive: signs kept
    assert mcc(true[perm] * scale, true) == pytest.approx(1.0, abs=1e-12)
    # more latents than true features: every true feature still finds its own exact latent
    wider = torch.cat([true[perm] * scale, _unit_rows(10, 8, 3)])
    assert mcc(wider, true) == pytest.approx(1.0, abs=1e-12)


def test_mcc_of_a_random_dictionary_is_low_and_matches_saelens():
    from sae_lens.synthetic import mean_correlation_coefficient

    true, rand = _unit_rows(64, 32, 0), _unit_rows(64, 32, 1)
    got = mcc(rand, true)
    assert got < 0.5
    assert got == pytest.approx(mean_correlation_coefficient(rand, true), abs=1e-6)


def test_mcc_is_the_best_one_to_one_matching_by_brute_force():
    a, b = _unit_rows(5, 3, 4), _unit_rows(5, 3, 5)
    a64, b64 = a.double(), b.double()
    c = ((a64 / a64.norm(dim=1, keepdim=True)) @ (b64 / b64.norm(dim=1, keepdim=True)).T).abs()
    best = max(sum(c[i, p[i]] for i in range(5)) / 5 for p in itertools.permutations(range(5)))
    assert mcc(a, b) == pytest.approx(float(best), abs=1e-9)


def test_uniqueness_counts_duplicated_latents_once():
    true = torch.eye(4)
    # latents 0 and 1 both track feature 0 (one rescaled), latents 2 and 3 both track feature 1 (one flipped)
    learned = torch.stack([true[0], 3 * true[0], true[1] + 0.1 * true[2], -true[1]])
    assert uniqueness(learned, true) == pytest.approx(2 / 4)
    assert uniqueness(true[[2, 0, 3, 1]], true) == 1.0


def test_firing_f1_on_a_hand_built_case():
    # 4 samples; latent 0 matched to true feature 1, latent 1 matched to true feature 0, latent 2 never fires
    true_acts = torch.tensor([[1., 0.], [0., 2.], [1., 1.], [0., 0.]])
    latents = torch.tensor([[0., 5., 0.], [3., 0., 0.], [1., 0., 0.], [2., 1., 0.]])
    c = firing_counts(latents, true_acts, torch.tensor([1, 0, 0]))
    # latent 0 vs feature 1 (fires in samples 1, 2): fires in 1, 2, 3 → TP 2, FP 1, FN 0
    # latent 1 vs feature 0 (fires in samples 0, 2): fires in 0, 3 → TP 1, FP 1, FN 1
    assert c["tp"].tolist() == [2, 1, 0] and c["fp"].tolist() == [1, 1, 0] and c["fn"].tolist() == [0, 1, 2]
    assert c["tn"].tolist() == [1, 1, 2]
    p, r, f1 = f1_from_counts(c["tp"], c["fp"], c["fn"])
    assert p.tolist() == pytest.approx([2 / 3, 1 / 2, 0])
    assert r.tolist() == pytest.approx([1, 1 / 2, 0])
    assert f1.tolist() == pytest.approx([0.8, 0.5, 0])


def test_explained_variance_perfect_and_mean_prediction():
    x = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    assert explained_variance(x, x) == 1.0
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(SaetuneError, match="variance"):
        explained_variance(torch.ones(5, 3), torch.ones(5, 3))


def _orthogonal_data(n=400, f=6, d=10, seed=0):
    """Orthonormal true features (no superposition), so an exact SAE exists."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, f, generator=g))
    dirs = q.T.contiguous()  # (f, d) orthonormal rows
    # (n, f) sparse, each firing value in [0.5, 1.5): far from 0, so "fires" is unambiguous in float32
    acts = (torch.rand(n, f, generator=g) + 0.5) * (torch.rand(n, f, generator=g) < 0.3)
    bias = torch.randn(d, generator=g)
    return GroundTruthData(dirs, bias, acts @ dirs + bias, acts, {"config": {}})


def test_an_exact_sae_scores_one_everywhere():
    data = _orthogonal_data()
    f, d = data.feature_vectors.shape
    sae = SAE(SAEConfig(d_in=d, d_sae=f, architecture="standard"))
    with torch.no_grad():
        sae.W_enc.copy_(data.feature_vectors.T)
        sae.b_enc.fill_(-1e-4)  # round-off around an exact 0 must not count as firing
        sae.W_dec.copy_(data.feature_vectors)
        sae.b_dec.copy_(data.bias)
    s = ground_truth_scores(sae, data, batch_size=64)  # several batches
    for key in ("mcc", "f1_mean", "precision_mean", "recall_mean", "uniqueness", "explained_variance"):
        assert s[key] == pytest.approx(1.0, abs=1e-6), key
    assert s["l0"] == pytest.approx(s["true_l0"])
    assert s["dead_frac"] == 0.0 and s["n_samples"] == 400


def test_scores_of_a_random_sae_match_saelens_reference():
    from sae_lens.synthetic import compute_classification_metrics, feature_uniqueness, mean_correlation_coefficient

    data = _orthogonal_data(n=300, f=8, d=10, seed=1)
    sae = SAE(SAEConfig(d_in=10, d_sae=12, k=3), seed=0)
    s = ground_truth_scores(sae, data)
    with torch.no_grad():
        latents = sae.encode(data.activations)
        x_hat = sae.decode(latents)
    ref = compute_classification_metrics(latents, data.feature_acts, sae.W_dec.detach(), data.feature_vectors)
    assert s["mcc"] == pytest.approx(mean_correlation_coefficient(sae.W_dec.detach(), data.feature_vectors), abs=1e-6)
    assert s["uniqueness"] == pytest.approx(feature_uniqueness(sae.W_dec.detach(), data.feature_vectors))
    assert s["f1_mean"] == pytest.approx(ref.f1_score, abs=1e-6)
    assert s["precision_mean"] == pytest.approx(ref.precision, abs=1e-6)
    assert s["recall_mean"] == pytest.approx(ref.recall, abs=1e-6)
    assert s["explained_variance"] == pytest.approx(explained_variance(data.activations, x_hat), abs=1e-6)
    assert s["l0"] == 3.0


def test_synthetic_data_is_what_the_dictionary_says_and_round_trips(tmp_path):
    data = make_ground_truth(SMALL)
    fv, acts = data.feature_vectors, data.feature_acts
    assert fv.shape == (24, 12) and data.activations.shape == (512, 12) and acts.shape == (512, 24)
    assert torch.allclose(fv.norm(dim=1), torch.ones(24), atol=1e-5)
    assert (acts >= 0).all()
    assert torch.allclose(data.activations, acts @ fv + data.bias, atol=1e-5)
    assert data.meta["true_l0"] == pytest.approx(float((acts > 0).float().sum(1).mean()))
    assert 0 < data.meta["true_l0"] < 24

    path = save_ground_truth(data, tmp_path / "gt")
    assert sorted(p.name for p in path.iterdir()) == ["data.safetensors", "generator", "meta.json"]
    back = load_ground_truth(path)
    for name in ("feature_vectors", "bias", "activations", "feature_acts"):
        assert torch.equal(getattr(back, name), getattr(data, name)), name
    assert back.config == SMALL
    # the saved generator draws the same fresh samples as the in-memory one, and differs by seed
    x1, f1 = back.sample(64, seed=11)
    x2, f2 = data.sample(64, seed=11)
    assert torch.equal(x1, x2) and torch.equal(f1, f2)
    assert not torch.equal(data.sample(64, seed=12)[0], x1)
    # chunked training draws: the same tensor for the same (seed, chunk), from either copy
    xa = back.sample_activations(100, seed=11, chunk=32)
    assert xa.shape == (100, 12) and torch.equal(xa, data.sample_activations(100, seed=11, chunk=32))
    assert torch.equal(back.sample_activations(64, seed=11, chunk=64), x1)  # one chunk = the one-shot draw
    with pytest.raises(SaetuneError, match="evaluation sample's seed"):
        data.sample(8, seed=SMALL.seed)
    # saving again replaces the dataset in place
    save_ground_truth(back, path)
    assert torch.equal(load_ground_truth(path).activations, data.activations)

    sae = SAE(SAEConfig(d_in=12, d_sae=24, k=4), seed=0)
    assert ground_truth_scores(sae, path)["mcc"] == pytest.approx(ground_truth_scores(sae, data)["mcc"])


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(SaetuneError, match="not a ground-truth dataset dir"):
        load_ground_truth(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SaetuneError, match="refusing to replace"):
        save_ground_truth(_orthogonal_data(), tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").exists()
    with pytest.raises(SaetuneError, match="d_in is 7 but the data's hidden_dim is 10"):
        ground_truth_scores(SAE(SAEConfig(d_in=7, d_sae=8, k=2)), _orthogonal_data())
    with pytest.raises(SaetuneError, match="no generator settings"):
        _orthogonal_data().sample_activations(8, seed=1)
    with pytest.raises(SaetuneError, match="p_min"):
        GroundTruthConfig(p_min=0.5, p_max=0.1)
