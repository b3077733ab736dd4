"""Every Triton kernel compiles to machine code for a Hopper GPU (sm_90), on this GPU-less machine.

Triton's interpreter (which the other kernel tests use on CPU) runs the Python of a kernel, not
the compiler: a construct that the compiler rejects, or that only fails when lowered, passes
there. Triton ships its own ptxas, so the whole pipeline down to SASS runs here, for the
specialisations the serving path launches (float32 and bfloat16; head sizes 64 and 128; query
groups of 1, 3 and 4; one partition and several). It runs in a child process without
TRITON_INTERPRET, which conftest sets for this one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tpkernels import triton_attention as A, triton_ops as T

TARGET = GPUTarget("cuda", 90, 32)
count = 0


def compile(fn, types, constexprs, warps=4):
    global count
    names = fn.arg_names
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                   options={"num_warps": warps})
    count += 1


def ints(*names):
    return {n: "i32" for n in names}


for dt in ("fp32", "bf16"):
    p = "*" + dt
    compile(T._add_rms_norm_kernel, {**dict.fromkeys(["x_ptr", "d_ptr", "w_ptr", "r_ptr", "o_ptr"], p),
                                     "eps": "fp32", **ints("hidden", "sx", "sd", "sr", "so")}, {"BLOCK": 1024})
    compile(T._silu_mul_kernel, {"gu_ptr": p, "o_ptr": p, **ints("width", "s_gu", "s_o")}, {"BLOCK": 1024})
    for rope in (True, False):
        compile(T._rope_cache_kernel,
                {**dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "kc_ptr", "vc_ptr"], p),
                 "slot_ptr": "*i64", **ints("sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h", "s_rope",
                                            "cache_head", "num_q_heads", "num_kv_heads")},
                {"D": 64, "BLOCK_D": 64, "BLOCK_HALF": 32, "BLOCK_HQ": 16, "BLOCK_HKV": 4, "ROPE": rope})
    for d, group, split in ((64, 3, False), (64, 3, True), (128, 4, True), (64, 1, False)):
        block_d = max(16, triton.next_power_of_2(d))
        compile(A._partition_kernel,
                {**dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "out_ptr"], p), "tables_ptr": "*i64",
                 "lens_ptr": "*i64", **dict.fromkeys(["m_ptr", "l_ptr", "acc_ptr"], "*fp32"),
                 "qk_scale": "fp32", **ints("window", "s_qn", "s_qh", "s_on", "s_oh", "s_kh", "s_tn")},
                {"G": group, "D": d, "BS": 16, "PARTITION": A.DEFAULT_PARTITION, "BLOCK_G": 16,
                 "BLOCK_D": block_d, "BLOCK_N": A._tile_tokens(block_d, 4 if dt == "fp32" else 2, 256),
                 "SPLIT": split, "INTERPRET": False})
    compile(A._combine_kernel,
            {**dict.fromkeys(["m_ptr", "l_ptr", "acc_ptr"], "*fp32"), "lens_ptr": "*i64", "out_ptr": p,
             **ints("window", "num_partitions", "s_on", "s_oh")},
            {"D": 64, "PARTITION": A.DEFAULT_PARTITION, "BLOCK_D": 64, "INTERPRET": False}, warps=1)
print("compiled", count)
'''


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "compiled 18"
