"""Stopping a run mid-way in a test, as Ctrl-C would."""

import pytest


def interrupted_run(monkeypatch, cls, method: str, at_call: int, run, *args, **kwargs) -> None:
    """Run ``run(*args, **kwargs)`` with ``cls.method`` raising KeyboardInterrupt at its ``at_call``-th call,
    check that the run ended with it, and put ``cls.method`` back."""
    orig = getattr(cls, method)
    calls = {"n": 0}

    def stopping(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(cls, method, stopping)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(*args, **kwargs)
    finally:
        monkeypatch.setattr(cls, method, orig)
