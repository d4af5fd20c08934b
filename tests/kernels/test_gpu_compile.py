"""Compile the Triton kernels for an sm_90 (Hopper) target on the CPU, without a GPU.

Triton's CPU interpreter runs kernels as Python and never builds them, so an error only the compiler
sees (types, control flow Triton cannot lower) once passed every CPU test and broke on the H200. This
test runs Triton's compiler (AST -> TTIR -> TTGIR -> LLIR -> PTX -> cubin with the bundled ptxas) for
Hopper, in a subprocess because the test session itself runs Triton in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

# Triton's compiler for an sm_90 target, with the specialisation a launch gives: 16-byte aligned pointers
# and integer arguments divisible by 16 (all but N, the ragged sequence length).
BUILD = textwrap.dedent(
    """
    import inspect, itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn, types, const, warps=8, stages=3, source=ASTSource):
        params = list(inspect.signature(fn.fn).parameters)
        sig = {p: ("constexpr" if p in const else types[p]) for p in params}
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
                 if sig[p].startswith("*") or (sig[p] == "i32" and p != "N")}
        src = source(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in const.items()}, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})

    def try_build(label, *args, **kwargs):
        # 0 when build(*args, **kwargs) gives a cubin; else prints why under label and returns 1
        try:
            assert "cubin" in build(*args, **kwargs).asm
            return 0
        except Exception as exc:
            print(f"{label}: {type(exc).__name__}: {str(exc)[:600]}")
            return 1
    """
)

SCRIPT = BUILD + textwrap.dedent(
    """
    from salad_bench.kernels import select_triton as st

    ptr = {"S": "*fp32", "IDX": "*i32", "CNT": "*i32", "FMASK": "*i8"}
    ints = ["keep", "R", "N", "MQ", "MK", "H", "fs_b", "fs_h", "fs_m", "fs_k", "idx_width"]
    types = {**ptr, **{k: "i32" for k in ints}, "mass": "fp32"}
    failed = 0
    for force, topp in itertools.product([0, 1, 2], [False, True]):
        const = {"BQ": 128, "BK": 64, "FORCE": force, "TOPP": topp, "ROWS": st._SEL_ROWS, "COLS": 512}
        failed += try_build(f"_select_kernel FORCE={force} TOPP={topp}", st._select_kernel, types, const)
    pool_types = {"Q": "*bf16", "K": "*bf16", "PQ": "*fp32", "PK": "*fp32", **{k: "i32" for k in
                  ["sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n", "H", "N", "MQ", "MK"]}, "mult_q": "fp32", "mult_k": "fp32"}
    for pool_k, sub in itertools.product((False, True), (st._POOL_SUB,)):
        failed += try_build(f"_pool_kernel POOL_K={pool_k} SUB={sub}", st._pool_kernel, pool_types,
                            {"D": 128, "BQ": 128, "BK": 64, "POOL_K": pool_k, "SUB": sub})
    sys.exit(1 if failed else 0)
    """
)


def _compile(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a compile script in a subprocess with Triton in compiled (not interpreter) mode."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_selection_kernels_compile_for_hopper(tmp_path):
    res = _compile(SCRIPT, tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


KERNELS_SCRIPT = BUILD + textwrap.dedent(
    """
    from salad_bench.kernels import block_sparse as bs, gather as ga, linear_attn as la, pool as po

    FP32 = {"LSE", "DELTA", "PART", "S", "DPART", "DS", "COS", "SIN", "OUT"}
    I32 = {"KV_IDX", "KV_CNT", "ORDER", "QT_IDX", "QT_CNT", "QIdx", "IDX"}
    FLOATS = {"qk_scale", "sm_scale", "eps_n", "inv_n"}
    SCALARS = {"H", "N", "MQ", "MK", "KMAX", "CHUNK", "QT_STRIDE", "D", "T", "GH", "GW", "NH", "NW"}

    def types_of(fn):
        # argument types from the kernels' naming: upper-case tensors, *_desc TMA descriptors, the rest ints
        types = {}
        for p in inspect.signature(fn.fn).parameters:
            if p.endswith("_desc"):
                types[p] = "tensordesc<bf16[1,1,64,128]>"
            elif p in FP32:
                types[p] = "*fp32"
            elif p in I32:
                types[p] = "*i32"
            elif p in FLOATS:
                types[p] = "fp32"
            elif p[0].isupper() and p not in SCALARS:
                types[p] = "*bf16"
            else:
                types[p] = "i32"
        return types

    fwd = dict(D=128, BQ=128, BK=64, BLOCK_M=128, EVEN_N=False, KMAX_P2=512, PREC="tf32", HAS_RES=False, HAS_QIDX=False)
    lin = dict(D=128, KIND=0, ROPE=True)
    cases = [
        ("fwd tma", bs._fwd_kernel, dict(fwd, USE_TMA=True), 4),
        ("fwd tma, even N", bs._fwd_kernel, dict(fwd, USE_TMA=True, EVEN_N=True), 4),
        ("fwd pointers", bs._fwd_kernel, dict(fwd, USE_TMA=False), 4),
        ("fwd tma, residual and query index", bs._fwd_kernel, dict(fwd, USE_TMA=True, HAS_RES=True, HAS_QIDX=True), 4),
        ("bwd preprocess", bs._bwd_preprocess, dict(D=128, BLOCK=128), 4),
        ("bwd dk/dv", bs._bwd_dkdv_kernel, dict(D=128, BQ=128, BK=64, BLOCK_M=64, PREC="tf32"), 4),
        ("bwd dq", bs._bwd_dq_kernel, dict(D=128, BQ=128, BK=64, BLOCK_M=64, EVEN_N=False, KMAX_P2=512, PREC="tf32"), 4),
        ("gather pair", ga._gather_pair_kernel, dict(DP=128, ROWS=ga._ROWS), 4),
        ("window means", po._window_means_kernel, dict(WT=4, WH=4, WW=4, ROWS=16, DP=128, HAS_ORDER=True), 4),
        ("linear state", la._fwd_state_kernel, dict(lin, NATIVE_MODE=2, STATE_SPLIT=False, BLOCK=32), 4),
        ("linear state, split (the backward's)", la._fwd_state_kernel, dict(lin, NATIVE_MODE=2, STATE_SPLIT=True, BLOCK=32), 4),
        ("linear out", la._fwd_out_kernel, dict(lin, F32_MODE=1, F32_SPLIT=False, BLOCK=32), 4),
        ("linear bwd q", la._bwd_q_kernel, dict(lin, NATIVE_MODE=2, F32_MODE=1, F32_SPLIT=False, BLOCK=64), 8),
        ("linear bwd k/v", la._bwd_kv_kernel, dict(lin, NATIVE_MODE=2, F32_MODE=1, F32_SPLIT=False, BLOCK=64), 8),
    ]
    failed = 0
    for name, fn, const, warps in cases:
        failed += try_build(name, fn, types_of(fn), const, warps, stages=2)
    sys.exit(1 if failed else 0)
    """
)


def test_attention_and_linear_kernels_compile_for_hopper(tmp_path):
    """The block-sparse forward (TMA and pointer loads), its backward kernels, the k/v gather, the grid means and the
    linear-branch Triton kernels build for sm_90, with the specialisation a launch gives (aligned pointers, divisible integers)."""
    res = _compile(KERNELS_SCRIPT, tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


LINEAR_GLUON_SCRIPT = BUILD + textwrap.dedent(
    """
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from salad_bench.kernels import linear_gluon as lg

    bm = lg.BLOCK
    failed = 0
    for d, dt, name, rope, tdt, tname, kind, warps in ((128, gl.bfloat16, "bf16", True, gl.float32, "fp32", 0, 8),
                                                      (64, gl.float16, "fp16", True, gl.float16, "fp16", 2, 4),
                                                      (128, gl.float16, "fp16", False, gl.float32, "fp32", 1, 4)):
        def desc(r, c, t, tn):
            return f"tensordesc<{tn}[{r}, {c}],{gl.NVMMASharedLayout.get_default_for([r, c], t)}>"
        rows, table = desc(bm, d, dt, name), desc(bm, d // 2, tdt, tname)
        common = {"c_desc": table if rope else rows, "s_desc": table if rope else rows}
        params = inspect.signature(lg._out_kernel.fn).parameters
        heads = f"tensordesc<{name}[1, {bm}, {d}],{gl.NVMMASharedLayout.get_default_for([1, bm, d], dt)}>"
        # the output through registers and masked stores, and through shared memory and a TMA store
        for out_tma in (False, True):
            types = {p: "i32" for p in params} | common | {"q_desc": rows, "o_desc": heads if out_tma else rows,
                                                           "Out": "*" + name, "S": "*fp32", "eps_n": "fp32", "inv_n": "fp32"}
            const = {"D": d, "KIND": kind, "ROPE": rope, "STAGES": 3, "OUT_TMA": out_tma, "num_warps": warps,
                     "st_layout": gl.NVMMASharedLayout.get_default_for([d // 2, d], gl.float16),
                     "r_layout": gl.NVMMASharedLayout.get_default_for([bm, d // 2], gl.float16)}
            failed += try_build(f"gluon linear output pass D={d} {name} rope={rope} out_tma={out_tma}", lg._out_kernel,
                                types, const, warps, stages=1, source=GluonASTSource)
        kv_params = inspect.signature(lg._state_kernel.fn).parameters
        types = {p: "i32" for p in kv_params} | common | {"k_desc": rows, "v_desc": rows, "PART": "*fp32"}
        const = {"D": d, "KIND": kind, "ROPE": rope, "STAGES": 3, "num_warps": 8,
                 "r_layout": gl.NVMMASharedLayout.get_default_for([bm, d], dt)}
        failed += try_build(f"gluon linear K/V pass D={d} {name} rope={rope}", lg._state_kernel, types, const, 8,
                            stages=1, source=GluonASTSource)
    sys.exit(1 if failed else 0)
    """
)


def test_linear_gluon_passes_compile_for_hopper(tmp_path):
    """The linear branch's Gluon passes (kernels.linear_gluon) built for sm_90: bf16 with fp32 RoPE tables
    at D=128, fp16 with fp16 tables at D=64, fp16 without RoPE; relu, softmax and elu features."""
    pytest.importorskip("triton.experimental.gluon")
    res = _compile(LINEAR_GLUON_SCRIPT, tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
