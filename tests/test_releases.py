"""Pretrained SAE releases (saetune.releases): tiny files written in each release's real layout load through the
registry name, from a local Hugging Face cache (the real cache structure), from ``local_dir``, or from a stand-in
for the hub; offline without the files, and for unknown names, the errors say what to do.

Expected activations are computed here from the raw tensors written to disk (sparsify stores the encoder as
``encoder.weight`` [d_sae, d_in]; SAELens stores ``W_enc`` [d_in, d_sae]), never through saetune's SAE class; and
the reference libraries (sparsify, SAELens) load the same files and encode the same way.
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from saetune import releases
from saetune.errors import SaetuneError
from saetune.sae import SAE

ELEUTHER = "EleutherAI/sae-DeepSeek-R1-Distill-Qwen-1.5B-65k"
AIRI = "andreuka18/deepseek-r1-distill-llama-8b-lmsys-openthoughts"
D, N, K = 16, 48, 4


def _tiny(monkeypatch, name, **kw):
    """The registry entry with tiny widths (the real ones would refuse these files)."""
    rel = dataclasses.replace(releases.RELEASES[name], **kw)
    monkeypatch.setitem(releases.RELEASES, name, rel)
    return rel


def _sparsify_files(d, seed=0):
    """One hook's files as sparsify writes them: cfg.json (its keys) + sae.safetensors."""
    g = torch.Generator().manual_seed(seed)
    t = {"encoder.weight": torch.randn(N, D, generator=g), "encoder.bias": torch.randn(N, generator=g) * 0.1,
         "W_dec": torch.randn(N, D, generator=g), "b_dec": torch.randn(D, generator=g) * 0.1}
    d.mkdir(parents=True)
    save_file(t, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"expansion_factor": 3, "normalize_decoder": True, "num_latents": N,
                                            "k": K, "multi_topk": False, "skip_connection": False, "d_in": D}))
    return t


def _saelens_files(d, seed=1):
    """One SAE id's files as SAELens writes them: cfg.json + sae_weights.safetensors (a standard ReLU SAE)."""
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D, N, generator=g), "b_enc": torch.randn(N, generator=g) * 0.1,
         "W_dec": torch.randn(N, D, generator=g), "b_dec": torch.randn(D, generator=g) * 0.1}
    d.mkdir(parents=True)
    save_file(t, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
        "model_name": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "hook_name": "blocks.19.hook_resid_post",
        "hook_layer": 19, "hook_head_index": None, "activation_fn_str": "relu", "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False, "context_size": 1024, "dataset_path": "x", "prepend_bos": True,
        "normalize_activations": "none"}))
    return t


def _hf_cache(root, repo_id, files_at):
    """A Hugging Face hub cache for ``repo_id`` whose main snapshot is built by ``files_at(snapshot_dir)``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    return files_at(snap)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    root = tmp_path / "hub"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(releases, "_hub_reachable", lambda: False)  # the hub is never asked
    return root


def test_sparsify_release_loads_from_the_local_hf_cache_by_name(hf_cache, monkeypatch):
    _tiny(monkeypatch, ELEUTHER, width=N, d_in=D, k=K)
    t = _hf_cache(hf_cache, ELEUTHER, lambda snap: _sparsify_files(snap / "layers.3.mlp"))
    sae = SAE.load(ELEUTHER, hook="layers.3.mlp")
    assert (sae.d_in, sae.d_sae, sae.cfg.k, sae.cfg.architecture) == (D, N, K, "topk")
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(9))
    pre = (x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]  # sparsify's encoder, by hand
    v, i = pre.topk(K, dim=-1)
    want = torch.zeros_like(pre).scatter(-1, i, v.relu())
    torch.testing.assert_close(sae.encode(x), want)
    torch.testing.assert_close(sae(x), want @ t["W_dec"] + t["b_dec"])
    # any spelling of the hook finds the same sub-directory; the alias finds the release
    for hook in ("model.layers.3.mlp", "blocks.3.hook_mlp_out", "blocks.3.mlp.hook_out", "transformer.h.3.mlp"):
        torch.testing.assert_close(SAE.load(ELEUTHER, hook=hook).W_dec, t["W_dec"])
    torch.testing.assert_close(releases.load("eleuther-r1-distill-qwen-1.5b-65k", hook="layers.3.mlp").W_dec,
                               t["W_dec"])
    with pytest.raises(SaetuneError, match=r"holds SAEs for 28 hooks; pass hook= one of: layers\.0\.mlp"):
        SAE.load(ELEUTHER)
    with pytest.raises(SaetuneError, match=r"no SAE for hook 'layers\.30\.mlp'"):
        SAE.load(ELEUTHER, hook="layers.30.mlp")


def test_saelens_release_loads_from_the_cache_and_from_local_dir(hf_cache, tmp_path, monkeypatch):
    t = _hf_cache(hf_cache, AIRI, lambda snap: _saelens_files(snap / "blocks.19.hook_resid_post"))
    _tiny(monkeypatch, AIRI, d_in=D)
    sae = SAE.load(AIRI)  # one hook: no hook= needed
    assert sae.cfg.architecture == "standard" and sae.cfg.hook_name == "blocks.19.hook_resid_post"
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    want = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    torch.testing.assert_close(sae.encode(x), want)
    assert SAE.load("airi-r1-distill-llama-8b-l19", hook="model.layers.19").d_sae == N

    local = tmp_path / "mine"
    t2 = _saelens_files(local / "blocks.19.hook_resid_post", seed=5)
    got = releases.load(AIRI, local_dir=local)
    torch.testing.assert_close(got.W_enc, t2["W_enc"])
    assert got.cfg.model_name == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    with pytest.raises(SaetuneError, match=r"does not hold release .* expected cfg\.json and sae_weights\.safetensors"):
        releases.load(AIRI, local_dir=tmp_path / "empty")


def test_offline_without_files_says_where_to_put_them(hf_cache, monkeypatch):
    _tiny(monkeypatch, ELEUTHER, width=N, d_in=D, k=K)
    with pytest.raises(SaetuneError) as e:
        SAE.load(ELEUTHER, hook="model.layers.7.mlp")
    msg = str(e.value)
    assert "not in the local Hugging Face cache and the hub cannot be reached" in msg
    assert f"huggingface-cli download {ELEUTHER} --include 'layers.7.mlp/*'" in msg
    assert "DIR/layers.7.mlp/" in msg and "local_dir=DIR" in msg and msg.count(". ") == 0  # one sentence


def test_download_when_the_hub_is_reachable(tmp_path, monkeypatch):
    _tiny(monkeypatch, ELEUTHER, width=N, d_in=D, k=K)
    calls = []
    fetched = tmp_path / "fetched"

    def fake_snapshot(repo_id, allow_patterns, local_files_only):
        calls.append((repo_id, allow_patterns, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not cached")
        _sparsify_files(fetched / "layers.1.mlp")
        return str(fetched)

    monkeypatch.setattr(releases, "_snapshot_download", fake_snapshot)
    monkeypatch.setattr(releases, "_hub_reachable", lambda: True)
    sae = SAE.load(ELEUTHER, hook="layers.1.mlp")
    assert sae.d_sae == N
    assert calls == [(ELEUTHER, ["layers.1.mlp/*"], True), (ELEUTHER, ["layers.1.mlp/*"], False)]  # one hook only


def test_files_that_contradict_the_registry_are_refused(tmp_path, monkeypatch):
    _sparsify_files(tmp_path / "layers.2.mlp")  # N latents, but the real release has 65,536
    with pytest.raises(SaetuneError, match=r"says width 48, but release .* has width 65536"):
        releases.load(ELEUTHER, hook="layers.2.mlp", local_dir=tmp_path)
    _tiny(monkeypatch, ELEUTHER, width=N, d_in=D, k=32)
    with pytest.warns(UserWarning, match="listed with k=32, its cfg.json says k=4"):
        assert releases.load(ELEUTHER, hook="layers.2.mlp", local_dir=tmp_path).cfg.k == K


def test_unknown_names_pickles_and_paths(tmp_path):
    with pytest.raises(SaetuneError, match=r"unknown SAE release 'nobody/nothing'; known releases: .*EleutherAI/sae-"):
        releases.get("nobody/nothing")
    with pytest.raises(SaetuneError, match=r"does not exist, and it is not a known SAE release either; known "
                                           r"releases: .*andreuka18/"):
        SAE.load("nobody/nothing")
    with pytest.raises(SaetuneError, match=r"SAE path .*nope' does not exist$"):
        SAE.load(tmp_path / "nope")  # a missing path is reported as a path
    with pytest.raises(SaetuneError, match=r"pickled PyTorch file .* never unpickles"):
        SAE.load("Goodfire/DeepSeek-R1-SAE-l37")
    # an existing dir wins over a release of the same name
    d = tmp_path / "EleutherAI" / "sae-DeepSeek-R1-Distill-Qwen-1.5B-65k"
    t = _sparsify_files(d / "layers.0.mlp")
    torch.testing.assert_close(SAE.load(d, hook="layers.0.mlp").W_dec, t["W_dec"])


def test_registry_entries_are_complete():
    for rel in releases.RELEASES.values():
        assert rel.source.startswith("https://") and rel.hook_dirs and rel.base_model and rel.loads
        assert releases.find(rel.repo_id) is rel and all(releases.find(a) is rel for a in rel.aliases)
    eleuther = releases.get(ELEUTHER)
    assert eleuther.layout == "sparsify" and eleuther.canonical_hook("layers.12.mlp") == "model.layers.12.mlp"
    assert releases.get(AIRI).canonical_hook("blocks.19.hook_resid_post") == "model.layers.19"
    assert {r["release"] for r in releases.table()} == set(releases.RELEASES)


def test_the_written_layouts_are_what_sparsify_and_saelens_read(tmp_path, monkeypatch):
    """The tiny files above are the real layouts: the reference libraries load them and encode as saetune does."""
    from sae_lens import SAE as SAELensSAE
    from sparsify import Sae as SparsifySae

    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(4))
    _sparsify_files(tmp_path / "sp" / "layers.3.mlp")
    _tiny(monkeypatch, ELEUTHER, width=N, d_in=D, k=K)
    ours = releases.load(ELEUTHER, hook="layers.3.mlp", local_dir=tmp_path / "sp")
    out = SparsifySae.load_from_disk(tmp_path / "sp" / "layers.3.mlp").encode(x)
    theirs = torch.zeros(6, N).scatter(-1, out.top_indices, out.top_acts)
    torch.testing.assert_close(ours.encode(x), theirs, rtol=1e-5, atol=1e-5)

    _saelens_files(tmp_path / "sl" / "blocks.19.hook_resid_post")
    _tiny(monkeypatch, AIRI, d_in=D)
    ours = releases.load(AIRI, local_dir=tmp_path / "sl")
    theirs = SAELensSAE.load_from_disk(str(tmp_path / "sl" / "blocks.19.hook_resid_post"))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
