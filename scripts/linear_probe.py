"""Where the linear branch's host and device time go at Wan 480p (relu, bf16): a diagnostic.

Part 1, per input variant (RoPE tables in fp32, in fp16, or no RoPE): the benchmark's timing (do_bench),
graph replay, host time per call and the kernels' device times (torch.profiler).
Part 2, host time per call of each piece of one eager forward (no synchronisation, mean of 200 calls).

    python3 scripts/linear_probe.py [--out FILE.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `kernels`

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from salad_bench.harness.bench_kernels import _updated  # noqa: E402
from salad_bench.kernels import linear_attn as la  # noqa: E402
from salad_bench.kernels.rope import rope_3d_freqs  # noqa: E402


def host_us(fn, n: int = 100, batches: int = 5) -> float:
    """Host time per call: the least mean over ``batches`` batches of ``n`` calls (the host is noisy)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return best


def device(fn) -> dict:
    fn()
    torch.cuda.synchronize()
    bench_ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph_ms = do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    kernels = {e.key[:60]: round(e.device_time_total / e.count, 1) for e in prof.key_averages() if e.device_time_total > 0}
    return {"do_bench_us": round(bench_ms * 1e3, 1), "graph_us": round(graph_ms * 1e3, 1),
            "host_us": round(host_us(fn), 1), "kernels_us": kernels, "kernel_sum_us": round(sum(kernels.values()), 1)}


def _gluon_launch_pieces(lg, q, k, v, state, cs, sn, nsplit, chunk) -> dict:
    """The host-side steps of one Gluon output-pass launch (kernels.launch), each alone."""
    from triton.backends.nvidia import driver as nv

    from salad_bench.kernels import launch as L

    b, h, n, d = q.shape
    out = torch.empty_like(q)
    q_desc = lg._rows_desc(q)
    c_desc, s_desc = lg._table_descs(cs, sn)
    args = (q_desc, c_desc, s_desc, q_desc, out, state, out.stride(0), out.stride(1), out.stride(2), h, n, chunk,
            1e-6 / n, 1.0 / n)
    consts = dict(D=d, KIND=0, ROPE=True, STAGES=3, OUT_TMA=False,
                  st_layout=lg._layout((d // 2, d), lg.gl.float16), r_layout=lg._layout((lg.BLOCK, d // 2), lg.gl.float16),
                  num_warps=8)
    grid = (nsplit, b * h)
    before = len(L._COMPILED)
    for _ in range(3):
        L.launch(lg._out_kernel, grid, args, consts)
    torch.cuda.synchronize()
    print(f"launch cache: {before} -> {len(L._COMPILED)} entries after 3 launches", flush=True)
    part = torch.empty((12, 11, d * d + d), dtype=torch.float32, device=q.device)
    kv_args = (lg._rows_desc(k), lg._rows_desc(v), c_desc, s_desc, part, h, n, 3008)
    kv_consts = dict(D=d, KIND=0, ROPE=True, STAGES=3, r_layout=lg._layout((lg.BLOCK, d), lg.gl.bfloat16),
                     num_warps=8)
    before = len(L._COMPILED)
    for _ in range(3):
        L.launch(lg._state_kernel, (11, b * h), kv_args, kv_consts)
    torch.cuda.synchronize()
    print(f"launch cache (K/V pass): {before} -> {len(L._COMPILED)} entries after 3 launches", flush=True)
    key = L._key(lg._out_kernel, args, consts, {})
    hit = L._COMPILED[key]
    meta = hit[0].metadata.tensordesc_meta
    print(f"tensordesc_meta: {meta}", flush=True)
    return {
        "launch._spec(q_desc)": lambda: L._spec(q_desc),
        "launch._spec(tensor)": lambda: L._spec(q),
        "launch._key (out pass)": lambda: L._key(lg._out_kernel, args, consts, {}),
        "launch._run (out pass)": lambda: L._run(hit, grid, args),
        "launch (out pass)": lambda: L.launch(lg._out_kernel, grid, args, consts),
        "kernel[grid] (out pass)": lambda: lg._out_kernel[grid](*args, **consts),
        "make_tensordesc_arg(q_desc)": lambda: nv.make_tensordesc_arg(q_desc, meta[0] if meta else None),
        "launch._stream()": L._stream,
        "torch.empty_like(q)": lambda: torch.empty_like(q),
        "gluon state_pass_gluon": lambda: lg.state_pass_gluon(k, v, cs, sn, True, 0, 11, 3008, 8, 3),
        "torch.empty part (12, 11, D*D+D)": lambda: torch.empty((12, 11, d * d + d), dtype=torch.float32, device=q.device),
        "launch (K/V pass)": lambda: L.launch(lg._state_kernel, (11, b * h), kv_args, kv_consts),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="")
    p.add_argument("--parts", default="inputs,host")
    p.add_argument("--variants", default="", help="comma list of part 1's variants (default all)")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 32760, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    cos, sin = rope_3d_freqs((21, 30, 52), 128, "cuda")
    rows: dict = {}
    if "inputs" in args.parts:
        fp32, fp16, none = (cos, sin), (cos.half(), sin.half()), (None, None)
        g8 = {"num_warps": 8, "stages": 3, "programs_per_sm": 1}
        variants = {  # name: (tables, linear_attn OPTIONS)
            "fp32 tables": (fp32, {}), "triton out": (fp32, {"out_gluon": False}), "fp16 tables": (fp16, {}), "no rope": (none, {}),
            "gluon w4": (fp32, {"out_gluon": True}), "gluon w8": (fp32, {"out_gluon": True, "out_gluon_cfg": g8}),
            "gluon w8 s2": (fp32, {"out_gluon": True, "out_gluon_cfg": {**g8, "stages": 2}}),
            "gluon w8 fp16 tables": (fp16, {"out_gluon": True, "out_gluon_cfg": g8}),
            "gluon w8 no rope": (none, {"out_gluon": True, "out_gluon_cfg": g8}),
            "gluon both": (fp32, {"out_gluon": True, "state_gluon": True}),
            "gluon both out w8": (fp32, {"out_gluon": True, "state_gluon": True, "out_gluon_cfg": g8}),
            "gluon both s2": (fp32, {"out_gluon": True, "state_gluon": True, "state_gluon_cfg": {**g8, "stages": 2}}),
            "gluon both no rope": (none, {"out_gluon": True, "state_gluon": True}),
            "gluon both fp16 tables": (fp16, {"out_gluon": True, "state_gluon": True}),
        }
        variants["all triton"] = (fp32, {"out_gluon": False, "state_gluon": False})
        # the output pass's epilogue (a TMA store), and both passes in Gluon
        variants["out tma"] = (fp32, {"out_gluon_cfg": {**g8, "out_tma": True}})
        variants["both"] = (fp32, {"state_gluon": True, "out_gluon_cfg": g8})
        variants["both out tma"] = (fp32, {"state_gluon": True, "out_gluon_cfg": {**g8, "out_tma": True}})
        variants["both out tma no rope"] = (none, {"state_gluon": True, "out_gluon_cfg": {**g8, "out_tma": True}})
        only = [x for x in args.variants.split(",") if x]
        base = {}
        for name, (tables, opts) in variants.items():
            if only and name not in only:
                continue
            try:
                with _updated(la.OPTIONS, opts):
                    out = la.linear_attention_triton(q, k, v, "relu", *tables)
                    key = "none" if tables[0] is None else str(tables[0].dtype)
                    if key not in base:
                        base[key] = out
                    diff = ((out.float() - base[key].float()).norm() / base[key].float().norm()).item()
                    rows[name] = r = device(lambda t=tables: la.linear_attention_triton(q, k, v, "relu", *t))
                    r["repeat_identical"] = torch.equal(la.linear_attention_triton(q, k, v, "relu", *tables), out)
                r["rel_diff_vs_first_same_tables"] = diff
                print(f"{name:<22} do_bench {r['do_bench_us']:6.1f}  graph {r['graph_us']:6.1f}  host {r['host_us']:6.1f}"
                      f"  kernels {r['kernel_sum_us']:6.1f}  diff {diff:.1e} same {r['repeat_identical']}  {r['kernels_us']}", flush=True)
            except Exception as exc:  # a diagnostic: report and go on
                print(f"{name}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    if "host" in args.parts:
        qp, kp, vp, cs, sn, rope, kind = la._prepare(q, k, v, "relu", cos, sin)
        part = torch.empty((12, 22, 128 * 128 + 128), dtype=torch.float32, device="cuda")
        state = part.sum(1)
        b, h, n, d = q.shape
        nsplit, chunk = la._chunks(n, b * h, q.device)
        modes = la._modes(q.dtype)
        out = torch.empty_like(q)
        pieces = {
            "torch.empty (B,H,N,D)": lambda: torch.empty((b, h, n, d), dtype=q.dtype, device=q.device),
            "part.sum(1)": lambda: part.sum(1),
            "_prepare": lambda: la._prepare(q, k, v, "relu", cos, sin),
            "_chunks": lambda: la._chunks(n, b * h, q.device),
            "_launch K/V pass": lambda: la._launch(
                la._fwd_state_kernel, (nsplit, b * h), (k, v, cs, sn, part, *la._strides(k), *la._strides(v), h, n, chunk),
                dict(D=d, KIND=0, ROPE=True, NATIVE_MODE=modes["NATIVE_MODE"], STATE_SPLIT=False, USE_TMA=False),
                la.OPTIONS["state"]),
            "_launch Q pass": lambda: la._launch(
                la._fwd_out_kernel, (nsplit, b * h),
                (q, out, cs, sn, state, *la._strides(q), *la._strides(out), h, n, chunk, 1e-6 / n, 1.0 / n),
                dict(D=d, KIND=0, ROPE=True, F32_MODE=modes["F32_MODE"], F32_SPLIT=False, USE_TMA=False), la.OPTIONS["out"]),
            "_state_pass": lambda: la._state_pass(k, v, 0, cs, sn, True),
            "_forward (no autograd)": lambda: la._forward(qp, kp, vp, 0, cs, sn, True, 1e-6),
            "linear_attention_triton": lambda: la.linear_attention_triton(q, k, v, "relu", cos, sin),
        }
        try:  # the Gluon output pass's host-side pieces (sm_90)
            from salad_bench.kernels import linear_gluon as lg

            cfg = la.OPTIONS["out_gluon_cfg"]
            pieces |= {
                "gluon _rows_desc(q)": lambda: lg._rows_desc(q),
                "gluon _table_descs (cached)": lambda: lg._table_descs(cs, sn),
                "gluon out_pass_gluon": lambda: lg.out_pass_gluon(q, state, cs, sn, True, 0, 1e-6, nsplit, chunk,
                                                                  cfg["num_warps"], cfg["stages"], cfg.get("out_tma", False)),
            }
            pieces |= _gluon_launch_pieces(lg, q, k, v, state, cs, sn, nsplit, chunk)
        except ImportError as exc:
            print(f"no Gluon pieces: {exc}")
        rows["host_us"] = {}
        for name, fn in pieces.items():
            rows["host_us"][name] = round(host_us(fn), 1)
            print(f"host {name:<26} {rows['host_us'][name]:7.1f} us", flush=True)
    if "cprofile" in args.parts:  # where one eager call's host time goes, per Python function
        import cProfile
        import pstats

        with _updated(la.OPTIONS, {}):  # the defaults
            fn = lambda: la.linear_attention_triton(q, k, v, "relu", cos, sin)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                fn()
            prof.disable()
            torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
