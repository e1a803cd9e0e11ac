"""Every stage reports GPU-hours and an estimated cost from a configurable $/GPU-hour."""

import pytest

from saetune.errors import SaetuneError
from saetune.runs import RunDir, gpu_hour_usd
from saetune.tuning import TuneConfig


def _finish(tmp_path, name, rate=None):
    run = RunDir.open(tmp_path / name, "tune", TuneConfig(sae="x"))
    run.manifest["n_gpus"] = 2
    if rate is not None:
        run.manifest["gpu_hour_usd"] = rate
    run.manifest["phases"] = {"train": 1800.0, "save": 0.0}
    run.finish()
    return run.manifest


def test_cost_follows_gpus_time_and_price(tmp_path, monkeypatch):
    monkeypatch.delenv("SAETUNE_GPU_HOUR_USD", raising=False)
    m = _finish(tmp_path, "a")
    assert m["gpu_hours"] == pytest.approx(1.0) and m["estimated_cost_usd"] == pytest.approx(1.0)
    assert _finish(tmp_path, "b", rate=2.5)["estimated_cost_usd"] == pytest.approx(2.5)
    monkeypatch.setenv("SAETUNE_GPU_HOUR_USD", "0.4")
    assert _finish(tmp_path, "c", rate=2.5)["estimated_cost_usd"] == pytest.approx(0.4)
    monkeypatch.setenv("SAETUNE_GPU_HOUR_USD", "cheap")
    with pytest.raises(SaetuneError, match="'cheap' is not a number"):
        gpu_hour_usd()
