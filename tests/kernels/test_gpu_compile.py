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

SCRIPT = textwrap.dedent(
    """
    import inspect, itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernels import select_triton as st

    def build(fn, types, const):
        params = list(inspect.signature(fn.fn).parameters)
        sig = {p: ("constexpr" if p in const else types[p]) for p in params}
        src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in const.items()})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

    ptr = {"S": "*fp32", "IDX": "*i32", "CNT": "*i32", "FMASK": "*i8"}
    ints = ["keep", "R", "N", "MQ", "MK", "H", "fs_b", "fs_h", "fs_m", "fs_k", "idx_width"]
    types = {**ptr, **{k: "i32" for k in ints}, "mass": "fp32"}
    failed = 0
    for force, topp in itertools.product([0, 1, 2], [False, True]):
        const = {"BQ": 128, "BK": 64, "FORCE": force, "TOPP": topp, "ROWS": st._SEL_ROWS, "COLS": 512}
        try:
            k = build(st._select_kernel, types, const)
            assert "cubin" in k.asm or "ptx" in k.asm
        except Exception as exc:
            failed += 1
            print(f"_select_kernel FORCE={force} TOPP={topp}: {type(exc).__name__}: {str(exc)[:600]}")
    pool_types = {"Q": "*bf16", "K": "*bf16", "PQ": "*fp32", "PK": "*fp32", **{k: "i32" for k in
                  ["sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n", "H", "N", "MQ", "MK"]}, "mult_q": "fp32", "mult_k": "fp32"}
    for pool_k, sub in itertools.product((False, True), (0, st.POOL_SUB)):
        try:
            build(st._pool_kernel, pool_types, {"D": 128, "BQ": 128, "BK": 64, "POOL_K": pool_k, "SUB": sub})
        except Exception as exc:
            failed += 1
            print(f"_pool_kernel POOL_K={pool_k} SUB={sub}: {type(exc).__name__}: {str(exc)[:600]}")
    sys.exit(1 if failed else 0)
    """
)


def test_selection_kernels_compile_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
