"""Every Triton kernel compiles for an NVIDIA GPU (sm_90, through Triton's GPU IR), with no GPU present.

The interpreter runs kernels as Python and accepts programs the compiler rejects (a reassigned
constexpr, a loop-carried value that changes type, an unsupported op); this catches those on the
CPU-only CI. Runs in a subprocess, so the kernels are defined as compiled (not interpreted)
functions whatever TRITON_INTERPRET the test session has. The LLVM/PTX lowering is skipped to keep
the test short; ``SAETUNE_COMPILE_FULL=1`` runs it too."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from saetune.kernels import triton_entropy as E, triton_optim as O, triton_sparse as S, triton_topk as T

STOP_AFTER_TTGIR = os.environ.get("SAETUNE_COMPILE_FULL", "0") in ("", "0")
P32, PI64, PU8 = "*fp32", "*i64", "*u8"
KERNELS = {
    "topk": (T._topk_kernel, dict(pre_ptr="*bf16", stride_b="i64", n="i32", k="i32", v_ptr="*bf16", i_ptr=PI64,
             mask_ptr=PU8, k_aux="i32", va_ptr="*bf16", ia_ptr=PI64), dict(HAS_AUX=True, BLOCK=1024, BITS=T.RADIX_BITS)),
    "batch_hist": (T._batch_hist_kernel, dict(x_ptr="*bf16", numel="i64", prefix_ptr=PI64, hist_ptr="*i32",
                   shift="i32"), dict(BLOCK=1024, BITS=T.RADIX_BITS)),
    "gather": (S._gather_kernel, dict(rows_ptr=P32, s_r0="i64", s_r1="i64", idx_ptr=PI64, w_ptr="*bf16",
               s_w0="i64", s_w1="i64", out_ptr=P32, k="i32", D="i32"), dict(BLOCK_K=64, BLOCK_D=64)),
    "rows_dot": (S._rows_dot_kernel, dict(g_ptr=P32, s_g0="i64", s_g1="i64", rows_ptr=P32, s_r0="i64",
                 idx_ptr=PI64, add_ptr="*bf16", s_a0="i64", s_a1="i64", v_ptr="*bf16", out_ptr=P32, k="i32",
                 D="i32"), dict(HAS_ADD=True, RELU_MASK=True, BLOCK_K=64, BLOCK_D=64)),
    "latent_major": (S._latent_major_kernel, dict(order_ptr=PI64, crow_ptr=PI64, k="i32", D="i32",
                     wa_ptr="*bf16", xa_ptr=P32, s_a0="i64", s_a1="i64", outa_ptr=P32, wb_ptr=P32, xb_ptr=P32,
                     s_b0="i64", s_b1="i64", outb_ptr=P32, bias_ptr=P32),
                     dict(HAS_A=True, HAS_B=True, HAS_BIAS=True, BLOCK_E=32, BLOCK_D=128)),
    "adam": (O._adam_kernel, dict(p_ptr=P32, g_ptr=P32, m_ptr=P32, v_ptr=P32, step_ptr=P32, numel="i64",
             lr="fp32", beta1="fp32", beta2="fp32", eps="fp32"), dict(BLOCK=1024)),
    "sf": (O._sf_kernel, dict(y_ptr=P32, z_ptr=P32, g_ptr=P32, numel="i64", lr="fp32", mom="fp32", ckp1="fp32"),
           dict(BLOCK=1024)),
    "decoder_row_adam": (O._decoder_row_kernel, dict(p_ptr=P32, g_ptr=P32, s1_ptr=P32, s2_ptr=P32, step_ptr=P32,
                         D="i32", lr="fp32", beta1="fp32", beta2="fp32", eps="fp32", mom="fp32", ckp1="fp32"),
                         dict(ADAM=True, RENORM=True, BLOCK_D=2048)),
    "decoder_row_sf": (O._decoder_row_kernel, dict(p_ptr=P32, g_ptr=P32, s1_ptr=P32, s2_ptr=P32, step_ptr=P32,
                       D="i32", lr="fp32", beta1="fp32", beta2="fp32", eps="fp32", mom="fp32", ckp1="fp32"),
                       dict(ADAM=False, RENORM=True, BLOCK_D=2048)),
    "entropy_fwd": (E._fwd_kernel, dict(h_ptr="*bf16", s_h0="i64", s_h1="i64", w_ptr="*bf16", s_w0="i64",
                    s_w1="i64", b_ptr="*bf16", t_ptr=PI64, m_ptr=P32, s_ptr=P32, a_ptr=P32, zt_ptr=P32, N="i32",
                    V="i32", D="i32", tiles_per_split="i32", inv_temp="fp32"),
                    dict(HAS_BIAS=True, IEEE=False, BLOCK_N=64, BLOCK_V=128, BLOCK_D=64)),
    "entropy_dz": (E._dz_kernel, dict(h_ptr="*bf16", s_h0="i64", s_h1="i64", w_ptr="*bf16", s_w0="i64",
                   s_w1="i64", b_ptr="*bf16", t_ptr=PI64, lse_ptr=P32, ent_ptr=P32, gh_ptr=P32, s_gh="i64",
                   gl_ptr=P32, s_gl="i64", out_ptr=P32, N="i32", V="i32", D="i32", inv_temp="fp32",
                   ignore_index="i64"), dict(HAS_BIAS=True, IEEE=False, BLOCK_N=32, BLOCK_V=64, BLOCK_D=64)),
}
class _Lowered(Exception):
    pass


if STOP_AFTER_TTGIR:  # layouts assigned, the kernel is valid Triton; LLVM/PTX lowering skipped (slow)
    from triton.backends.nvidia.compiler import CUDABackend
    _add_stages = CUDABackend.add_stages

    def add_stages(self, stages, options, language):
        _add_stages(self, stages, options, language)

        def stop(mod, metadata):
            raise _Lowered()
        stages["llir"] = stop
    CUDABackend.add_stages = add_stages

# the fp32 variants: fp32 pre-activations; the entropy kernel's IEEE fp32 dot
KERNELS["topk_fp32"] = (T._topk_kernel, {**KERNELS["topk"][1], "pre_ptr": P32, "v_ptr": P32, "va_ptr": P32},
                        dict(HAS_AUX=False, BLOCK=512, BITS=T.RADIX_BITS))
KERNELS["entropy_fwd_fp32"] = (E._fwd_kernel, {**KERNELS["entropy_fwd"][1], "h_ptr": P32, "w_ptr": P32, "b_ptr": P32},
                               dict(HAS_BIAS=False, IEEE=True, BLOCK_N=64, BLOCK_V=128, BLOCK_D=64))
errors = {}
for name, (fn, sig, cex) in KERNELS.items():
    sig = {**sig, **{c: "constexpr" for c in cex}}
    missing = set(fn.arg_names) ^ set(sig)
    if missing:
        errors[name] = f"signature mismatch: {sorted(missing)}"
        continue
    try:
        triton.compile(ASTSource(fn, sig, constexprs=cex), target=GPUTarget("cuda", 90, 32))
    except _Lowered:
        pass
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"[-2000:]
print(json.dumps(errors))
'''


def test_every_kernel_compiles_for_sm90():
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert not errors, "\n\n".join(f"{k}: {v}" for k, v in errors.items())
