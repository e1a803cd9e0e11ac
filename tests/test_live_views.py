"""The explorer's live views (saetune.analysis.live) against a brute-force reference.

The reference runs the toy model itself with ``output_hidden_states`` (hidden_states[i] is the input of block i,
hidden_states[i + 1] its output), encodes with ``sae.encode`` and takes entropy from ``token_entropy``; the
trace overlay's activations must sit at the response's own positions, after the prompt.
"""

import numpy as np
import pytest
import torch

from saetune.analysis.live import prompt_activations, response_feature_acts, top_features_of_prompt
from saetune.rl.entropy import token_entropy
from saetune.sae import SAE, SAEConfig
from saetune.toy import task

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "User : compute ( 3 + 4 ) * 2 . Assistant : <think> 3 + 4 = 7 . 7 * 2 = 14 ."


@pytest.fixture(scope="module")
def sae():
    return SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=3)


@torch.no_grad()
def _reference(model, sae, ids: list[int], layer_input: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, V], hidden [T, d] = input of block ``layer_input``, SAE activations [T, d_sae])."""
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    h = out.hidden_states[layer_input][0]
    return out.logits[0], h, sae.encode(h.float())


@pytest.mark.parametrize("hook, layer_input", [("model.layers.2", 3), ("blocks.1.hook_resid_pre", 1)])
def test_prompt_activations_equal_sae_encode_and_token_entropy(toy_base, sae, hook, layer_input):
    model, tok = toy_base
    view = prompt_activations(model, tok, sae, hook, TEXT, top_n=3)
    ids = tok(TEXT)["input_ids"]
    logits, _, acts = _reference(model, sae, ids, layer_input)
    T = len(ids)
    assert view["ids"] == ids and len(view["tokens"]) == T and view["acts"].shape == (T, 256)
    np.testing.assert_allclose(view["acts"], acts.numpy(), rtol=1e-5, atol=1e-5)
    ent = token_entropy(logits)  # [T]: position t's distribution over token t + 1
    np.testing.assert_allclose(view["entropy"], ent.numpy(), rtol=1e-5, atol=1e-5)
    lp = logits.double().log_softmax(-1)
    np.testing.assert_allclose(view["entropy"], (-(lp.exp() * lp).sum(-1)).numpy(), rtol=1e-4, atol=1e-5)
    assert np.ptp(view["entropy"]) > 0.5  # positions differ: a shifted entropy would not pass

    table = view["table"]
    assert table["position"].tolist() == list(range(T))
    np.testing.assert_allclose(table["entropy"], ent.numpy(), rtol=1e-5, atol=1e-5)
    assert table["active"].tolist() == (acts > 0).sum(-1).tolist()
    for t in range(T):
        v, i = acts[t].topk(3)
        assert table["top_features"][t] == ", ".join(f"{int(j)}: {float(a):.2f}" for j, a in zip(i, v) if a > 0)


def test_top_features_of_prompt_by_brute_force():
    acts = np.array([[0.0, 2.0, 0.0, 0.5],
                     [3.0, 1.0, 0.0, 0.0],
                     [0.0, 1.5, 0.0, 0.0]], dtype=np.float32)
    top = top_features_of_prompt(acts, n=3)
    assert top["feature"].tolist() == [0, 1, 3]  # by largest activation anywhere; feature 2 never fires
    assert top["max_act"].tolist() == [3.0, 2.0, 0.5]
    assert top["n_tokens"].tolist() == [1, 3, 1]


def test_trace_overlay_maps_each_response_token_to_its_own_position(toy_base, sae):
    model, tok = toy_base
    ex = task.examples(1, seed=11)[0]
    prompt_ids = tok(ex["prompt"], add_special_tokens=False)["input_ids"]  # as the RL trainer and the Traces page
    response_ids = tok(" " + ex["response"], add_special_tokens=False)["input_ids"]
    P, R = len(prompt_ids), len(response_ids)
    _, _, acts = _reference(model, sae, prompt_ids + response_ids, 3)  # [P + R, d_sae]
    resp = acts[P:]
    feature = int((resp > 0).sum(0).argmax())  # fires at several response tokens, with varying values
    want = resp[:, feature].numpy()
    assert (want > 0).sum() >= 2 and not np.allclose(want, acts[P - 1:-1, feature].numpy())  # an offset shows

    got = response_feature_acts(model, sae, "model.layers.2", prompt_ids, response_ids, feature)
    assert got.shape == (R,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # the same response after a longer prompt: the offset follows the prompt, and the context changes the values
    longer = tok("User : compute ( 1 + 1 ) * 1 . Assistant : 2 . " + ex["prompt"],
                 add_special_tokens=False)["input_ids"]
    _, _, acts2 = _reference(model, sae, longer + response_ids, 3)
    got2 = response_feature_acts(model, sae, "model.layers.2", longer, response_ids, feature)
    np.testing.assert_allclose(got2, acts2[len(longer):, feature].numpy(), rtol=1e-5, atol=1e-5)


def test_branch_trace_overlay_runs_the_response_after_its_prefix(toy_base, sae):
    """A CURE branch's response follows prompt + prefix: its trace records that context as prompt_ids (what the
    Traces page passes to the overlay), not the prompt alone."""
    from saetune.rl.trainer import Sample, trace_record
    model, tok = toy_base
    ex = task.examples(1, seed=12)[0]
    prompt_ids = tok(ex["prompt"], add_special_tokens=False)["input_ids"]
    full = tok(" " + ex["response"], add_special_tokens=False)["input_ids"]
    prefix, response = full[:6], full[6:]
    n = len(response)
    s = Sample(0, {"prompt": ex["prompt"], "prompt_ids": prompt_ids, "answer": ex["answer"]}, prompt_ids + prefix,
               response, [1] * n, torch.zeros(n), torch.zeros(n), "", False, 0, is_branch=True, prefix_len=len(prefix))
    rec = trace_record(s, tok, step=0, advantage=None, kept=True)
    assert rec["prompt_ids"] == prompt_ids + prefix and rec["token_ids"] == response

    _, _, acts = _reference(model, sae, prompt_ids + prefix + response, 3)
    resp = acts[len(prompt_ids) + len(prefix):]
    feature = int((resp > 0).sum(0).argmax())
    got = response_feature_acts(model, sae, "model.layers.2", rec["prompt_ids"], rec["token_ids"], feature)
    np.testing.assert_allclose(got, resp[:, feature].numpy(), rtol=1e-5, atol=1e-5)
    without_prefix = response_feature_acts(model, sae, "model.layers.2", prompt_ids, response, feature)
    assert not np.allclose(without_prefix, got, atol=1e-3)  # the prefix matters: the old fallback was wrong here
