"""Train the toy reasoning model: the built-in model organism for tests, demos and tutorials.

The model learns the task of :mod:`saetune.toy.task` by next-token prediction on the full text
``prompt + " " + response + eos`` with the loss on response tokens only (prompt masked), so it
behaves like a small reasoning model: it thinks in ``<think>`` with occasional
``wait , let me check :`` re-verifications, then answers in ``<answer>``.

Everything is a function of the seed: the initial weights (``build_model``), the batch at each
step (``random.Random`` keyed by seed and step) and no dropout, so two builds with the same
config and thread count give byte-identical ``model.safetensors``, and a resumed build (from
the checkpoint written at each eval) equals an uninterrupted one.

``python -m saetune.toy.build --ship`` rebuilds the model shipped in ``saetune/toy/base``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .. import config as _config
from ..config import opt
from ..errors import SaetuneError
from ..generation import SamplingParams, hf_generate
from ..io import atomic_replace_dir, atomic_write_json
from ..models import torch_threads
from ..runs import Checkpoints, RunDir, read_manifest
from . import task

BASE_DIR = Path(__file__).resolve().parent / "base"
BUILD_INFO = "toy_build.json"
LEGACY_CHECKPOINT = "checkpoint"  # where builds before saetune.runs.Checkpoints kept theirs: still resumed
EVAL_SEED_OFFSET = 1_000_003  # eval problems come from another stream than training batches


@dataclass
class ToyBuildConfig:
    """Training the built-in toy reasoning model (``saetune toy build``)."""

    seed: int = opt(0, "seed for the initial weights and the training data order")
    steps: int = opt(300, "optimizer steps (one batch of problems each); 300 take about 2 minutes on "
                          "one CPU core and reach a greedy accuracy of about 0.65 (400 steps: 0.85)")
    batch_size: int = opt(64, "problems per batch")
    lr: float = opt(2e-3, "peak AdamW learning rate")
    warmup_steps: int = opt(50, "steps of linear warmup from 0 to lr")
    min_lr_ratio: float = opt(0.1, "the cosine decay ends at lr * min_lr_ratio on the last step")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    check_prob: float = opt(0.3, "probability of a 'wait , let me check :' re-verification after each step")
    eval_problems: int = opt(256, "fresh problems for each greedy-accuracy evaluation")
    eval_every: int = opt(100, "evaluate (and checkpoint) every this many steps; 0 = only at the end")
    threads: int = opt(1, "torch CPU threads while building (0 = leave torch's setting); the weights "
                          "depend on it, and one thread is also the fastest on a busy machine")
    attn_implementation: Literal["sdpa", "eager"] = opt("sdpa", "attention kernel of the model")
    init_from: str = opt("", "continue training from this toy model dir (e.g. the shipped base) instead of a "
                             "fresh init: how the demo's stronger 'source' model is made")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_problems"):
            if getattr(self, name) < 1:
                raise SaetuneError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "threads"):
            if getattr(self, name) < 0:
                raise SaetuneError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SaetuneError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SaetuneError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.check_prob <= 1.0:
            raise SaetuneError(f"check_prob must lie in [0, 1], got {self.check_prob}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise SaetuneError(f"grad_clip and weight_decay must be 0 or more, got {self.grad_clip} "
                               f"and {self.weight_decay}")


# ---- pure pieces ------------------------------------------------------------------------------
def lr_at(step: int, cfg: ToyBuildConfig) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then cosine decay to ``lr * min_lr_ratio``.

    ``lr(s) = lr * (s+1)/W`` for ``s < W``; after that
    ``lr * (r + (1-r) * (1 + cos(pi * t)) / 2)`` with ``t = (s-W)/(steps-W-1)`` in [0, 1].
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * t)))


def train_batch(seed: int, step: int, batch_size: int, check_prob: float) -> list[dict[str, Any]]:
    """The examples of training ``step``: a function of (seed, step) alone, so resuming replays them."""
    rng = random.Random(f"saetune-toy-train:{seed}:{step}")  # str seeds hash with sha512: stable
    return [task.example(rng, check_prob) for _ in range(batch_size)]


def encode_batch(tokenizer, batch: list[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch as ``[(input_ids, labels), ...]``, one (B_i, T_i) pair per distinct row length.

    Each row is ``prompt response eos``; labels are -100 on the prompt, so the loss covers the
    response and its closing eos only. Responses differ only in how many re-checks they hold,
    so a batch has a few row lengths; grouping rows by length leaves no padding to compute on
    (padding to the longest row would waste about 30% of every step).
    """
    eos = tokenizer.eos_token_id
    prompts = tokenizer([ex["prompt"] for ex in batch], add_special_tokens=False)["input_ids"]
    responses = tokenizer([ex["response"] for ex in batch], add_special_tokens=False)["input_ids"]
    by_len: dict[int, tuple[list[list[int]], list[list[int]]]] = {}
    for p, r in zip(prompts, responses):
        row = p + r + [eos]
        ids, labels = by_len.setdefault(len(row), ([], []))
        ids.append(row)
        labels.append([-100] * len(p) + r + [eos])
    return [(torch.tensor(ids), torch.tensor(labels)) for _, (ids, labels) in sorted(by_len.items())]


def response_loss(model, groups: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean next-token cross-entropy over all labelled (response) tokens of all groups.

    ``sum_groups sum_t CE(logits[t], labels[t+1]) / #labelled tokens``: every token weighs the
    same, whichever length group it sits in.
    """
    total, count = 0.0, 0
    for ids, labels in groups:
        logits = model(input_ids=ids).logits  # (B, T, V)
        target = labels[:, 1:]  # (B, T-1): token t predicts token t+1
        total = total + torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    return total / max(count, 1)


def generation_stop_ids(tokenizer) -> list[int]:
    """Greedy decoding stops at eos or at ``</answer>``."""
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(task.ANSWER_CLOSE)]


def max_new_tokens() -> int:
    """Enough new tokens for the longest trace plus eos."""
    return task.max_response_words() + 1


# ---- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], batch_size: int = 64) -> list[str]:
    """Greedy responses (special tokens kept) to ``prompts``, left-padded in batches."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens())
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            ids = tokenizer(prompts[i:i + batch_size], add_special_tokens=False)["input_ids"]
            new = hf_generate(model, ids, greedy, tokenizer.pad_token_id, generation_stop_ids(tokenizer))  # (B, new)
            out += tokenizer.batch_decode(new, skip_special_tokens=False)
    finally:
        model.train(was_training)
    return out


def evaluate_toy(model, tokenizer, n: int, seed: int, batch_size: int = 64) -> float:
    """Greedy accuracy on ``n`` problems from ``examples(n, seed)``: exact match of ``<answer>``."""
    exs = task.examples(n, seed)
    responses = generate_responses(model, tokenizer, [e["prompt"] for e in exs], batch_size)
    return sum(task.is_correct(r, e["answer"]) for r, e in zip(responses, exs)) / max(n, 1)


# ---- the build --------------------------------------------------------------------------------
def _save_checkpoint(ckpts: Checkpoints, step: int, tokens: int, model, opt) -> None:
    """Model weights and AdamW state as safetensors + JSON: ``checkpoints/step_NNNNNNN/`` (the newest kept)."""
    ckpts.save(step, {"model": {k: v.clone() for k, v in model.state_dict().items()}}, {"tokens": tokens},
               optimizers={"optimizer": opt})


def _load_checkpoint(run: RunDir, ckpts: Checkpoints, model, opt) -> tuple[int, int]:
    """Restore the latest checkpoint (or an older build's ``checkpoint/``) into ``model`` and ``opt``;
    ``(step, tokens)``, ``(0, 0)`` without one."""
    ck = ckpts.load()
    if ck is None and (run.path / LEGACY_CHECKPOINT / "state.json").exists():
        ck = ckpts.load(run.path / LEGACY_CHECKPOINT)
    if ck is None:
        return 0, 0
    model.load_state_dict(ck.tensors("model"))
    ck.load_optimizer(opt, "optimizer")
    return ck.step, int(ck.meta["tokens"])


def _save_model_dir(model, tokenizer, final_dir: Path, progress: bool) -> None:
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens(), eos_token_id=generation_stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    tmp.chmod(0o755)
    try:
        bars_on = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)  # safetensors (the only format in transformers 5)
        finally:
            if bars_on:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        atomic_replace_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_toy(cfg: ToyBuildConfig, out: str | Path | None, resume: bool = False,
              overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the toy model into run dir ``out``; returns (and records) its stats.

    Writes ``metrics.jsonl`` (``step``, ``tokens``, ``loss``, ``lr``; ``accuracy`` at eval
    steps), ``checkpoints/`` at each eval (for ``resume``; safetensors + JSON) and the HF model dir ``model/``.
    Returns ``{"accuracy", "train_seconds", "steps", "n_params"}``.
    """
    with RunDir.open(out, "toy", cfg, resume=resume, overwrite=overwrite, seed=cfg.seed) as run:
        with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model, tokenizer, opt = _build_setup(cfg, run)
            ckpts = Checkpoints(run, keep=1)
            start, tokens = _load_checkpoint(run, ckpts, model, opt) if resume else (0, 0)
            run.truncate_metrics(start)
            accuracy = _train_steps(cfg, run, ckpts, model, tokenizer, opt, start, tokens, progress)
            if accuracy is None:  # resumed a finished run: nothing trained, measure again
                accuracy = evaluate_toy(model, tokenizer, cfg.eval_problems, cfg.seed + EVAL_SEED_OFFSET)
            with run.phase("save"):
                _save_model_dir(model, tokenizer, run.path / "model", progress)
                run.add_artifact("model", "model")
        stats = {"accuracy": accuracy, "train_seconds": run.manifest["phases"]["train"],
                 "steps": cfg.steps, "n_params": sum(p.numel() for p in model.parameters())}
        run.finish(stats=stats)
        return stats


def _build_setup(cfg: ToyBuildConfig, run: RunDir):
    """The fresh (or ``init_from``) model in train mode, its tokenizer and AdamW."""
    from .model import build_model  # transformers loads only when a build runs
    from .tokenizer import build_tokenizer
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, cfg.seed, attn_implementation=cfg.attn_implementation)
    if cfg.init_from:
        init, _ = load_toy(cfg.init_from, attn_implementation=cfg.attn_implementation)
        model.load_state_dict(init.state_dict())
        run.add_input("init_from", cfg.init_from)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    return model, tokenizer, opt


def _train_steps(cfg: ToyBuildConfig, run: RunDir, ckpts: Checkpoints, model, tokenizer, opt, start: int,
                 tokens: int, progress: bool) -> float | None:
    """Steps ``start`` … ``cfg.steps - 1``, a metrics row each, evaluation and a checkpoint every ``eval_every``;
    the last accuracy measured (None when no step ran)."""
    from tqdm.auto import tqdm
    accuracy = None
    eval_seed = cfg.seed + EVAL_SEED_OFFSET
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="toy build", unit="step")
    with run.phase("train"):
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            groups = encode_batch(tokenizer, train_batch(cfg.seed, step, cfg.batch_size, cfg.check_prob))
            loss = response_loss(model, groups)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            tokens += sum(ids.numel() for ids, _ in groups)
            done = step + 1
            row = {"step": done, "tokens": tokens, "loss": round(loss.item(), 5), "lr": lr_at(step, cfg)}
            is_eval = done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)
            if is_eval:
                accuracy = evaluate_toy(model, tokenizer, cfg.eval_problems, eval_seed)
                row["accuracy"] = accuracy
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{accuracy:.2f}")
            run.log(row)
            if is_eval:
                _save_checkpoint(ckpts, done, tokens, model, opt)
            bar.update(1)
    bar.close()
    return accuracy


# ---- the shipped base -------------------------------------------------------------------------
def shipped_base_path() -> Path:
    """``saetune/toy/base``, the toy model shipped with the package."""
    path = BASE_DIR
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise SaetuneError(f"the shipped toy model is missing from {str(path)!r}; rebuild it with "
                           "`python -m saetune.toy.build --ship` (about 2 minutes on a CPU)")
    return path


def shipped_source_path(check: bool = True) -> Path:
    """``saetune/toy/source``: the shipped base trained further (the demo's stronger source model)."""
    path = BASE_DIR.parent / "source"
    if check and not (path / "model.safetensors").exists():
        raise SaetuneError(f"the shipped toy source model is missing from {str(path)!r}; rebuild it with "
                           "`python -m saetune.toy.build --init-from <base dir> --steps 200 --lr 1e-3 "
                           "--warmup-steps 20 --seed 1 --ship-source`")
    return path


def load_toy(path: str | Path | None = None, attn_implementation: str | None = None):
    """``(model, tokenizer)`` of a toy model dir (default: the shipped base); model in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    from ..models import load_tokenizer

    path = shipped_base_path() if path is None else Path(path)
    if not (path / "config.json").exists():
        raise SaetuneError(f"{str(path)!r} is not a toy model dir (no config.json); pass a build's "
                           "model/ dir or leave the path out for the shipped base")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    tokenizer = load_tokenizer(str(path))
    return model.eval(), tokenizer


def toy_texts(n: int, seed: int, check_prob: float = 0.3) -> list[str]:
    """``n`` full task texts (prompt + response) for activation capture."""
    return [e["text"] for e in task.examples(n, seed, check_prob)]


def ship_base(run_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Copy a finished build's ``model/`` to ``dest`` (default the shipped base) with ``toy_build.json``."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("stage") != "toy" or manifest.get("status") != "complete":
        raise SaetuneError(f"{str(run_dir)!r} holds a '{manifest.get('stage')}' run with status "
                           f"{manifest.get('status')!r}; ship_base needs a complete 'toy' build")
    dest = BASE_DIR if dest is None else Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        shutil.copytree(run_dir / "model", tmp, dirs_exist_ok=True)
        info = {"config": _config.read_yaml(run_dir / "config.yaml"), **manifest["stats"],
                "versions": manifest.get("versions", {})}
        atomic_write_json(tmp / BUILD_INFO, info)
        for f in tmp.iterdir():
            f.chmod(0o644)  # package data: readable by everyone who installs it
        atomic_replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saetune.toy.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="run dir (default: runs/toy-<time>, or a temp dir with --ship)")
    parser.add_argument("--config", help="YAML recipe to start from")
    parser.add_argument("--ship", action="store_true", help="copy the built model to saetune/toy/base")
    parser.add_argument("--ship-source", action="store_true", help="copy the built model to saetune/toy/source "
                                                                   "(the demo's stronger source model)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _config.add_arguments(parser, ToyBuildConfig)
    args = parser.parse_args(argv)
    try:
        cfg = _config.load_config(ToyBuildConfig, args.config,
                                  _config.overrides_from_args(args, ToyBuildConfig))
        with contextlib.ExitStack() as stack:
            out = args.out
            if out is None and (args.ship or args.ship_source):
                out = stack.enter_context(tempfile.TemporaryDirectory(prefix="saetune-toy-"))
            stats = build_toy(cfg, out, resume=args.resume, overwrite=args.overwrite,
                              progress=not args.no_progress)
            print(json.dumps(stats))
            if args.ship:
                print(f"shipped to {ship_base(out)}")
            if args.ship_source:
                print(f"shipped to {ship_base(out, shipped_source_path(check=False))}")
    except SaetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
