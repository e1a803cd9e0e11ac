"""Multi-process SAE-Tuning on CPU, 2 processes over gloo: DDP under torchrun, and FSDP2 and DeepSpeed
ZeRO-2 under ``accelerate launch`` with the GPU configs' CPU twins, train the same adapter as one process
on the same global batch. Under the sharded engines a run killed after a checkpoint resumes (adapter and
optimizer state gathered whole into the checkpoint, sharded again on load) to that same adapter."""

import json
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
ACCELERATE = RECIPES / "accelerate"


pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process runs on one thread, restored after the module


def _free_port() -> int:
    """A port free now; ``accelerate launch`` takes no port 0, so a launch that lost it to another process
    before binding it (EADDRINUSE) is retried on another (see ``launch`` below)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=0).save(tmp_path / "sae")
    common = ["--config", "toy_tune", "--sae", str(tmp_path / "sae"), "--max-steps", "3", "--max-examples", "100",
              "--eval-seqs", "2", "--checkpoint-every", "2", "--log-every", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAETUNE_DEBUG": "1"}
    # --standalone: the rendezvous store binds port 0 (no port picked here, released, and raced for)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "saetune.cli", "tune", *common, "--batch-size", "1", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    man = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert man["status"] == "complete" and man["world_size"] == 2
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["tokens"] == 3 * 2 * 128

    from saetune.config import load_config
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


@pytest.fixture(scope="module")
def one_process_4_steps(tmp_path_factory):
    """The SAE and the adapter one process trains in 4 steps of the toy recipe on batches of 2."""
    from saetune.config import load_config
    d = tmp_path_factory.mktemp("one_process")
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=0).save(d / "sae")
    cfg = load_config(TuneConfig, "toy_tune", {"sae": str(d / "sae"), "max_steps": 4, "max_examples": 100,
                                               "eval_seqs": 2, "batch_size": 2, "progress": False})
    return d / "sae", d / "run", tune(cfg, d / "run")


@pytest.mark.parametrize("engine,config", [("fsdp", "fsdp_cpu_test"), ("deepspeed", "deepspeed_zero2_cpu_test")])
def test_sharded_engine_resumes_to_the_one_process_adapter(engine, config, one_process_4_steps, tmp_path):
    if engine == "deepspeed":
        import deepspeed  # noqa: F401  (make test installs it; a missing engine fails here, it is not skipped)
    sae, single_run, single = one_process_4_steps
    run = tmp_path / "run"
    args = ["--config", "toy_tune", "--sae", str(sae), "--max-steps", "4", "--max-examples", "100", "--eval-seqs", "2",
            "--checkpoint-every", "2", "--log-every", "1", "--no-progress", "--batch-size", "1", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAETUNE_DEBUG": "1"}

    def launch(args, env):
        for _ in range(3):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ACCELERATE / f"{config}.yaml"), "--main_process_port", str(_free_port()),
                   "-m", "saetune.cli", "tune", *args]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
            if "EADDRINUSE" not in proc.stderr:  # the store never bound: no worker ran, nothing was written
                return proc
        return proc

    killed = launch(args, {**env, "SAETUNE_FAULT_AT_STEP": "4", "SAETUNE_FAULT_KILL_RANK": "1"})
    assert killed.returncode != 0 and "(SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert json.loads((run / "manifest.json").read_text())["status"] != "complete"
    resumed = launch(["--resume", str(run), "--no-progress"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "complete" and man["world_size"] == 2 and man["engine"] == engine
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["tokens"] == 4 * 2 * 128
    from safetensors.torch import load_file
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(single_run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 1e-3 for k, v in a.items() if "lora_B" in k)  # the adapter did move
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    res = json.loads((run / "results.json").read_text())
    assert res["shared_prefix"] and res["trainable_params"] == single["trainable_params"]  # the exact saving stays on
    assert res["eval_loss_after"] == pytest.approx(single["eval_loss_after"], rel=1e-4)


CONFIGS = [("ddp_gpu", "MULTI_GPU"), ("fsdp_gpu", "FSDP"), ("fsdp_cpu_test", "FSDP"),
           ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero2_cpu_test", "DEEPSPEED")]
GPU_TWIN = {"fsdp_cpu_test": "fsdp_gpu", "deepspeed_zero2_cpu_test": "deepspeed_zero2"}


@pytest.mark.parametrize("name,kind", CONFIGS)
def test_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    assert cfg.distributed_type.name == kind and cfg.num_processes == 2
    assert not cfg.use_cpu  # with use_cpu, accelerate launch starts one plain process
    if kind == "FSDP":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name in GPU_TWIN:  # the config the CPU test runs is the shipped one in fp32
        gpu = load_config_from_file(str(ACCELERATE / f"{GPU_TWIN[name]}.yaml"))
        mine, theirs = cfg.to_dict(), gpu.to_dict()
        for d in (mine, theirs):
            d.pop("mixed_precision"), d.pop("gpu_ids", None)
        assert cfg.mixed_precision == "no" and mine == theirs


def test_zero2_config_is_resas_and_the_trainer_fills_it():
    """deepspeed_zero2.yaml through accelerate's DeepSpeedPlugin: ZeRO stage 2, bf16, clipping 1.0, one step per
    batch; the trainer sets the micro-batch and refuses a clipping norm that differs from its own."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin
    from saetune.distributed import _configure_zero
    cfg = load_config_from_file(str(ACCELERATE / "deepspeed_zero2.yaml"))
    plugin = DeepSpeedPlugin(**cfg.deepspeed_config)
    plugin.set_mixed_precision(cfg.mixed_precision)
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    _configure_zero(ds, batch_size=1, grad_clip=1.0)  # Resa: 1 sequence per GPU, clip 1.0
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * cfg.num_processes == 2
    with pytest.raises(Exception, match=r"gradient_clipping: 1.0 in the DeepSpeed config.*0.5"):
        _configure_zero(dict(ds), batch_size=1, grad_clip=0.5)
    with pytest.raises(Exception, match="gradient_accumulation_steps: 4"):
        _configure_zero({**ds, "gradient_accumulation_steps": 4}, batch_size=1, grad_clip=1.0)
    auto = {"gradient_clipping": "auto"}
    _configure_zero(auto, batch_size=2, grad_clip=0.0)
    assert auto == {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "gradient_accumulation_steps": 1}


def test_a_multi_process_tune_needs_out(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="needs --out"):
        tune(TuneConfig(sae="x"), None)
