"""Multi-process SAE-Tuning: 2 processes under torchrun (DDP over gloo on CPU, through accelerate)
train the same adapter as one process on the same global batch; accelerate configs for GPUs parse."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saetune.sae import SAE, SAEConfig
from saetune.tuning import TuneConfig, tune

RECIPES = Path(__file__).resolve().parents[1] / "saetune" / "recipes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=0).save(tmp_path / "sae")
    common = ["--config", "toy_tune", "--sae", str(tmp_path / "sae"), "--max-steps", "3", "--max-examples", "100",
              "--eval-seqs", "2", "--checkpoint-every", "2", "--log-every", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAETUNE_DEBUG": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "saetune.cli", "tune", *common, "--batch-size", "1", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    man = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert man["status"] == "complete" and man["world_size"] == 2
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["tokens"] == 3 * 2 * 128

    from saetune.config import load_config
    torch.set_num_threads(1)
    single = load_config(TuneConfig, "toy_tune", {"sae": str(tmp_path / "sae"), "max_steps": 3, "max_examples": 100,
                                                  "eval_seqs": 2, "batch_size": 2, "progress": False})
    tune(single, tmp_path / "single")
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 1e-3 for k, v in a.items() if "lora_B" in k)  # the adapter did move
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kind", [("ddp_gpu", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = load_config_from_file(str(RECIPES / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.name == kind and cfg.num_processes == 2
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2 and cfg.mixed_precision == "bf16"  # Resa's Stage II setting


def test_a_multi_process_tune_needs_out(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="needs --out"):
        tune(TuneConfig(sae="x"), None)
