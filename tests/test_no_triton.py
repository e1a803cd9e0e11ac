"""Without triton (macOS, Windows, ARM Linux: pyproject installs it only on Linux x86_64) every public
kernel op, SAE training, SAE-Tuning, the RL entropy and rollout log-probs and the analysis modules
work, and triton is never imported; ``SAETUNE_KERNELS=triton`` is then a SaetuneError naming it.

The check runs in a subprocess whose import system cannot find triton (the path finder is wrapped
to answer "no such module" for ``triton`` and ``triton.*``), as on a machine without the package."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from saetune.errors import SaetuneError
from saetune.kernels import dispatch

# Installed before anything else is imported: `import triton` then fails as for a missing package.
HIDE_TRITON = r'''
import importlib.machinery
import sys


class _PathFinderWithoutTriton(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_PathFinderWithoutTriton if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
try:
    import triton  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the test set-up failed to hide triton")
TRITON_HIDDEN = True
'''

OPS = r'''
import importlib, os, pkgutil, tempfile, warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
warnings.filterwarnings("error", message=".*triton cannot be imported")  # CPU tensors: no warning is due
from saetune.errors import SaetuneError


def finite_grads(*ts):
    for t in ts:
        assert t.grad is not None and torch.isfinite(t.grad).all(), t.shape
        t.grad = None


# ---- every public op of saetune.kernels, with gradients -------------------------------------
import saetune.kernels as K

g = torch.Generator().manual_seed(0)
B, d, n, k = 6, 5, 11, 3
x = torch.randn(B, d, generator=g)
W_enc = torch.randn(d, n, generator=g).requires_grad_()
b_enc = torch.randn(n, generator=g).requires_grad_()
W_dec = torch.randn(n, d, generator=g).requires_grad_()
b_dec = torch.randn(d, generator=g).requires_grad_()
dead = torch.arange(n) % 2 == 0

x_hat, v, i = K.topk_autoencode(x, W_enc, b_enc, W_dec, b_dec, k)  # (B, d), (B, k), (B, k)
assert x_hat.shape == (B, d) and v.shape == i.shape == (B, k)
x_hat.square().sum().backward()
finite_grads(W_enc, b_enc, W_dec, b_dec)

v, i, va, ia = K.topk_encode(x - b_dec, W_enc, b_enc, k, dead, 2)
assert va.shape == (B, 2) and bool(dead[ia[va != 0]].all())
out = K.sparse_decode(v, i, W_dec) + K.sparse_decode(va, ia, W_dec)  # (B, d)
out.square().sum().backward()
finite_grads(W_enc, b_enc, W_dec, b_dec)

pre = torch.randn(B, n, generator=g)
v, i, va, ia = K.topk_select(pre, k, dead, 2)
assert torch.equal(v.sort(-1).values, pre.topk(k, -1).values.relu().sort(-1).values)

p = pre.clone().requires_grad_()
acts = K.batch_topk(p, 2)  # (B, n), 2·B active in all
assert int((acts > 0).sum()) <= 2 * B
(acts * torch.randn(B, n, generator=g)).sum().backward()
finite_grads(p)

from saetune.kernels.entropy import linear_entropy_logprob_naive
h = torch.randn(7, 4, generator=g).requires_grad_()
W = torch.randn(13, 4, generator=g).requires_grad_()
bias = torch.randn(13, generator=g).requires_grad_()
t = torch.randint(0, 13, (7,), generator=g)
t[2] = -100
ent, lp = K.linear_entropy_logprob(h, W, t, bias, temperature=0.7)
ent_r, lp_r = linear_entropy_logprob_naive(h, W, t, bias, temperature=0.7)
torch.testing.assert_close(ent, ent_r)
torch.testing.assert_close(lp, lp_r)
(ent.sum() + lp.sum()).backward()
finite_grads(h, W, bias)

from saetune.optim import build_optimizer
from saetune.sae import SAE, SAEConfig
sae = SAE(SAEConfig(d, n, k=k), seed=0)
opt = build_optimizer("adam", sae.parameters(), 1e-2)
for q in sae.parameters():
    q.grad = torch.randn(q.shape, generator=g)
K.sae_update(opt, sae, True)
torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(n))

if TRITON_HIDDEN:  # asking for Triton without it: a clear error that names the package, not an ImportError
    os.environ["SAETUNE_KERNELS"] = "triton"
    for call in (lambda: K.topk_select(pre, k), lambda: K.linear_entropy_logprob(h, W, t)):
        try:
            call()
        except SaetuneError as e:
            assert "triton" in str(e) and "install" in str(e), e
        else:
            raise AssertionError("SAETUNE_KERNELS=triton without triton did not raise")
    del os.environ["SAETUNE_KERNELS"]
'''

STACK = r'''
# ---- SAE training through the trainer: TopK (whole-SAE node, then AuxK), BatchTopK ------------
from saetune.sae_trainer import SAETrainer, TrainSAEConfig
for arch, optimizer, auxk in (("topk", "signum_sf", 1 / 32), ("batchtopk", "adam", 0.0)):
    cfg = TrainSAEConfig(d_sae=[40], k=[k], architecture=arch, optimizer=optimizer, auxk_coef=auxk, auxk_k=4,
                         dead_tokens=6, lr=2e-2)
    tr = SAETrainer("s", SAE(SAEConfig(d, 40, k=k, architecture=arch), seed=1), cfg, "cpu")
    for step in range(4):
        m = tr.step(torch.randn(6, d, generator=g), None)
        assert all(torch.isfinite(val).all() for val in m.values()), (arch, m)
    if arch == "topk":
        assert "auxk" in m  # dead latents appeared: the AuxK path (topk_encode + sparse_decode) ran

# ---- one SAE-Tuning step on the toy model ------------------------------------------------------
from saetune.tuning import SAETuner, TuneConfig
tmp = Path(tempfile.mkdtemp())
SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.1"), seed=0).save(tmp / "sae")
tuner = SAETuner(TuneConfig(model="toy", sae=str(tmp / "sae"), dataset="toy", max_examples=8, context_size=32,
                            progress=False, lora_r=4, lora_alpha=16, lora_dropout=0.0), "cpu")
loss, m = tuner.loss(torch.randint(0, 200, (2, 32), generator=g))
loss.backward()
assert torch.isfinite(loss) and any(q.grad is not None for q in tuner.trainable())

# ---- RL: token entropy, rollout log-probs (fused kernel's torch path vs explicit logits) -------
from saetune.rl import rollout as R
from saetune.rl.entropy import entropy_stats, high_entropy_mask, token_entropy
from saetune.toy import load_toy
model, tok = load_toy()
model.eval()
ids, attn = R.right_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], tok.pad_token_id)
tm = attn.bool()
with torch.no_grad():
    lp_f, ent_f = R.score(model, ids, attn, tm, temperature=0.7)
    lp_e, ent_e = R.score(model, ids, attn, tm, temperature=0.7, use_kernel=False)
torch.testing.assert_close(lp_f, lp_e, atol=1e-5, rtol=1e-5)
torch.testing.assert_close(ent_f, ent_e, atol=1e-5, rtol=1e-5)
mask = tm.float()
mask[:, 0] = 0
assert entropy_stats(ent_f, mask)["n_tokens"] == int(mask.sum())
assert high_entropy_mask(ent_f, mask).shape == mask.shape
assert token_entropy(torch.randn(3, 9, generator=g)).shape == (3,)

# ---- the explorer's analysis modules, and one live view through the SAE ------------------------
import saetune.analysis as A
for info in pkgutil.iter_modules(A.__path__):
    importlib.import_module(f"saetune.analysis.{info.name}")
from saetune.analysis.live import prompt_activations
view = prompt_activations(model, tok, SAE.load(tmp / "sae"), "model.layers.1", "3 + 4")
assert view["acts"].shape[1] == 256

leaked = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
assert not leaked, leaked
print("NO-TRITON OK")
'''


def _env() -> dict:
    drop = ("TRITON_INTERPRET", "SAETUNE_KERNELS", "SAETUNE_POISON")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0 and "NO-TRITON OK" in out.stdout, out.stdout[-3000:] + out.stderr[-6000:]


def test_everything_runs_without_triton():
    _run(HIDE_TRITON + OPS + STACK)


def test_cpu_ops_never_load_a_triton_module_even_where_triton_is_installed():
    """The torch path stays clear of the ``triton_*`` modules (torch itself may import triton, so the
    check is on saetune's modules)."""
    _run("import sys\nTRITON_HIDDEN = False\n" + OPS + "\nloaded = sorted(m for m in sys.modules if "
         "m.startswith('saetune.kernels.triton'))\nassert not loaded, loaded\nprint('NO-TRITON OK')\n")


def test_cuda_tensors_without_triton_take_the_torch_path_and_say_so_once(monkeypatch):
    monkeypatch.delenv("SAETUNE_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "_triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    dispatch._warn_cuda_without_triton.cache_clear()
    cuda = SimpleNamespace(is_cuda=True)  # use_triton reads only .is_cuda
    try:
        with pytest.warns(RuntimeWarning, match="triton cannot be imported") as caught:
            assert dispatch.use_triton(cuda) is False
            assert dispatch.use_triton(cuda) is False
        assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
        monkeypatch.setenv("SAETUNE_KERNELS", "triton")
        with pytest.raises(SaetuneError, match="the triton package cannot be imported.*install triton"):
            dispatch.use_triton(cuda)
    finally:
        dispatch._warn_cuda_without_triton.cache_clear()
