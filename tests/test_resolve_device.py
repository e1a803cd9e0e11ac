"""`resolve_device`: one implementation, in saetune.models."""

import pytest
import torch

from saetune.errors import SaetuneError
from saetune.models import default_device, resolve_device


def test_auto_and_plain_names():
    assert resolve_device("auto") == default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "CPU", "mps", ""])
def test_unknown_name_is_named_with_the_valid_ones(bad):
    with pytest.raises(SaetuneError, match=rf"device {bad!r} is not valid; valid: auto, cpu, cuda, cuda:N"):
        resolve_device(bad)


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_refused_without_cuda(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SaetuneError, match="CUDA is not available here"):
        resolve_device(name)
    assert resolve_device("auto") == "cpu"
