"""``saetune features``: the stored statistics equal a brute-force recomputation; lazy reads; CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer_fixtures import FEATURES_KW, pipeline_dir
from saetune.analysis.feature_data import FeatureData, feature_dirs
from saetune.analysis.feature_build import (FeaturesConfig, coactivation_neighbours, excluded_token_ids,
                                       feature_stats, training_data)
from saetune.errors import SaetuneError

HOOK = "model.layers.2"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return pipeline_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def dense(run):
    """Dense SAE activations over exactly the tokens `features` analysed, and the inclusion mask."""
    from saetune.data import load_chunks
    from saetune.models import load_model, resolve_hook, run_to_hooks
    from saetune.sae import SAE

    model, tok = load_model(str(run / "toy-base" / "model"), device="cpu")
    sae = SAE.load(run / "sae", hook=HOOK)
    cfg = training_data(FeaturesConfig(sae="x", **FEATURES_KW), run / "sae")
    assert (cfg.dataset, cfg.context_size, cfg.data_seed) == ("toy", 128, 1)  # from the SAE run; seed held out
    chunks = load_chunks(cfg, tok)
    chunks = chunks[:cfg.n_tokens // chunks.shape[1]]
    hp = resolve_hook(model, HOOK)
    with torch.no_grad():
        x = run_to_hooks(model, chunks, [hp])[hp.name].reshape(-1, sae.cfg.d_in)
        f = sae.encode(x).numpy()  # [N, F]
    ids = chunks.reshape(-1).numpy()
    excl = excluded_token_ids(tok)
    incl = ~np.isin(ids, list(excl)) & (np.arange(len(ids)) % chunks.shape[1] != 0)
    return {"f": f, "ids": ids, "incl": incl, "model": model, "sae": sae, "tok": tok, "excl": excl}


def test_layout_and_meta(run):
    dirs = feature_dirs(run)
    assert set(dirs) == {"model.layers.1", HOOK}
    d = dirs[HOOK]
    for name in ("meta.json", "stats.safetensors", "examples.jsonl", "examples.index.npy", "tokens.json"):
        assert (d / name).exists()
    meta = json.loads((d / "meta.json").read_text())
    assert meta["n_tokens"] == 4096 and meta["d_sae"] == 256 and 0 < meta["n_included_tokens"] < 4096
    ex = FeatureData(d).examples(int(np.argmax(FeatureData(d).array("count"))))["top"][0]
    # the toy's word-level tokens read with their spaces
    assert all(t.startswith(" ") for t in ex["tokens"][1:]) and not ex["tokens"][0].startswith(" ")
    assert (run / "features" / "features" / "reasoning.json").exists()
    m = json.loads((run / "features" / "manifest.json").read_text())
    assert m["status"] == "complete" and "features" in m["artifacts"]


def test_stats_equal_brute_force(run, dense):
    fd = FeatureData.open(run, HOOK)
    f, incl = dense["f"], dense["incl"]
    fire = (f > 0) & incl[:, None]
    count = fire.sum(0)
    np.testing.assert_array_equal(fd.array("count"), count)
    np.testing.assert_allclose(fd.array("density"), count / incl.sum(), rtol=1e-6)
    mean = np.where(count > 0, (f * fire).sum(0) / np.maximum(count, 1), 0)
    np.testing.assert_allclose(fd.array("mean_act"), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fd.array("max_act"), (f * fire).max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fd.array("hist").sum(1), count)
    # the histogram of one busy feature, bin by bin
    i = int(np.argmax(count))
    edges, hist = fd.histogram(i)
    v = f[fire[:, i], i]
    expect = np.histogram(v, bins=edges)[0]
    assert abs(hist - expect).sum() <= 2  # values on a bin edge may fall either side


def test_top_examples_and_exclusions(run, dense):
    fd = FeatureData.open(run, HOOK)
    i = int(np.argmax(fd.array("count")))
    ex = fd.examples(i)
    top = ex["top"]
    assert len(top) == 6
    acts = [e["act"] for e in top]
    assert acts == sorted(acts, reverse=True)
    assert acts[0] == pytest.approx(float(fd.array("max_act")[i]), rel=1e-3)
    for e in top + [x for g in ex["quantiles"] for x in g["examples"]]:
        assert e["ids"][e["peak"]] not in dense["excl"]  # never peaks on a special token
        assert e["pos"] != 0
        assert len(e["tokens"]) == len(e["acts"]) == len(e["ids"])
        flat = e["seq"] * 128 + e["pos"]  # chunks of 128 tokens
        assert dense["f"][flat, i] == pytest.approx(e["act"], rel=1e-3)
    groups = ex["quantiles"]
    assert len(groups) == 3 and sum(g["n"] for g in groups) == int(fd.array("count")[i])
    assert [g["lo"] for g in groups] == sorted(g["lo"] for g in groups)


def test_logits_and_neighbours_equal_brute_force(run, dense):
    fd = FeatureData.open(run, HOOK)
    sae, model = dense["sae"], dense["model"]
    W = sae.W_dec.detach()
    eff = (W * model.model.norm.weight.detach()) @ model.get_output_embeddings().weight.detach().T  # [F, V]
    for i in (0, 7, 100):
        top = torch.topk(eff[i], 10).indices.numpy()
        np.testing.assert_array_equal(fd.array("logit_pos_ids")[i], top)
        np.testing.assert_allclose(fd.array("logit_neg")[i], torch.topk(-eff[i], 10).values.neg().numpy(), rtol=1e-4)
    wn = W / W.norm(dim=1, keepdim=True)
    cos = (wn @ wn.T).fill_diagonal_(-2)
    for i in (0, 7, 100):
        np.testing.assert_array_equal(fd.array("dec_nn_ids")[i], torch.topk(cos[i], 10).indices.numpy())
    fire = (dense["f"] > 0) & dense["incl"][:, None]
    a = fire.astype(np.float64)
    inter = a.T @ a
    union = a.sum(0)[:, None] + a.sum(0)[None, :] - inter
    jac = np.where(inter > 0, inter / np.maximum(union, 1), 0)
    np.fill_diagonal(jac, 0)
    i = int(np.argmax(fire.sum(0)))
    got = fd.array("coact_nn_jaccard")[i]
    np.testing.assert_allclose(got, np.sort(jac[i])[::-1][:10], rtol=1e-5)
    ids = fd.array("coact_nn_ids")[i]
    np.testing.assert_allclose(jac[i, ids[ids >= 0]], got[ids >= 0], rtol=1e-5)


def test_pure_stats_on_a_tiny_code():
    idx = np.array([[0, 1], [1, 2], [0, 2], [3, 0]])
    val = np.array([[1.0, 2.0], [0.5, 0.0], [3.0, 1.0], [4.0, 2.0]], np.float32)
    incl = np.array([True, True, True, False])
    st = feature_stats(idx, val, incl, 4, 4)
    assert st["count"].tolist() == [2, 2, 1, 0]
    assert st["max_act"].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert st["mean_act"][0] == pytest.approx(2.0)
    assert st["hist"][0].tolist() == [0, 1, 0, 1]  # 1.0 in (0.75, 1.5], 3.0 in (2.25, 3]
    assert st["tok"][st["off"][0]:st["off"][1]].tolist() == [2, 0]
    ids, jac = coactivation_neighbours(idx, val, incl, st["count"], 2, budget=4)  # forces blocks of 1 feature
    # firing sets over included tokens: f0 {0, 2}, f1 {0, 1}, f2 {2} (token 1's value 0 is not firing)
    assert ids[0].tolist() == [2, 1] and jac[0].tolist() == pytest.approx([1 / 2, 1 / 3])
    assert ids[2].tolist() == [0, -1] and ids[3].tolist() == [-1, -1]


def test_reader_is_lazy_and_searchable(run):
    fd = FeatureData.open(run, HOOK)
    assert fd._arrays == {}
    fd.examples(3)
    assert fd._arrays == {}  # one feature's contexts need no array
    t = fd.table()
    assert len(t) == 256 and {"density", "top_tokens", "top_logit"} <= set(t.columns)
    busy = int(t.sort_values("density").iloc[-1]["feature"])
    tok0 = fd.top_tokens(busy)[0]
    assert busy in fd.search_token(tok0)
    assert fd.search_text("") == [] and fd.search_token("no-such-token") == []
    with pytest.raises(SaetuneError, match="features 0…255"):
        fd.examples(256)
    with pytest.raises(SaetuneError, match="no feature data for hook"):
        FeatureData.open(run, "model.layers.9")


def test_half_written_feature_dir(tmp_path):
    d = tmp_path / "features" / "model.layers.0"
    d.mkdir(parents=True)
    (d / "meta.json").write_text('{"format": "saetune.feat')
    with pytest.raises(SaetuneError, match="not finished"):
        FeatureData.open(tmp_path)


def test_cli_features(run, tmp_path, capsys):
    from saetune.cli import main
    out = tmp_path / "f"
    rc = main(["features", "--sae", str(run / "sae"), "--hook", "model.layers.1", "--out", str(out), "--n-tokens",
               "1024", "--max-examples", "60", "--n-top", "3", "--reasoning-prompt", "no tags here", "--no-progress"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["model.layers.1"]["n_tokens"] == 1024
    assert list(feature_dirs(out)) == ["model.layers.1"]
    # a prompt without the tags: the feature data is written, the reasoning record says why it is empty
    rec = json.loads((out / "features" / "reasoning.json").read_text())
    assert rec["hooks"] == {} and "<think>" in rec["error"]
    assert training_data(FeaturesConfig(sae="x", dataset="data.jsonl"), run / "sae").dataset == "data.jsonl"
    assert training_data(FeaturesConfig(sae="x"), None).dataset == "toy"
    rc = main(["features", "--sae", str(tmp_path / "missing"), "--out", str(tmp_path / "g")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["features", "--sae", str(run / "sae"), "--hook", "model.layers.7", "--out", str(tmp_path / "h")])
    assert rc == 2 and "no SAE for hook" in capsys.readouterr().err


def test_token_texts_keep_spaces_for_bpe_and_word_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from saetune.analysis.feature_build import token_texts
    from saetune.toy.tokenizer import build_tokenizer

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "Ġ": 1, "b": 2, "Ġb": 3, "c": 4}, merges=[("Ġ", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = tok("a bc")["input_ids"]
    assert "".join(token_texts(tok, ids)) == tok.decode(ids) == "a bc"
    toy = build_tokenizer()
    ids = toy("User : compute ( 3 + 4 ) .")["input_ids"]
    assert "".join(token_texts(toy, ids)) == toy.decode(ids)
