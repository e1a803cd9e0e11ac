"""Ground-truth benchmark: saetune's SAE architectures vs SAELens's own trainers on synthetic data.

Both libraries train on the same in-memory activations (SynthSAEBench's generator, via
:mod:`saetune.ground_truth`), in the same order, with the same batch size and token budget, the
same width and (for the top-k family) the same k; each library keeps its own optimiser recipe
(saetune: ``fit_sae`` defaults, Resa's sign-SGD + schedule-free; SAELens: ``SAETrainer`` with Adam,
its defaults). Every SAE is then scored the same way (:func:`saetune.ground_truth.ground_truth_scores`
on the held-out evaluation sample; SAELens SAEs in their inference form, batchtopk → JumpReLU):
MCC, firing F1, uniqueness, explained variance, L0, wall seconds and tokens per second.

    nice -n 10 .venv/bin/python bench/ground_truth.py                       # CPU defaults, a few minutes
    nice -n 10 .venv/bin/python bench/ground_truth.py --tokens 4194304 --libraries saetune,saelens,saetune-adam

Only training is timed (not data generation, not scoring): SAELens's ``SAETrainer.fit`` and saetune's
``fit_sae`` call, whose closing metric pass is given 8 rows (``eval_data``) so it adds next to nothing. ``standard`` and ``jumprelu``
have the same loss in both libraries (summed squared error per sample + coefficient × L1 resp. L0),
so one ``--l1`` / ``--l0`` serves both; their sparsity is not pinned like top-k's, so read L0
beside the scores.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from saetune.ground_truth import GroundTruthConfig, ground_truth_scores, load_ground_truth, make_ground_truth  # noqa: E402

ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "standard")


def batches(x: torch.Tensor, batch_size: int):
    """The training tensor in order, whole batches only, cycling if the budget needs more than one pass."""
    n = x.shape[0] // batch_size
    while True:
        for i in range(n):
            yield x[i * batch_size:(i + 1) * batch_size]


def matryoshka_widths(d_sae: int) -> list[int]:
    """Nested prefixes d_sae/8, d_sae/4, d_sae/2, d_sae (SAELens's and saetune's convention: last = d_sae)."""
    return [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]


# ---- saetune -----------------------------------------------------------------------------------

def train_saetune(arch: str, x: torch.Tensor, tokens: int, args, adam: bool = False) -> tuple[object, float]:
    from saetune import SAEConfig, fit_sae

    kw = {}
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        kw["k"] = args.k
    if arch == "matryoshka_batchtopk":
        kw["matryoshka_widths"] = matryoshka_widths(args.d_sae)
    if arch == "standard":
        kw["l1_coefficient"] = args.l1
    if arch == "jumprelu":
        kw["l0_coefficient"] = args.l0
    cfg = SAEConfig(d_in=x.shape[1], d_sae=args.d_sae, architecture=arch, **kw)
    # fit_sae ends with a metric pass over its eval rows (all training rows by default); its metrics are not
    # used here, so 8 rows keep that pass out of the timed region
    opts = dict(batch_size=args.batch_size, total_tokens=tokens, seed=args.seed, progress=False, device="cpu",
                eval_data=x[:8])
    if adam:
        opts.update(optimizer="adam", lr=args.saelens_lr)
    t0 = time.perf_counter()
    sae, _ = fit_sae(x[:tokens], cfg, **opts)
    return sae, time.perf_counter() - t0


# ---- SAELens -----------------------------------------------------------------------------------

def saelens_config(arch: str, d_in: int, args):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=args.d_sae, device="cpu", dtype="float32")
    if arch == "topk":
        return TopKTrainingSAEConfig(k=args.k, **common)
    if arch == "batchtopk":
        return BatchTopKTrainingSAEConfig(k=args.k, **common)
    if arch == "matryoshka_batchtopk":
        return MatryoshkaBatchTopKTrainingSAEConfig(k=args.k, matryoshka_widths=matryoshka_widths(args.d_sae),
                                                    **common)
    if arch == "jumprelu":
        return JumpReLUTrainingSAEConfig(l0_coefficient=args.l0, **common)
    if arch == "standard":
        return StandardTrainingSAEConfig(l1_coefficient=args.l1, **common)
    raise ValueError(arch)


def train_saelens(arch: str, x: torch.Tensor, tokens: int, args) -> tuple[object, float]:
    from sae_lens import SAE as LensSAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = saelens_config(arch, x.shape[1], args)
    cls, _ = get_sae_training_class(cfg.architecture())
    torch.manual_seed(args.seed)
    sae = cls(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=tokens, train_batch_size_samples=args.batch_size, lr=args.saelens_lr,
        lr_end=args.saelens_lr, lr_scheduler_name="constant", device="cpu", dead_feature_window=1000,
        feature_sampling_window=2000, logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches(x[:tokens], args.batch_size))
    t0 = time.perf_counter()
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):  # SAETrainer's progress bar
        trainer.fit()
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:  # the inference form (batchtopk → JumpReLU), as SAELens ships it
        sae.save_inference_model(tmp)
        inference = LensSAE.load_from_disk(tmp, device="cpu")
    return inference.eval(), wall


# ---- table ---------------------------------------------------------------------------------------

COLS = ("library", "architecture", "tokens", "wall s", "tokens/s", "MCC", "F1", "uniqueness", "EV", "L0", "dead")


def row(lib: str, arch: str, tokens: int, wall: float, s: dict) -> dict:
    return {"library": lib, "architecture": arch, "tokens": tokens, "wall s": wall, "tokens/s": tokens / wall,
            "MCC": s["mcc"], "F1": s["f1_mean"], "uniqueness": s["uniqueness"], "EV": s["explained_variance"],
            "L0": s["l0"], "dead": s["dead_frac"]}


def markdown(rows: list[dict]) -> str:
    fmt = {"tokens": "{:,}", "wall s": "{:.1f}", "tokens/s": "{:,.0f}", "MCC": "{:.3f}", "F1": "{:.3f}",
           "uniqueness": "{:.3f}", "EV": "{:.3f}", "L0": "{:.2f}", "dead": "{:.3f}"}
    lines = ["| " + " | ".join(COLS) + " |", "|" + "|".join("---" if c in ("library", "architecture") else "---:"
                                                          for c in COLS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(r[c]) for c in COLS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="", help="a saved ground-truth dataset dir (default: generate one)")
    p.add_argument("--save-data", default="", help="write the generated dataset here")
    p.add_argument("--features", type=int, default=256, help="true features F")
    p.add_argument("--hidden", type=int, default=64, help="activation width d")
    p.add_argument("--d-sae", type=int, default=256, help="SAE latents (SynthSAEBench: = F)")
    p.add_argument("--k", type=int, default=6, help="k of topk / batchtopk / matryoshka (≈ the true L0)")
    p.add_argument("--tokens", default="262144,1048576",
                   help="comma-separated token budgets (training samples per SAE); each is a separate run")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    p.add_argument("--libraries", default="saetune,saelens",
                   help="saetune (fit_sae's own recipe), saelens (SAETrainer, Adam), saetune-adam (fit_sae with "
                        "Adam at --saelens-lr: the same optimiser as SAELens, to separate recipe from code)")
    p.add_argument("--saelens-lr", type=float, default=3e-4, help="SAELens Adam lr (its default 3e-4)")
    p.add_argument("--l1", type=float, default=0.3, help="standard: l1_coefficient (both libraries: loss = "
                                                         "Σ‖x − x̂‖²/B + l1·Σ f_j‖W_dec,j‖/B)")
    p.add_argument("--l0", type=float, default=1.0, help="jumprelu: l0_coefficient (both libraries: loss = "
                                                         "Σ‖x − x̂‖²/B + l0·Σ H(pre − θ)/B)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest on a busy 2-core box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.data:
        data = load_ground_truth(args.data)
    else:
        data = make_ground_truth(GroundTruthConfig(num_features=args.features, hidden_dim=args.hidden,
                                                   seed=args.seed))
        if args.save_data:
            from saetune.ground_truth import save_ground_truth
            save_ground_truth(data, args.save_data)
    budgets = [int(t) for t in args.tokens.split(",") if t]
    x = data.sample_activations(max(budgets), seed=data.meta["eval_seed"] + 1)
    cfg = data.meta["config"]
    print(f"data: F={cfg['num_features']} d={cfg['hidden_dim']} true L0={data.meta['true_l0']:.2f}, "
          f"{x.shape[0]:,} training samples, {data.activations.shape[0]:,} held-out for scoring", flush=True)

    rows = []
    trainers = {"saetune": train_saetune, "saelens": train_saelens,
                "saetune-adam": lambda arch, x, tokens, args: train_saetune(arch, x, tokens, args, adam=True)}
    for tokens in budgets:
        for arch in [a for a in args.archs.split(",") if a]:
            for lib in [lib for lib in args.libraries.split(",") if lib]:
                try:
                    sae, wall = trainers[lib](arch, x, tokens, args)
                except Exception as e:  # one failing combination should not hide the others
                    print(f"{lib} {arch}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                r = row(lib, arch, tokens, wall, ground_truth_scores(sae, data))
                rows.append(r)
                print(f"{lib:12s} {arch:22s} {tokens:>9,} wall {wall:6.1f}s  MCC {r['MCC']:.3f}  F1 {r['F1']:.3f}  "
                      f"uniq {r['uniqueness']:.3f}  EV {r['EV']:.3f}  L0 {r['L0']:.2f}", flush=True)
    table = markdown(rows)
    header = (f"Ground truth: F={cfg['num_features']} true features in d={cfg['hidden_dim']} (true L0 "
              f"{data.meta['true_l0']:.2f}), d_sae={args.d_sae}, k={args.k}, batch {args.batch_size}, "
              f"l1={args.l1}, l0={args.l0}, SAELens lr {args.saelens_lr}; {torch.get_num_threads()} torch "
              f"thread(s) on {platform.machine()} ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
              f"UTC), torch {torch.__version__}.")
    print("\n" + header + "\n\n" + table)
    if args.out:
        Path(args.out).write_text(header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
