"""Shared fixtures: one toy model per test session, one tiny random model dir, one-thread torch; and the
Hypothesis profiles."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles live here and nowhere else (a test sets only its own budget: max_examples, phases).
# "ci", the default: the same examples on every run (derandomized, no example database) and no wall-clock
# checks (deadline, too_slow), so a red run is a regression that reruns red, never a draw or a busy machine.
# "explore" (HYPOTHESIS_PROFILE=explore): fresh examples each run, failures kept in .hypothesis/ and replayed.
settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))



@pytest.fixture(scope="session", autouse=True)
def library_log_handlers_on_the_session_stream():
    """transformers binds its log handler to whatever ``sys.stderr`` is when it first logs; inside a test
    using ``capsys`` that stream is closed afterwards, and every later warning prints "--- Logging error ---"
    with a traceback into some other test's captured output. Configure it once, up front, on the session's."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_verbosity()

@pytest.fixture(scope="session")
def toy_base():
    """``(model, tokenizer)`` of the shipped toy model, loaded once for the whole suite (eval mode)."""
    from saetune.toy import load_toy

    model, tokenizer = load_toy()
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 toy model with its tokenizer, saved as a HF model dir."""
    from saetune.toy.model import build_model
    from saetune.toy.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("tiny_model")
    tok = build_tokenizer()
    build_model(tok, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny matmuls on a 2-core box run faster without thread spin-waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory) -> Path:
    """An activation store of the shipped toy at ``model.layers.2``: 300 toy examples in 64-token chunks."""
    from saetune.activations import CacheConfig, cache

    d = tmp_path_factory.mktemp("acts") / "cache"
    cache(CacheConfig(model="toy", hooks=["model.layers.2"], dataset="toy", max_examples=300, context_size=64,
                      progress=False), d)
    return d
