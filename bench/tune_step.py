"""One SAE-Tuning step (Resa Stage II): the reference-style step beside saetune's, same model,
same batch, same SAE, same LoRA init — plus the SAE hook's overhead (the same saetune step with
the SAE replaced by the identity).

reference : HF + peft LoRA on every block, SAE hook under no_grad, a full teacher pass (adapters
            off, no SAE), fp32 logits of both passes, ``kl_div(log q, p, "batchmean")``, backward, AdamW
saetune   : ``saetune.tuning.SAETuner`` (blocks ≤ hook once, LoRA after the hook, KL from hidden states)
no-SAE    : the saetune step with the bottleneck replaced by the identity (hook overhead)

    python bench/tune_step.py                      # CPU: the toy, and a wider random Qwen2 (vocab 32k)
    SHAPES=qwen1.5b python bench/tune_step.py      # GPU: Qwen2.5-1.5B shape, 2048 tokens, SAE 65,536 × k 32

Prints a table last and writes JSON (``OUT``, default bench/tune_step.json) after every shape.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, hook layer, d_sae, k, seq, batch)
    "toy": None,  # the shipped toy model (4 layers, width 128, vocab 261), hook block 2, SAE 1,024 × k 16
    "qwen-small": (256, 1024, 8, 4, 2, 32768, 4, 2048, 32, 256, 2),
    "qwen1.5b": (1536, 8960, 28, 12, 2, 151936, 12, 65536, 32, 2048, 1),
}


def _model_dir(name: str, tmp: Path) -> tuple[str, int, int, int, int, int]:
    """A HF model dir for ``name`` (random weights, except the toy) and (hook, d_sae, k, seq, batch)."""
    if name == "toy":
        from saetune.toy import shipped_base_path
        return str(shipped_base_path()), 2, 1024, 16, 128, 8
    h, inter, L, heads, kv, V, hook, n, k, T, B = SHAPES[name]
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from saetune.toy.tokenizer import build_tokenizer
    d = tmp / name
    if not (d / "config.json").exists():
        cfg = Qwen2Config(hidden_size=h, intermediate_size=inter, num_hidden_layers=L, num_attention_heads=heads,
                          num_key_value_heads=kv, vocab_size=V, max_position_embeddings=max(4096, T),
                          tie_word_embeddings=name != "qwen1.5b")
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).save_pretrained(d)
        build_tokenizer().save_pretrained(d)  # the tokenizer only packs data; ids below are random
    return str(d), hook, n, k, T, B


def _time(fn, warmup: int, steps: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench_shape(name: str, tmp: Path, device: str, steps: int, warmup: int) -> dict:
    from saetune.models import replace_activation
    from saetune.sae import SAE, SAEConfig
    from saetune.tuning import SAETuner, TuneConfig

    path, hook, n, k, T, B = _model_dir(name, tmp)
    dtype = "bfloat16" if device == "cuda" else "float32"
    sae_dir = tmp / f"{name}-sae"
    if not (sae_dir / "cfg.json").exists():
        from transformers import AutoConfig
        width = AutoConfig.from_pretrained(path).hidden_size
        SAE(SAEConfig(d_in=width, d_sae=n, k=k, hook_name=f"model.layers.{hook}"), seed=0).save(sae_dir)
    common = dict(model=path, sae=str(sae_dir), dataset="toy", max_examples=50, context_size=32, model_dtype=dtype,
                  device=device, lora_dropout=0.0, progress=False, lr=1e-4)
    fast = SAETuner(TuneConfig(**common), device)
    ref = SAETuner(TuneConfig(**common, shared_prefix=False), device)
    # same LoRA init on the blocks after the hook (B = 0 elsewhere keeps the prefix inert)
    rp = dict(ref.peft.named_parameters())
    with torch.no_grad():
        for nm, p in fast.peft.named_parameters():
            if p.requires_grad:
                rp[nm].copy_(p)
    vocab = fast.model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (B, T), generator=g).to(device) for _ in range(warmup + steps)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def reference_step(it=iter(batches * 4), opt=torch.optim.AdamW(ref.trainable(), lr=1e-4)):
        ids = next(it)
        with torch.no_grad(), ref.peft.disable_adapter():
            p = F.softmax(ref.peft(input_ids=ids, use_cache=False).logits.float(), -1)
        with replace_activation(ref.model, ref.hp, ref.fn):
            log_q = F.log_softmax(ref.peft(input_ids=ids, use_cache=False).logits.float(), -1)
        loss = F.kl_div(log_q, p, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.trainable(), 1.0)
        opt.step()
        return loss.item()

    def saetune_step(tuner, it, opt):
        ids = next(it)
        loss, _ = tuner.loss(ids)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuner.trainable(), 1.0)
        opt.step()
        return loss.item()

    # equal losses: both implementations from the same start on the same 3 batches
    fast_opt = torch.optim.AdamW(fast.trainable(), lr=1e-4)
    ref_losses = [reference_step() for _ in range(3)]
    it = iter(batches * 4)
    fast_losses = [saetune_step(fast, it, fast_opt) for _ in range(3)]
    rel = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(ref_losses, fast_losses))

    row = {"shape": name, "device": device, "dtype": dtype, "tokens_per_step": B * T, "hook": hook, "d_sae": n, "k": k,
           "losses_reference": ref_losses, "losses_saetune": fast_losses, "max_rel_loss_diff": rel}
    rounds = {"reference": [], "saetune": [], "no_sae": []}
    it = iter(batches * 1000)
    sae_fn = fast.fn
    ident = lambda x: x  # noqa: E731  (the hook overhead baseline)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # interleaved rounds, median of all
        rounds["reference"] += _time(reference_step, 1, steps // 3 or 1, sync)
        fast.fn = sae_fn
        rounds["saetune"] += _time(lambda: saetune_step(fast, it, fast_opt), 1, steps // 3 or 1, sync)
        fast.fn = lambda x: (fast.stash.update(x=x.detach(), x_hat=x.detach()) or ident(x.detach()))
        rounds["no_sae"] += _time(lambda: saetune_step(fast, it, fast_opt), 1, steps // 3 or 1, sync)
    fast.fn = sae_fn
    for key, ts in rounds.items():
        row[f"{key}_ms"] = round(statistics.median(ts), 2)
        row[f"{key}_tokens_per_s"] = round(B * T / (statistics.median(ts) / 1e3), 1)
    row["speedup_vs_reference"] = round(row["reference_ms"] / row["saetune_ms"], 2)
    row["sae_hook_overhead"] = round(row["saetune_ms"] / row["no_sae_ms"] - 1, 4)
    if device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = os.environ.get("SHAPES", "toy,qwen-small" if device == "cpu" else "toy,qwen1.5b").split(",")
    steps = int(os.environ.get("STEPS", "9"))
    out = Path(os.environ.get("OUT", Path(__file__).with_name("tune_step.json")))
    tmp = Path(os.environ.get("TMP_MODELS") or Path(tempfile.gettempdir()) / "saetune-bench-models")
    tmp.mkdir(parents=True, exist_ok=True)
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    rows = []
    for name in names:
        rows.append(bench_shape(name, tmp, device, steps, 2))
        out.write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                   "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"\n{'shape':<11} {'tok/step':>8} {'reference ms':>12} {'saetune ms':>10} {'no-SAE ms':>9} "
          f"{'speed-up':>8} {'hook ovh':>8} {'loss rel diff':>13}")
    for r in rows:
        print(f"{r['shape']:<11} {r['tokens_per_step']:>8} {r['reference_ms']:>12.1f} {r['saetune_ms']:>10.1f} "
              f"{r['no_sae_ms']:>9.1f} {r['speedup_vs_reference']:>7.2f}× {r['sae_hook_overhead']:>+8.1%} "
              f"{r['max_rel_loss_diff']:>13.2e}")


if __name__ == "__main__":
    main()
