"""Kernel benchmark: block-sparse attention backends, block selection and the linear branch.

``python -m salad_bench.harness.bench_kernels --out results/kernels/<date>-<card>`` times, in one process on one
card, at the Wan2.1-1.3B 480p attention shape (B=1, H=12, N=32,760, D=128, bf16):

* dense: SDPA cuDNN, SDPA flash (FA2), FlexAttention (compiled, no mask);
* block-sparse at each density (random layouts with the diagonal always kept, 128 x 64 tiles):
  FlexAttention with the same block mask and our Triton kernel;
* passes ``fwd``, ``bwd`` (backward alone, graph retained) and ``fwd+bwd``;
* our kernel at more densities and with 128 x 128 tiles beside Flex, and a top-k layout from video-like Q/K;
* block selection (Triton vs torch) and the linear branch (Triton vs torch);
* interleaved headline rounds, the forward on each input kind and logit spread, and the peers' kernels.

Every cell is one row (kind ``kernel``) appended at once with provenance and ``kernel_path`` (which
implementation of each of our kernels ran, :func:`kernels.execution_paths`); a backend that cannot run
gives a ``skipped`` row with the reason, never a silent fallback. Accuracy: ``rel_l2`` of the output
(and of dQ/dK/dV for ``fwd+bwd``) against an fp32 reference on the first two heads. FLOPs: forward
``4 * kept token pairs * D``, backward 2.5x, fwd+bwd 3.5x; dense-equivalent uses ``4 B H N^2 D``.
A Markdown table is printed last.

Bad input exits 2 with one line naming the flag, the value and the fix, before anything is measured
(``--n``/``--heads``/``--rounds`` >= 1, densities in (0, 1], known sections). Without a CUDA device the
full Wan shape is refused (its dense scores alone are ~52 GB): run it on a GPU, or pass a small ``--n``
for a CPU smoke run (``--n 256 --heads 1 --dtype fp32``, Triton kernels under ``TRITON_INTERPRET=1``).
A section that fails prints one line and becomes an error row; the sweep goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from salad_bench.harness.accuracy import rel_l2
from salad_bench.harness.engine import Cell, Engine, failure
from salad_bench.harness.errors import BadInput, Parser, check_writable_dir
from salad_bench.harness.flops import BACKWARD_FACTOR, tflops
from salad_bench.harness.results import RowWriter, cell_identity, headline_times, round_ratios
from salad_bench.harness.timing import measure
from salad_bench.kernels import execution_paths
from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.layout import BlockLayout, cdiv, keep_count

PASS_FACTOR = {"fwd": 1.0, "bwd": BACKWARD_FACTOR, "fwd+bwd": 1.0 + BACKWARD_FACTOR}
REF_HEADS = 2  # heads checked against the fp32 reference (the full reference is slow)
SECTIONS = ("dense", "sparse", "selection", "linear", "video", "variants", "profile", "headline", "inputs", "peers")
DEFAULT_SECTIONS = "dense,sparse,selection,linear,video,variants,headline"
CPU_MAX_N = 4096  # the largest preset a machine without CUDA runs without an explicit --n (cpu-tiny: 2,400)
SMOKE = "--n 256 --heads 1 --dtype fp32"  # a CPU smoke run's size, named in the refusal


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------
def random_layout(b: int, h: int, n: int, bq: int, bk: int, density: float, device, seed: int = 0) -> BlockLayout:
    """``keep_count`` blocks per query block: the diagonal ones plus uniformly random others."""
    from salad_bench.kernels.selection import diagonal_blocks, topk_layout

    mq, mk = cdiv(n, bq), cdiv(n, bk)
    if density >= 1.0:
        return BlockLayout.full(b, h, n, bq, bk, device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(b, h, mq, mk, generator=g).to(device)
    force = diagonal_blocks(n, bq, bk, device)
    return topk_layout(scores, keep_count(1.0 - density, mk), n, bq, bk, force)


def head_slice(layout: BlockLayout, heads: int) -> BlockLayout:
    return BlockLayout(layout.kv_idx[:, :heads].contiguous(), layout.kv_cnt[:, :heads].contiguous(),
                       layout.block_q, layout.block_k, layout.seq_len)


# ----------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------
def model_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, N, D)`` as a Wan layer hands it to a method: a view of a token-major ``(B, N, H, D)``
    buffer (the projection's output, unflattened and transposed), not a contiguous tensor."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _echo(row: dict[str, Any]) -> None:
    ms = row.get("ms")
    msg = f"{ms:8.3f} ms" if isinstance(ms, float) else f"{row.get('status')}: {row.get('reason', '')}"
    print(f"  {row['method']:<24} {row.get('variant', ''):<14} d={row.get('density', '')!s:<6} "
          f"{row.get('pass', ''):<8} {msg}", flush=True)


class Bench:
    """The kernel subject of the :class:`~harness.engine.Engine`: each timed call is one cell, at one shape
    on this card."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from salad_bench.harness.workloads import DTYPES

        self.dtype = DTYPES[args.dtype]
        self.dtype_name = args.dtype
        from salad_bench.harness.workloads import get_workload

        wl = get_workload(args.workload)
        # --n/--heads shrink the workload for a CPU smoke run (a flat grid of n tokens)
        self.grid = wl.grid if args.n is None else (1, 1, args.n)
        self.b, self.h, self.d = 1, wl.heads if args.heads is None else args.heads, wl.head_dim
        self.n = math.prod(self.grid)
        self.workload = wl.name if args.n is None and args.heads is None else f"attn-B{self.b}H{self.h}N{self.n}D{self.d}"
        self.writer = RowWriter(args.out, resume=args.resume, device=str(self.device))
        self.engine = Engine(self.writer, _echo, resume=args.resume)
        self.rows: list[dict[str, Any]] = []
        self.baselines: dict[tuple[str, str], float] = {}  # (method, pass) -> ms
        g = torch.Generator(device="cpu").manual_seed(0)
        shape = (self.b, self.h, self.n, self.d)
        self.q, self.k, self.v = (torch.randn(shape, generator=g).to(self.device, self.dtype) for _ in range(3))
        self.dout = torch.randn(shape, generator=g).to(self.device, self.dtype)
        self.rep_ms = 50.0 if args.quick else 100.0
        self.kernel_path = json.dumps(execution_paths(self.device, self.dtype, self.d), sort_keys=True)
        self._ref_cache: dict[Any, Any] = {}

    # -- rows --------------------------------------------------------------------------------------
    def cell(self, method: str, backend: str, pass_: str, *, density: float = 1.0, variant: str = "",
             config: dict | None = None, extra: dict | None = None) -> Cell:
        """One kernel cell at this benchmark's shape; ``config`` defaults to the backend and variant."""
        ident = cell_identity("kernel", method, config or {"backend": backend, "variant": variant}, self.workload,
                              self.dtype_name, pass_, round(1.0 - density, 4))
        return Cell(ident, {"B": self.b, "H": self.h, "N": self.n, "D": self.d, "device": str(self.device),
                            "kernel_path": self.kernel_path, "backend": backend, "variant": variant,
                            "density": density, "sparsity": 1.0 - density, **(extra or {})})

    def timed(self, method: str, backend: str, pass_: str, fn: Callable[[], Any], *, density: float = 1.0,
              pairs: float | None = None, variant: str = "", extra: dict | None = None,
              config: dict | None = None, attention: bool = True) -> dict[str, Any]:
        """The row of ``fn`` timed (with attention FLOPs and speedups over cuDNN and FA2 when ``attention``)."""
        cell = self.cell(method, backend, pass_, density=density, variant=variant, config=config, extra=extra)
        cudnn, fa2 = self.baselines.get(("sdpa_cudnn", pass_)), self.baselines.get(("sdpa_flash", pass_))
        if attention:
            cell.base = {"speedup_vs_cudnn": cudnn, "speedup_vs_fa2": fa2, "speedup": cudnn}

        def clock(_: Cell) -> dict[str, Any]:
            t = measure(fn, self.device, rep_ms=self.rep_ms)
            if not attention:
                return {"status": "ok", "reason": "", **t.as_row()}
            dense_pairs = float(self.b * self.h * self.n * self.n)
            flops_exec = 4.0 * (dense_pairs if pairs is None else pairs) * self.d * PASS_FACTOR[pass_]
            flops_dense = 4.0 * dense_pairs * self.d * PASS_FACTOR[pass_]
            return {"status": "ok", "reason": "", **t.as_row(), "flops_executed": flops_exec,
                    "flops_dense": flops_dense, "tflops_executed": tflops(flops_exec, t.median_ms),
                    "tflops_dense_equiv": tflops(flops_dense, t.median_ms), "cudnn_ms": cudnn, "fa2_ms": fa2,
                    "baseline_method": "sdpa_cudnn", "baseline_ms": cudnn}

        row = self.engine.cell(cell, clock)
        self.rows.append(row)
        return row

    def skipped(self, method: str, backend: str, pass_: str, reason: str, density: float = 1.0, variant: str = "",
                status: str = "skipped", config: dict | None = None) -> dict[str, Any]:
        """A row that was not measured (``status`` skipped, or error), with its reason."""
        return self.fail([self.cell(method, backend, pass_, density=density, variant=variant, config=config)],
                         status, reason)[0]

    def fail(self, cells: list[Cell], status: str, reason: str) -> list[dict[str, Any]]:
        rows = self.engine.fail(cells, status, reason)
        self.rows.extend(rows)
        return rows

    # -- attention callables ---------------------------------------------------------------------
    def run_passes(self, method: str, backend: str, attn: Callable, *, density: float = 1.0, pairs=None,
                   variant: str = "", layout: BlockLayout | None = None, passes=("fwd", "bwd", "fwd+bwd"),
                   config: dict | None = None) -> dict[str, float]:
        """Time ``attn(q, k, v)`` forward, backward alone and both; check accuracy once."""
        q, k, v, dout = self.q, self.k, self.v, self.dout
        try:
            acc = self.accuracy(attn, layout, grads=False)
        except Exception as exc:  # noqa: BLE001 - every pass of a method that cannot run becomes its row
            self.fail([self.cell(method, backend, p, density=density, variant=variant, config=config) for p in passes],
                      **failure(exc))
            return {}
        if "fwd+bwd" in passes:
            try:  # a backward that cannot compile must not hide the forward rows
                acc.update(self.accuracy(attn, layout, grads=True))
            except Exception as exc:  # noqa: BLE001 - the fwd+bwd row below records the failure
                print(f"  {method}{f' ({variant})' if variant else ''}: gradients not checked against the reference: "
                      f"{_one_line(failure(exc)['reason'])}", file=sys.stderr)
        out_ms = {}
        if "fwd" in passes:
            r = self.timed(method, backend, "fwd", lambda: attn(q, k, v), density=density, pairs=pairs,
                           variant=variant, extra={"rel_l2": acc.get("out")}, config=config)
            out_ms["fwd"] = r.get("ms")
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        if "bwd" in passes:
            try:
                out = attn(qg, kg, vg)
            except Exception as exc:  # noqa: BLE001 - e.g. a backward graph that does not compile
                out = None
                self.fail([self.cell(method, backend, "bwd", density=density, variant=variant, config=config)],
                          **failure(exc))
            if out is not None:
                r = self.timed(method, backend, "bwd",
                               lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True),
                               density=density, pairs=pairs, variant=variant, config=config)
                out_ms["bwd"] = r.get("ms")
            del out
        if "fwd+bwd" in passes:
            r = self.timed(method, backend, "fwd+bwd",
                           lambda: torch.autograd.grad(attn(qg, kg, vg), (qg, kg, vg), dout),
                           density=density, pairs=pairs, variant=variant, config=config,
                           extra={"rel_l2": acc.get("out"), "rel_l2_dq": acc.get("dq"), "rel_l2_dk": acc.get("dk"),
                                  "rel_l2_dv": acc.get("dv")})
            out_ms["fwd+bwd"] = r.get("ms")
        return out_ms

    def accuracy(self, attn: Callable, layout: BlockLayout | None, grads: bool) -> dict[str, float]:
        """rel L2 of out (and grads) vs the fp32 reference, on the first REF_HEADS heads.

        The method runs on all heads (no recompilation for a new shape); only the first heads are compared.
        """
        hs = min(REF_HEADS, self.h)
        lay = head_slice(layout, hs) if layout is not None else BlockLayout.full(self.b, hs, self.n, 128, 128, self.device)
        cached = self._ref_cache.get("entry")
        if cached is None or cached[0] is not layout or (grads and not cached[2][1]):
            sl = [x[:, :hs].float() for x in (self.q, self.k, self.v)]
            # the layout object itself is kept: an id() could be reused by the next density's layout
            self._ref_cache["entry"] = (layout, None, reference_chunked(*sl, lay, self.dout[:, :hs].float()
                                                                        if grads else None))
        ref, ref_grads = self._ref_cache["entry"][2]
        xs = [x.detach().clone().requires_grad_(grads) for x in (self.q, self.k, self.v)]
        out = attn(*xs)
        res = {"out": rel_l2(out[:, :hs], ref)}
        if grads:
            got = torch.autograd.grad(out, xs, self.dout)
            res.update({n: rel_l2(g[:, :hs], r) for n, g, r in zip(("dq", "dk", "dv"), got, ref_grads, strict=True)})
        return res


def reference_chunked(q, k, v, layout: BlockLayout, dout=None, rows: int = 2048):
    """fp32 block-sparse attention (and its gradients for ``dout``), one chunk of query rows at a time.

    Each chunk is differentiated on its own, so memory stays O(rows * N) even with gradients.
    """
    from salad_bench.kernels.reference import token_mask_from_layout

    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
    for s in range(0, q.shape[2], rows):
        sl = slice(s, min(q.shape[2], s + rows))
        qc = q[:, :, sl].detach().requires_grad_(dout is not None)
        kk, vv = k.detach().requires_grad_(dout is not None), v.detach().requires_grad_(dout is not None)
        with torch.enable_grad():
            mask = token_mask_from_layout(layout, sl)
            sc = torch.einsum("bhqd,bhkd->bhqk", qc, kk) * scale
            sc = sc.masked_fill(~mask, float("-inf"))
            p = torch.softmax(sc, dim=-1).nan_to_num(0.0)
            o = torch.einsum("bhqk,bhkd->bhqd", p, vv)
        out[:, :, sl] = o.detach()
        if dout is not None:
            gq, gk, gv = torch.autograd.grad(o, (qc, kk, vv), dout[:, :, sl])
            dq[:, :, sl] = gq
            dk += gk
            dv += gv
    return out, ([dq, dk, dv] if dout is not None else [])


def _ours(layout: BlockLayout) -> Callable:
    """Our Triton block-sparse attention ``(q, k, v) -> out`` on ``layout``."""
    from salad_bench.kernels import block_sparse as bs

    return lambda q, k, v: bs.block_sparse_attention_triton(q, k, v, layout)


def _flex(layout: BlockLayout) -> Callable:
    """FlexAttention ``(q, k, v) -> out`` on ``layout``, its block mask built once."""
    from salad_bench.kernels.flex import flex_block_mask, flex_block_sparse_attention

    bm = flex_block_mask(layout)
    return lambda q, k, v: flex_block_sparse_attention(q, k, v, layout, block_mask=bm)


# ----------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------
def sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA pinned to its cuDNN backend (the dense headline on Hopper); Unsupported off CUDA."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if q.device.type != "cuda":
        raise Unsupported("SDPA's cuDNN backend needs a CUDA device")
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def dense_section(bench: Bench) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("dense baselines", flush=True)
    for method, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        def attn(q, k, v, _b=backend):
            with sdpa_kernel(_b):
                return F.scaled_dot_product_attention(q, k, v)

        if bench.device.type != "cuda":
            for p in ("fwd", "bwd", "fwd+bwd"):
                bench.skipped(method, str(backend), p, "needs a CUDA device")
            continue
        ms = bench.run_passes(method, method.split("_")[1], attn)
        for p, t in ms.items():
            if t:
                bench.baselines[(method, p)] = t
    try:
        from salad_bench.kernels.flex import flex_dense_attention

        bench.run_passes("flex_dense", "flex", flex_dense_attention)
    except Unsupported as exc:
        for p in ("fwd", "bwd", "fwd+bwd"):
            bench.skipped("flex_dense", "flex", p, str(exc))
    try:
        from salad_bench.kernels.fa4 import fa4_available

        ok, why = fa4_available()
        if not ok:
            for p in ("fwd", "bwd", "fwd+bwd"):
                bench.skipped("fa4_dense", "flash-attn-4", p, why)
    except ImportError as exc:
        bench.skipped("fa4_dense", "flash-attn-4", "fwd", f"salad_bench.kernels.fa4 missing: {exc}")


def sparse_section(bench: Bench, densities: list[float], passes=("fwd", "bwd", "fwd+bwd")) -> None:
    bq, bk = 128, 64
    for dens in densities:
        lay = random_layout(bench.b, bench.h, bench.n, bq, bk, dens, bench.device, seed=int(dens * 1000))
        real = lay.density()
        pairs = float(lay.kept_token_pairs())
        print(f"block-sparse density {dens} (measured {real:.4f})", flush=True)
        cfg = {"block_q": bq, "block_k": bk, "layout": "random+diagonal", "density_target": dens}
        bench.run_passes("triton_block_sparse", "triton", _ours(lay), density=real, pairs=pairs,
                         layout=lay, passes=passes, config=cfg)
        try:
            bench.run_passes("flex_block_sparse", "flex", _flex(lay), density=real, pairs=pairs,
                             layout=lay, passes=passes, config=cfg)
        except Exception as exc:  # mask construction failing
            for p in passes:
                bench.skipped("flex_block_sparse", "flex", p, f"{type(exc).__name__}: {exc}", real)
        del lay


def variants_section(bench: Bench, densities: list[float]) -> None:
    """Our forward at the ``densities`` (128 x 64 tiles) beside FlexAttention on the very same layout, then
    with 128 x 128 tiles (the tile FlexAttention's default block mask uses), ours and Flex."""
    for dens in densities:
        lay = random_layout(bench.b, bench.h, bench.n, 128, 64, dens, bench.device, seed=int(dens * 1000))
        real, pairs = lay.density(), float(lay.kept_token_pairs())
        bench.run_passes("triton_block_sparse", "triton", _ours(lay), density=real, pairs=pairs,
                         variant="default", layout=lay, passes=("fwd",), config={"block_q": 128, "block_k": 64})
        if dens < 1.0:  # FlexAttention on this very layout, so every variant has its same-mask ratio
            bench.run_passes("flex_block_sparse", "flex", _flex(lay), density=real, pairs=pairs,
                             variant="variants_layout", layout=lay, passes=("fwd",),
                             config={"block_q": 128, "block_k": 64})
    # 128 x 128 tiles (the tile FlexAttention's default block mask uses), forward, ours and Flex
    for dens in densities:
        if dens >= 1.0:
            continue
        lay = random_layout(bench.b, bench.h, bench.n, 128, 128, dens, bench.device, seed=7)
        real, pairs = lay.density(), float(lay.kept_token_pairs())
        cfg = {"block_q": 128, "block_k": 128}
        bench.run_passes("triton_block_sparse", "triton", _ours(lay), density=real, pairs=pairs,
                         variant="tiles128x128", layout=lay, passes=("fwd",), config=cfg)
        bench.run_passes("flex_block_sparse", "flex", _flex(lay), density=real, pairs=pairs,
                         variant="tiles128x128", layout=lay, passes=("fwd",), config=cfg)


def profile_section(bench: Bench) -> None:
    """Per-kernel device times (torch.profiler) of our kernels: launch overhead vs GPU time."""
    from salad_bench.kernels import block_sparse as bs
    from salad_bench.kernels.linear_attn import linear_attention_triton
    from salad_bench.kernels.rope import rope_3d_freqs
    from salad_bench.kernels.select_triton import select_topk_triton

    q, k, v, dout = bench.q, bench.k, bench.v, bench.dout
    grid = bench.grid
    cos, sin = rope_3d_freqs(grid, bench.d, bench.device)
    lay = random_layout(bench.b, bench.h, bench.n, 128, 64, 0.1, bench.device, seed=100)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    keep = keep_count(0.9, cdiv(bench.n, 64))

    def linear_fwd():
        return linear_attention_triton(q, k, v, "relu", cos, sin)

    items = {
        "select_topk": lambda: select_topk_triton(q, k, keep, 128, 64),
        "linear_fwd": linear_fwd,
        "linear_fwd_bwd": lambda: torch.autograd.grad(linear_attention_triton(qg, kg, vg, "relu", cos, sin),
                                                      (qg, kg, vg), dout),
        "sparse_fwd_bwd_d0.1": lambda: torch.autograd.grad(bs.block_sparse_attention_triton(qg, kg, vg, lay),
                                                           (qg, kg, vg), dout),
    }
    report = {}
    for name, fn in items.items():
        try:
            _profile_one(name, fn, report)
        except Exception as exc:
            print(f"  profile {name} failed: {exc!r}")
    (Path(bench.writer.run_dir) / "profile.json").write_text(json.dumps(report, indent=1))


def _profile_one(name: str, fn: Callable[[], Any], report: dict[str, Any]) -> None:
    """Device time per kernel over five calls of ``fn`` (after one warm-up), printed and kept in ``report``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        dev = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if dev:
            rows.append((evt.key[:70], evt.count, dev / max(evt.count, 1)))
    report[name] = rows
    for key, count, us in sorted(rows, key=lambda r: -r[1] * r[2]):
        print(f"  profile {name:<20} {key:<70} x{count:<3} {us:9.1f} us")


def autotune_choices() -> dict[str, str]:
    """What the autotuners picked, per key (printed; recorded in docs/lab/kernels-notes.md by hand)."""
    out = {}
    try:
        from salad_bench.kernels import block_sparse as bs

        for name, tuned in (("fwd", bs._fwd_tuned), ("dkdv", bs._dkdv_tuned), ("dq", bs._dq_tuned)):
            for key, cfg in getattr(tuned, "cache", {}).items():
                out[f"{name}{key}"] = str(cfg)
    except Exception as exc:  # reporting only
        out["error"] = repr(exc)
    return out


def video_topk_section(bench: Bench, sparsity: float = 0.9) -> None:
    """A top-k layout selected from video-like Q/K (structured, as in a real DiT)."""
    from salad_bench.kernels.select_triton import select_topk_triton

    try:
        from salad_bench.harness.workloads import Workload, make_qkv
    except ImportError as exc:
        bench.skipped("triton_block_sparse", "triton", "fwd", f"salad_bench.harness.workloads missing: {exc}", variant="video_topk")
        return
    grid = bench.grid
    wl = Workload("bench", grid, bench.h, bench.d, 1)
    q, k, _ = make_qkv(wl, kind="video", device=bench.device, dtype=bench.dtype)
    lay = select_topk_triton(q, k, keep_count(sparsity, cdiv(bench.n, 64)), 128, 64)
    del q, k
    real, pairs = lay.density(), float(lay.kept_token_pairs())
    print(f"video top-k layout (measured density {real:.4f})", flush=True)
    cfg = {"block_q": 128, "block_k": 64, "layout": "video_topk"}
    bench.run_passes("triton_block_sparse", "triton", _ours(lay), density=real, pairs=pairs,
                     variant="video_topk", layout=lay, passes=("fwd", "bwd"), config=cfg)
    bench.run_passes("flex_block_sparse", "flex", _flex(lay), density=real, pairs=pairs,
                     variant="video_topk", layout=lay, passes=("fwd", "bwd"), config=cfg)


def inputs_section(bench: Bench, rounds: int = 3, density: float = 0.1,
                   spreads: tuple[float, ...] = (5.0, 20.0, 80.0, 300.0)) -> None:
    """Does the forward's speed depend on the data? Our forward against cuDNN dense, in interleaved rounds,
    on: random Q/K with a random layout; the video-like workload and a Wan2.1 layer's Q/K (``wan``, needs
    diffusers) with the layout ``topk`` selects from them; and random Q/K scaled so the median row spans
    each of ``spreads`` nats."""

    from salad_bench.harness.workloads import Workload, make_qkv
    from salad_bench.kernels import block_sparse as bs
    from salad_bench.kernels.select_triton import select_topk_triton

    grid = bench.grid
    wl = Workload("bench", grid, bench.h, bench.d, 1)
    keep = keep_count(1.0 - density, cdiv(bench.n, 64))

    def spread_of(q, k) -> float:
        rows = q[0, 0, :: max(1, bench.n // 256)].float()
        sc = rows @ k[0, 0].float().T / math.sqrt(bench.d)
        return float((sc.max(-1).values - sc.min(-1).values).median())

    cases: list[tuple[str, Any, Any, Any, BlockLayout]] = []
    rnd = random_layout(bench.b, bench.h, bench.n, 128, 64, density, bench.device, seed=7)
    cases.append(("random", bench.q, bench.k, bench.v, rnd))
    for kind in ("video", "wan"):
        try:
            q, k, v = make_qkv(wl, kind=kind, device=bench.device, dtype=bench.dtype)
        except ImportError as exc:
            bench.skipped("triton_block_sparse", "triton", "fwd", f"--qkv {kind}: {exc}", variant=f"inputs_{kind}")
            continue
        cases.append((kind, q, k, v, lay := select_topk_triton(q, k, keep, 128, 64)))
        if kind == "video":  # the same, in the layout a Wan layer hands a method
            cases.append(("video_model_layout", *(model_layout(x) for x in (q, k, v)), lay))
    base = spread_of(bench.q, bench.k)
    for target in spreads:
        f = target / base
        cases.append((f"spread{int(target)}", bench.q * f, bench.k, bench.v, rnd))
    for r in range(rounds):
        for name, q, k, v, lay in cases:
            real, pairs = lay.density(), float(lay.kept_token_pairs())
            info = {"round": r, "input": name, "logit_spread": round(spread_of(q, k), 2)}

            bench.timed("sdpa_cudnn", "cudnn", "fwd", lambda q=q, k=k, v=v: sdpa_cudnn(q, k, v), variant=f"inputs_{name}_r{r}",
                        config={"inputs": name, "round": r}, extra=info)
            bench.timed("triton_block_sparse", "triton", "fwd",
                        lambda q=q, k=k, v=v, lay=lay: bs.block_sparse_attention_triton(q, k, v, lay),
                        density=real, pairs=pairs, variant=f"inputs_{name}_r{r}",
                        config={"inputs": name, "round": r, "block_q": 128, "block_k": 64}, extra=info)


def peers_section(bench: Bench, density: float = 0.1) -> None:
    """The peers' own kernels as reference backends, on the same inputs and mask as ours, outputs compared.

    ``vsa`` (FastVideo's ThunderKittens block-sparse kernel, 64x64 tiles, zero-padded to a multiple of
    64 with per-block valid lengths) against ours with the same 64x64 layout; ``st_attn`` (sliding tile
    attention) only takes fixed sequence shapes, which the row says. A wheel that does not load with
    this torch is a skipped row with the error."""
    from salad_bench.kernels import block_sparse as bs

    n, blk = bench.n, 64
    try:
        from vsa import block_sparse_attn as vsa_attn
        if vsa_attn is None:
            raise ImportError("vsa exposes no block_sparse_attn on this card")
    except Exception as exc:  # noqa: BLE001 - a compiled wheel can fail in many ways
        bench.skipped("vsa_block_sparse", "vsa", "fwd", f"the vsa wheel does not load here: {type(exc).__name__}: {exc}",
                      density=density, variant="peers")
    else:
        mb = cdiv(n, blk)
        lay = random_layout(bench.b, bench.h, n, blk, blk, density, bench.device, seed=11)
        block_map = torch.zeros(bench.b, bench.h, mb, mb, dtype=torch.bool, device=bench.device)
        cols = torch.arange(lay.kv_idx.shape[-1], device=bench.device)
        valid = cols[None, None, None, :] < lay.kv_cnt[..., None]
        idx = torch.where(valid, lay.kv_idx.long(), 0)
        block_map.scatter_(-1, idx, valid)
        pad = mb * blk - n
        qp, kp, vp = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (bench.q, bench.k, bench.v))
        sizes = torch.full((mb,), blk, dtype=torch.int32, device=bench.device)
        sizes[-1] = n - (mb - 1) * blk
        real, pairs = lay.density(), float(lay.kept_token_pairs())
        cfg = {"block_q": blk, "block_k": blk, "layout": "random", "peer": "vsa"}

        def theirs():
            return vsa_attn(qp, kp, vp, block_map, sizes)[0]

        def ours():
            return bs.block_sparse_attention_triton(bench.q, bench.k, bench.v, lay)

        try:
            err = rel_l2(theirs()[:, :, :n], ours())
        except Exception as exc:  # noqa: BLE001
            bench.skipped("vsa_block_sparse", "vsa", "fwd", f"vsa failed on these inputs: {type(exc).__name__}: {exc}",
                          density=real, variant="peers", status="error")
        else:
            bench.timed("vsa_block_sparse", "vsa", "fwd", theirs, density=real, pairs=pairs, variant="peers",
                        config=cfg, extra={"rel_l2_vs_ours": err})
            bench.timed("triton_block_sparse", "triton", "fwd", ours, density=real, pairs=pairs, variant="peers",
                        config={**cfg, "peer": "ours"})
    try:
        import st_attn  # noqa: F401

        reason = ("st-attn's kernel takes only fixed sequence shapes (HunyuanVideo 30x48x80, Wan 18x48x80 = 69,120 "
                  f"tokens, StepVideo 36x48x48); this workload has {n:,} tokens")
    except Exception as exc:  # noqa: BLE001
        reason = f"the st-attn wheel does not load here: {type(exc).__name__}: {exc}"
    bench.skipped("st_attn", "st_attn", "fwd", reason, density=density, variant="peers")


def _gpu_state(device: torch.device) -> dict[str, Any]:
    """SM clock (MHz), temperature (C) and power (W) of the card now, from nvidia-smi (empty if absent)."""
    import subprocess

    try:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if visible and visible.split(",")[idx].strip().isdigit():
            idx = int(visible.split(",")[idx])
        out = subprocess.run(["nvidia-smi", f"--id={idx}", "--query-gpu=clocks.sm,temperature.gpu,power.draw",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        clock, temp, power = (float(x) for x in out.strip().split(","))
        return {"sm_clock_mhz": clock, "temp_c": temp, "power_w": power}
    except Exception:  # no nvidia-smi, no permission, odd output: the rows go without it
        return {}


def headline_section(bench: Bench, rounds: int = 5, density: float = 0.1) -> None:
    """The issue's headline ratios, measured in interleaved rounds on one layout.

    One timing of a ~1 ms kernel moves by several per cent with the card's clock and temperature (the
    same kernel and layout measured 1.24 and 1.33 ms in one run), more than the margins the targets
    leave. So each round times cuDNN dense, ours and FlexAttention on the same mask (and the linear
    branch and the selector), back to back, and the ratios are taken per round: drift between rounds
    cancels, and the spread over rounds is reported with the median."""

    from salad_bench.kernels import block_sparse as bs
    from salad_bench.kernels.flex import flex_block_mask, flex_block_sparse_attention
    from salad_bench.kernels.linear_attn import linear_attention_triton
    from salad_bench.kernels.rope import rope_3d_freqs
    from salad_bench.kernels.select_triton import select_topk_triton

    q, k, v = bench.q, bench.k, bench.v
    lay = random_layout(bench.b, bench.h, bench.n, 128, 64, density, bench.device, seed=int(density * 1000))
    real, pairs = lay.density(), float(lay.kept_token_pairs())
    bm = flex_block_mask(lay)
    grid = bench.grid
    cos, sin = rope_3d_freqs(grid, bench.d, bench.device)
    keep = keep_count(1.0 - density, cdiv(bench.n, 64))

    def cudnn():
        return sdpa_cudnn(q, k, v)

    def ours():
        return bs.block_sparse_attention_triton(q, k, v, lay)

    calls = {  # name: (call, density, kept pairs, attention FLOPs?)
        "sdpa_cudnn": (cudnn, 1.0, None, True),
        "triton_block_sparse": (ours, real, pairs, True),
        "flex_block_sparse": (lambda: flex_block_sparse_attention(q, k, v, lay, block_mask=bm), real, pairs, True),
        "linear_triton": (lambda: linear_attention_triton(q, k, v, "relu", cos, sin), 1.0, None, False),
        "select_topk_triton": (lambda: select_topk_triton(q, k, keep, 128, 64), density, None, False),
    }
    print(f"headline: {rounds} interleaved rounds at density {real:.4f}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        state = _gpu_state(bench.device)
        for name, (fn, dens, prs, attention) in calls.items():
            backend = "cudnn" if name == "sdpa_cudnn" else "flex" if name.startswith("flex") else "triton"
            row = bench.timed(name, backend, "fwd", fn, density=dens, pairs=prs, variant=f"headline_r{r}",
                              attention=attention,
                              config={"headline": True, "round": r, "block_q": 128, "block_k": 64,
                                      "density_target": density},
                              extra={"round": r, **state})
            times[name].append(row["ms"] if row and row.get("status") == "ok" else float("nan"))
    per_round = {name: dict(enumerate(vals)) for name, vals in times.items()}
    ratios = {
        "ours vs cuDNN dense": round_ratios(per_round, "sdpa_cudnn", "triton_block_sparse"),
        "ours vs Flex same mask": round_ratios(per_round, "flex_block_sparse", "triton_block_sparse"),
    }
    summary = {name: statistics.median(v) for name, v in {**times, **ratios}.items() if v}
    for name, vals in {**times, **ratios}.items():
        if not vals:
            continue
        unit = "x" if name in ratios else "ms"
        print(f"headline {name:<24} median {summary[name]:.3f} {unit}  rounds: "
              + " ".join(f"{x:.3f}" for x in vals), flush=True)
    (Path(bench.writer.run_dir) / "headline.json").write_text(json.dumps(
        {"rounds": rounds, "density": real, "times_ms": times, "ratios": ratios, "median": summary},
        indent=1))


def selection_section(bench: Bench, density: float = 0.1) -> None:
    from salad_bench.kernels import select_triton as st
    from salad_bench.kernels import selection as sel

    q, k = bench.q, bench.k
    n, bq, bk = bench.n, 128, 64
    keep = keep_count(1.0 - density, cdiv(n, bk))
    print(f"selection (keep {keep} of {cdiv(n, bk)} key blocks)", flush=True)
    force = sel.diagonal_blocks(n, bq, bk, bench.device)

    def torch_topk():
        return sel.topk_layout(sel.block_scores(q, k, bq, bk), keep, n, bq, bk, force)

    want = torch_topk().to_dense()

    def agreement() -> float:  # share of tiles where the Triton selector keeps what the torch rule keeps
        return float((st.select_topk_triton(q, k, keep, bq, bk).to_dense() == want).float().mean())

    cfg = {"block_q": bq, "block_k": bk, "keep": keep}
    paths = (
        ("select_topk_triton", lambda: st.select_topk_triton(q, k, keep, bq, bk), {"tile_agreement": agreement()}),
        ("select_topk_torch", torch_topk, {}),
        ("select_topp_triton", lambda: st.select_topp_triton(q, k, 0.9, bq, bk), {"mass": 0.9}),
        ("select_topp_torch", lambda: sel.topp_layout(sel.block_scores(q, k, bq, bk), 0.9, n, bq, bk, force), {"mass": 0.9}),
        ("pool_scores_triton", lambda: st.block_scores_triton(q, k, bq, bk), {}),
    )
    for method, fn, extra in paths:
        bench.timed(method, method.rsplit("_", 1)[1], "fwd", fn, density=density, config=cfg, extra=extra,
                    attention=False)
    tf32 = torch.backends.cuda.matmul
    # the pooled-score matmul on TF32 tensor cores (off by default in torch): time and agreement
    with _patched(tf32, allow_tf32=True):
        extra = {"tile_agreement": agreement()}
        for method, fn in (("select_topk_triton", paths[0][1]), ("pool_scores_triton", paths[4][1])):
            bench.timed(method, "triton", "fwd", fn, density=density, variant="tf32_scores",
                        config={**cfg, "tf32": True}, attention=False, extra=extra)
    # pooling alone (the bandwidth-bound part: Q and K read once), ours and torch
    want_pool = sel.pool_blocks(q, bq)
    err = float((st._pool(q, None, bq, bq)[0] - want_pool).abs().max())
    bench.timed("pool_triton", "triton", "fwd", lambda: st._pool(q, k, bq, bk), density=density, config=cfg,
                attention=False, extra={"bytes_read": 2 * q.numel() * q.element_size(), "max_abs_err": err})
    bench.timed("pool_torch", "torch", "fwd", lambda: (_pool_torch(q, bq), _pool_torch(k, bk)), density=density,
                config=cfg, attention=False)
    # The Triton paths replayed from a CUDA graph: device time without the host's launch gaps. Timed
    # alone, three short launches (~0.1 ms of work) can be bound by Python launch overhead; inside a
    # model forward the host runs ahead of the GPU and those gaps are hidden.
    gcfg = {**cfg, "cuda_graph": True}
    for method, fn, _ in paths:
        if not method.endswith("_triton"):
            continue
        try:
            replay = cuda_graph(fn)
        except Unsupported as exc:
            bench.skipped(method, "triton", "fwd", str(exc), density, "cuda_graph", config=gcfg)
            continue
        except Exception as exc:  # capture can fail (a host sync inside fn): say so, go on
            bench.skipped(method, "triton", "fwd", f"CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:200]}",
                          density, "cuda_graph", status="error", config=gcfg)
            continue
        bench.timed(method, "triton", "fwd", replay, density=density, variant="cuda_graph", config=gcfg,
                    attention=False)


@contextlib.contextmanager
def _patched(obj: Any, **attrs: Any):
    """Set attributes of ``obj`` (torch flags) for the block, then put the old values back."""
    saved = {key: getattr(obj, key) for key in attrs}
    for key, val in attrs.items():
        setattr(obj, key, val)
    try:
        yield
    finally:
        for key, val in saved.items():
            setattr(obj, key, val)


def _pool_torch(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block means with torch reductions (whole blocks, then the ragged tail), fp32."""
    n = x.shape[2]
    whole = n // block * block
    parts = [x[:, :, :whole].unflatten(2, (n // block, block)).mean(3, dtype=torch.float32)]
    if whole < n:
        parts.append(x[:, :, whole:].mean(2, keepdim=True, dtype=torch.float32))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph (after three warm-up calls on a side stream); returns replay."""
    if not torch.cuda.is_available():
        raise Unsupported("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def linear_section(bench: Bench) -> None:
    from salad_bench.kernels.linear_attn import linear_attention_triton
    from salad_bench.kernels.reference import linear_attention_ref
    from salad_bench.kernels.rope import rope_3d_freqs

    grid = bench.grid
    cos, sin = rope_3d_freqs(grid, bench.d, bench.device)
    q, k, v, dout = bench.q, bench.k, bench.v, bench.dout
    print("linear branch (relu, RoPE)", flush=True)
    hs = min(REF_HEADS, bench.h)
    xs = [x[:, :hs].float().requires_grad_() for x in (q, k, v)]
    ref = linear_attention_ref(*xs, "relu", cos, sin)
    ref_g = torch.autograd.grad(ref, xs, dout[:, :hs].float())
    acc: dict[str, Any] = {}
    try:
        ys = [x[:, :hs].clone().requires_grad_() for x in (q, k, v)]
        out = linear_attention_triton(*ys, "relu", cos, sin)
        got = torch.autograd.grad(out, ys, dout[:, :hs])
        acc = {"rel_l2": rel_l2(out, ref), **{f"rel_l2_d{n}": rel_l2(g, r) for n, g, r in zip("qkv", got, ref_g, strict=True)}}
        torch_same = linear_attention_ref(*[x[:, :hs] for x in (q, k, v)], "relu", cos, sin)
        acc["rel_l2_torch_same_dtype"] = rel_l2(torch_same, ref)
    except Unsupported as exc:
        for p in ("fwd", "fwd+bwd"):
            bench.skipped("linear_triton", "triton", p, str(exc))
        return
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    cfg = {"kind": "relu", "rope": True}
    for method, fn in (("linear_triton", linear_attention_triton), ("linear_torch", linear_attention_ref)):
        extra = acc if method == "linear_triton" else {}
        for p, call in (
            ("fwd", lambda fn=fn: fn(q, k, v, "relu", cos, sin)),
            ("fwd+bwd", lambda fn=fn: torch.autograd.grad(fn(qg, kg, vg, "relu", cos, sin), (qg, kg, vg), dout)),
        ):
            bench.timed(method, method.split("_")[1], p, call, config=cfg, extra=extra, attention=False)
    # the same inputs in the layout a Wan layer hands a method: (B, H, N, D) views of token-major buffers
    qm, km, vm = (model_layout(x) for x in (q, k, v))
    bench.timed("linear_triton", "triton", "fwd", lambda: linear_attention_triton(qm, km, vm, "relu", cos, sin),
                variant="model_layout", config={**cfg, "layout": "model"}, attention=False)


# ----------------------------------------------------------------------------------------------------
# table and targets
# ----------------------------------------------------------------------------------------------------
def _f(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and x is not None and not (isinstance(x, float) and math.isnan(x)) else "-"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| method | variant | density | pass | ms | TF/s exec | TF/s dense-eq | x cuDNN | x FA2 | rel_l2 | status |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r.get('variant', '')} | {_f(r.get('density'), '.3f')} | {r.get('pass', '')} | "
            f"{_f(r.get('ms'), '.3f')} | {_f(r.get('tflops_executed'), '.0f')} | {_f(r.get('tflops_dense_equiv'), '.0f')} | "
            f"{_f(r.get('speedup_vs_cudnn'), '.2f')} | {_f(r.get('speedup_vs_fa2'), '.2f')} | {_f(r.get('rel_l2'), '.1e')} | "
            f"{r.get('status', '')} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    def pick(method, pass_, dens=None, variant=""):
        for r in rows:
            if r["method"] == method and r.get("pass") == pass_ and r.get("variant", "") == variant and r.get("status") == "ok":
                if dens is None or abs(r.get("sparsity_target", -1) - (1 - dens)) < 1e-6:
                    return r
        return None

    out = []
    f10 = pick("triton_block_sparse", "fwd", 0.1)
    flex10 = pick("flex_block_sparse", "fwd", 0.1)
    if f10:
        out.append(f"fwd d=0.10: {f10['ms']:.3f} ms (target <= 1.3), x cuDNN {_f(f10.get('speedup_vs_cudnn'), '.2f')} "
                   f"(>= 8.5), x Flex same mask {_f(flex10['ms'] / f10['ms'] if flex10 else None, '.2f')} (>= 1.4)")
    f1, flexd = pick("triton_block_sparse", "fwd", 1.0), pick("flex_dense", "fwd")
    if f1 and flexd:
        out.append(f"fwd d=1.00: {f1['ms']:.3f} ms = {flexd['ms'] / f1['ms'] * 100:.0f}% of Flex dense throughput (>= 90%)")
    b10 = pick("triton_block_sparse", "bwd", 0.1)
    dense_b = [r["ms"] for m in ("sdpa_cudnn", "sdpa_flash", "flex_dense") if (r := pick(m, "bwd"))]
    if b10 and dense_b:
        out.append(f"bwd d=0.10: {b10['ms']:.3f} ms, {min(dense_b) / b10['ms']:.2f}x the fastest dense bwd (>= 5)")
    s = pick("select_topk_triton", "fwd", 0.1)
    sg = pick("select_topk_triton", "fwd", 0.1, variant="cuda_graph")
    if s:
        graphed = f"; from a CUDA graph {sg['ms']:.3f} ms" if sg else ""
        out.append(f"selection top-k d=0.10: {s['ms']:.3f} ms eager{graphed} (target <= 0.1)")
    lin = pick("linear_triton", "fwd")
    if lin:
        out.append(f"linear fwd: {lin['ms']:.3f} ms (target <= 0.15)")
    out.extend(headline_targets(rows))
    return out


def headline_targets(rows: list[dict[str, Any]]) -> list[str]:
    """Medians (and ranges) over the headline section's interleaved rounds, ratios taken per round."""
    times = headline_times(rows)
    if not times:
        return []

    def med(vals: list[float], fmt: str) -> str:
        return f"{statistics.median(vals):{fmt}} [{min(vals):{fmt}}-{max(vals):{fmt}}]" if vals else "-"

    def ms(name: str) -> list[float]:
        return list(times.get(name, {}).values())

    n_rounds = len({r for per in times.values() for r in per})
    return [
        f"headline, {n_rounds} interleaved rounds, median [range]: fwd d=0.10 {med(ms('triton_block_sparse'), '.3f')} ms "
        f"(<= 1.3), x cuDNN {med(round_ratios(times, 'sdpa_cudnn', 'triton_block_sparse'), '.2f')} (>= 8.5), "
        f"x Flex same mask {med(round_ratios(times, 'flex_block_sparse', 'triton_block_sparse'), '.2f')} (>= 1.4)",
        f"headline: linear fwd {med(ms('linear_triton'), '.3f')} ms (<= 0.15), "
        f"selection top-k {med(ms('select_topk_triton'), '.3f')} ms (<= 0.1)",
    ]


# ----------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _at_least_one(what: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= 1 (argparse names the flag; the message names the value and a fix)."""

    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            val = 0
        if val < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1; give {what}")
        return val

    return parse


def _densities(text: str) -> list[float]:
    """An argparse type: comma-separated densities (the share of key blocks kept), each in (0, 1]."""
    fix = "give comma-separated densities in (0, 1] (1.0 is dense), e.g. 1.0,0.5,0.1"
    vals = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        try:
            val = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number; {fix}") from None
        if not 0.0 < val <= 1.0:  # NaN fails too
            raise argparse.ArgumentTypeError(f"density {part} is outside (0, 1]; {fix}")
        vals.append(val)
    if not vals:
        raise argparse.ArgumentTypeError(f"no density in {text!r}; {fix}")
    return vals


def _sections(text: str) -> list[str]:
    """An argparse type: a comma list of :data:`SECTIONS`."""
    from salad_bench.methods.registry import close_names

    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in SECTIONS:
            close = close_names(name, SECTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise argparse.ArgumentTypeError(f"unknown section {name!r}{hint}; choose from {','.join(SECTIONS)}")
    if not names:
        raise argparse.ArgumentTypeError(f"no section in {text!r}; choose one or more of {','.join(SECTIONS)}")
    return names


def build_parser(prog: str = "salad-bench kernels") -> argparse.ArgumentParser:

    p = Parser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/kernels/latest", help="run directory for rows.jsonl")
    p.add_argument("--densities", type=_densities, default="1.0,0.5,0.25,0.1,0.05",
                   help="block densities of the sparse section, each in (0, 1] (default 1.0,0.5,0.25,0.1,0.05)")
    p.add_argument("--workload", default="wan2.1-1.3b-480p", help="attention workload preset (salad-bench list)")
    p.add_argument("--n", type=_at_least_one("the number of tokens, e.g. --n 256 for a CPU smoke run"), default=None,
                   help="override: a flat grid of N tokens (CPU smoke runs; without a GPU the Wan shape needs it)")
    p.add_argument("--heads", type=_at_least_one("the number of heads, e.g. --heads 1"), default=None,
                   help="override: the number of heads")
    p.add_argument("--quick", action="store_true", help="shorter timing budget")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="bf16 on GPUs; fp32/fp16 for a CPU smoke run under TRITON_INTERPRET=1")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sections", type=_sections, default=DEFAULT_SECTIONS,
                   help=f"comma list of {','.join(SECTIONS)} (default {DEFAULT_SECTIONS})")
    p.add_argument("--variant-densities", type=_densities, default="0.1,1.0",
                   help="densities of the variants section, each in (0, 1]")
    p.add_argument("--rounds", type=_at_least_one("the number of rounds, e.g. --rounds 5"), default=5,
                   help="interleaved rounds of the headline section")
    return p


def check_device(args: argparse.Namespace) -> None:
    """Refuse, before anything is measured, a workload too large for a machine without CUDA (no ``--n``)."""
    from salad_bench.harness.workloads import get_workload

    wl = get_workload(args.workload)  # an unknown name is refused here too
    if torch.cuda.is_available() or args.n is not None or wl.n <= CPU_MAX_N:
        return
    heads = wl.heads if args.heads is None else args.heads
    gb = 4.0 * heads * wl.n * wl.n / 1e9
    raise BadInput(
        f"salad-bench kernels times kernels on a GPU and this machine has none; {wl.name} is {wl.n:,} tokens x "
        f"{heads} heads (~{gb:.0f} GB of fp32 scores per dense attention), too large for the CPU; run it on the GPU "
        f"machine, or pass a small size for a CPU smoke run: {SMOKE} (TRITON_INTERPRET=1 runs the Triton kernels)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad value (2, one line): a code, not an exception
        return int(exc.code or 0)
    check_writable_dir(args.out)
    check_device(args)
    try:  # compiled flex backward donates buffers, which forbids timing the backward with retain_graph
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    except (ImportError, AttributeError):
        pass
    bench = Bench(args)
    sections, densities = set(args.sections), args.densities
    if bench.device.type != "cuda":
        print("warning: no CUDA device; a CPU smoke run (Triton kernels need TRITON_INTERPRET=1)", file=sys.stderr)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("dense", lambda: dense_section(bench)),
        ("sparse", lambda: sparse_section(bench, densities)),
        ("selection", lambda: selection_section(bench)),
        ("linear", lambda: linear_section(bench)),
        ("video", lambda: video_topk_section(bench)),
        ("variants", lambda: variants_section(bench, args.variant_densities)),
        ("profile", lambda: profile_section(bench)),
        ("headline", lambda: headline_section(bench, rounds=args.rounds)),
        ("inputs", lambda: inputs_section(bench, rounds=max(1, min(args.rounds, 3)))),
        ("peers", lambda: peers_section(bench)),
    ]
    for name, step in steps:
        if name not in sections:
            continue
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the section becomes a row with its reason; the sweep goes on
            why = failure(exc)
            said = "skipped" if why["status"] == "skipped" else "failed"
            print(f"section {name} {said}: {_one_line(why['reason'])}", file=sys.stderr)
            bench.skipped(f"section:{name}", "", "", **why)
    print()
    print(f"card: {bench.writer.provenance['card']}, torch {torch.__version__}, rows in {bench.writer.path}")
    for key, cfg in autotune_choices().items():
        print("autotune:", key, "->", cfg)
    for line in targets(bench.rows):
        print("target:", line)
    print()
    print(markdown_table(bench.rows))
    return 0


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    raise SystemExit(guarded(main))
