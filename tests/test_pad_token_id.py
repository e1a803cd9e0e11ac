"""``saetune.generation.pad_token_id``: the one pad-token lookup shared by HF generation, RL rollouts and steering."""
from types import SimpleNamespace

import pytest

from saetune.errors import SaetuneError
from saetune.generation import HFBackend, pad_token_id


def _tok(pad, eos):
    return SimpleNamespace(pad_token_id=pad, eos_token_id=eos)


def test_pad_token_wins_then_eos_stands_in():
    assert pad_token_id(_tok(5, 2)) == 5
    assert pad_token_id(_tok(0, 2)) == 0  # id 0 is a real pad id, not "missing"
    assert pad_token_id(_tok(None, 2)) == 2


def test_missing_pad_and_eos_is_named_with_its_fix():
    with pytest.raises(SaetuneError, match=r"neither a pad nor an EOS token.*set tokenizer\.pad_token") as err:
        pad_token_id(_tok(None, None), model=SimpleNamespace())
    assert "SimpleNamespace" in str(err.value)


def test_every_caller_uses_the_shared_lookup(toy_base):
    from saetune.rl.rollout import SampleParams, sample
    from saetune import steering
    from saetune.sae import SAE, SAEConfig

    model, tok = toy_base
    bare = SimpleNamespace(pad_token_id=None, eos_token_id=None)
    with pytest.raises(SaetuneError, match="neither a pad nor an EOS token"):
        HFBackend(model, bare)
    with pytest.raises(SaetuneError, match="neither a pad nor an EOS token"):
        sample(model, bare, [[1, 2, 3]], SampleParams(max_new_tokens=2), seed=0)
    sae = SAE(SAEConfig(d_in=model.config.hidden_size, d_sae=16, k=2, hook_name="model.layers.1"), seed=0)
    with pytest.raises(SaetuneError, match="neither a pad nor an EOS token"):
        steering.generate(model, bare, [[1, 2, 3]], sae, mode="record", max_new_tokens=2)
