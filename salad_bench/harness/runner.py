"""The sweep: workloads x methods x sparsities, one row appended per measured cell.

For each Q/K/V workload the runner first times every dense backend present (the ``full_*``
variants) so that each method's speedup is over the fastest dense backend *measured in the same
process on the same card*, and over FA2 (SDPA's flash backend) beside it. A cell that cannot run
becomes a ``skipped`` row (with the reason) or an ``error`` row (out of memory, NaN output, an
exception) and the sweep goes on. ``dit:`` workloads are handed to :mod:`harness.dit`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salad_bench.harness.accuracy import compare, reference_attention
from salad_bench.harness.flops import BACKWARD_FACTOR, dense_flops, mfu, tflops
from salad_bench.harness.results import RowWriter, config_hash
from salad_bench.harness.timing import measure, peak_memory_gib
from salad_bench.harness.workloads import DTYPES, Workload, get_workload, make_qkv
from salad_bench.kernels import execution_paths
from salad_bench.methods import METHODS, AttentionMethod, AttnContext, Unsupported, create_method

__all__ = ["RunSpec", "run", "check_device", "make_spec", "dense_baselines", "sweeps_sparsity", "validate_spec"]



def dense_baselines() -> list[str]:
    """Dense backends timed for every Q/K/V workload (registry trait ``dense_baseline``); the fastest
    that runs is the speedup baseline."""
    return METHODS.with_trait("dense_baseline")


def _fa2() -> str | None:
    names = METHODS.with_trait("fa2")
    return names[0] if names else None


def sweeps_sparsity(name: str) -> bool:
    """Dense methods (trait ``dense``) are measured once, not at every target sparsity."""
    return "dense" not in METHODS.get(name).traits


@dataclass
class RunSpec:
    methods: list[str]
    workloads: list[str]
    sparsities: list[float]
    device: str = "cpu"
    dtype: str = "bf16"
    out: Path = Path("runs/latest")
    resume: bool = False
    qkv: str = "video"
    seed: int = 0
    backward: bool = False
    baselines: bool = True
    weights: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    compile: bool = False  # dit: workloads: every transformer block torch.compile'd (both sides)


def make_spec(
    methods: str | list[str],
    *,
    sparsities: list[float],
    workloads: str | list[str] | None = None,
    device: str = "auto",
    dtype: str | None = None,
    out: str | Path | None = None,
    knobs: dict[str, dict[str, Any]] | None = None,
    quick: bool = False,
    **rest: Any,
) -> RunSpec:
    """A checked :class:`RunSpec` from what a user types (names or globs, comma strings or lists, knob
    values as text or Python values): the one place the CLI and the notebook API build a sweep."""
    from salad_bench.harness.knobs import check_knobs
    from salad_bench.harness.workloads import default_workload

    dev = check_device(device)
    names = METHODS.select(methods)
    wls = workloads or default_workload(torch.device(dev))
    wls = [w.strip() for w in (wls.split(",") if isinstance(wls, str) else wls) if w.strip()]
    return RunSpec(
        methods=names,
        workloads=wls,
        sparsities=list(sparsities),
        device=dev,
        dtype=dtype or ("bf16" if dev.startswith("cuda") else "fp32"),
        out=Path(out) if out is not None else Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        knobs=check_knobs(knobs or {}, names),
        warmup_ms=10 if quick else 25,
        rep_ms=30 if quick else 100,
        **rest,
    )


def check_device(name: str) -> str:
    """``auto`` -> cuda when present, else cpu; anything but cpu/cuda/cuda:N is refused with the fix."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: the harness runs on cpu or cuda; use --device cpu or --device cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0..")
    return name


def validate_spec(spec: RunSpec) -> None:
    """Reject bad input before anything is measured (messages name the problem and the fix)."""
    if spec.qkv not in ("video", "random", "wan"):
        raise ValueError(f"unknown input kind --qkv {spec.qkv!r}; use video, random or wan")
    if spec.qkv == "wan":
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:
            raise ValueError('--qkv wan takes Q/K/V from a diffusers Wan2.1 layer, and diffusers is not installed; '
                             'pip install -e ".[dev]" (or pip install diffusers), or use --qkv video or random')
    if not spec.sparsities:
        raise ValueError("no target sparsity given; pass one or more, e.g. --sparsity 0.9")
    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the run (it is created if missing)")
    for s in spec.sparsities:
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"sparsity {s} is impossible: it must be in [0, 1) (0.9 keeps 10% of the tiles)")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {spec.dtype!r}; use one of {', '.join(DTYPES)}")
    dev = torch.device(check_device(spec.device))
    for name in spec.methods:
        for s in spec.sparsities[:1] or [0.0]:
            create_method(name, num_heads=2, head_dim=64, sparsity=s, **spec.knobs.get(name, {}))  # knob check
    for w in spec.workloads:
        if w.startswith("dit:"):
            import importlib.util

            if importlib.util.find_spec("diffusers") is None:
                raise ValueError(
                    f"workload {w!r} builds a diffusers WanTransformer3DModel, and diffusers is not installed; "
                    'pip install -e ".[dev]" (or pip install diffusers transformers), or use an attention workload'
                )
            from salad_bench.harness.dit import get_dit_workload

            get_dit_workload(w)
            continue
        wl = get_workload(w)
        if dev.type == "cpu" and wl.n > 16384:
            raise ValueError(
                f"workload {w!r} has N={wl.n:,} tokens: too large for a CPU run; use --workloads cpu-tiny "
                f"or run on a GPU (--device cuda)"
            )


def _identity(kind: str, method: str, cfg: dict, workload: str, dtype: str, pass_: str, sparsity: float,
              qkv: str | None = None) -> dict:
    return {
        "qkv": qkv,
        "kind": kind,
        "method": method,
        "config": json.dumps(cfg, sort_keys=True, default=str),
        "config_hash": config_hash(cfg),
        "workload": workload,
        "dtype": dtype,
        "pass": pass_,
        "sparsity_target": sparsity,
    }


class _Sweep:
    def __init__(self, spec: RunSpec, writer: RowWriter, progress) -> None:
        self.spec = spec
        self.writer = writer
        self.progress = progress
        self.device = torch.device(spec.device)
        self.dtype = DTYPES[spec.dtype]

    # -- one workload ----------------------------------------------------------------------------
    def workload(self, wl: Workload) -> None:
        spec = self.spec
        try:
            q, k, v = make_qkv(wl, kind=spec.qkv, seed=spec.seed, device=self.device, dtype=self.dtype)
        except torch.cuda.OutOfMemoryError:
            self._fail_all(wl, "error", f"out of memory creating q/k/v for {wl.name} ({wl.attention_gib():.1f} GiB); use a smaller workload")
            return
        if not all(torch.isfinite(t).all() for t in (q, k, v)):
            raise ValueError(f"q/k/v for {wl.name} contain NaN or Inf; check --qkv/--seed")
        ref = reference_attention(q, k, v)
        ctx = AttnContext(grid=wl.grid, num_layers=wl.layers)
        base: dict[str, float] = {}
        if spec.baselines:
            for name in dense_baselines():
                row = self.cell(wl, name, 0.0, q, k, v, ref, ctx, base=None)
                if row and row.get("status") == "ok" and row.get("pass", "fwd") == "fwd":
                    base[name] = row["ms"]
        best = min(base, key=base.get) if base else None
        base_info = {
            "baseline_method": best,
            "baseline_backend": METHODS.get(best).defaults.get("backend") if best else None,
            "baseline_ms": base.get(best) if best else None,
            "fa2_ms": base.get(_fa2()),
        }
        for name in spec.methods:
            for s in spec.sparsities if sweeps_sparsity(name) else [0.0]:
                self.cell(wl, name, s, q, k, v, ref, ctx, base=base_info)
        del q, k, v, ref

    def _fail_all(self, wl: Workload, status: str, reason: str) -> None:
        for name in self.spec.methods:
            ident = _identity("attention", name, {}, wl.name, self.spec.dtype, "fwd", 0.0, self.spec.qkv)
            self.writer.append({**ident, "status": status, "reason": reason, "N": wl.n})
            self.progress.update(1)

    # -- one cell --------------------------------------------------------------------------------
    def cell(self, wl, name, sparsity, q, k, v, ref, ctx, base) -> dict | None:
        spec = self.spec
        passes = ["fwd", "fwd+bwd"] if spec.backward else ["fwd"]
        knobs = dict(spec.knobs.get(name, {}))
        last = None
        for pass_ in passes:
            entry = METHODS.get(name)
            cfg = {**entry.defaults, **knobs, "sparsity": sparsity}
            ident = _identity("attention", name, cfg, wl.name, spec.dtype, pass_, sparsity, spec.qkv)
            common = {
                **ident,
                "family": entry.family,
                "B": wl.batch,
                "H": wl.heads,
                "N": wl.n,
                "D": wl.head_dim,
                "grid": list(wl.grid),
                "device": str(self.device),
                "seed": spec.seed,
            }
            if base is not None:
                common.update(base)
            if spec.resume and self.writer.is_done(ident):
                # measured before the interruption: hand back its row, so a dense backend timed then is
                # still this run's baseline for the cells measured now
                last = self.writer.done_row(ident) if pass_ == "fwd" else last
                self.progress.update(1)
                continue
            self.progress.set_postfix_str(f"{wl.name} {name} s={sparsity}")
            try:
                row = self._measure(name, sparsity, knobs, pass_, q, k, v, ref, ctx, wl)
                row = {**common, **row}
            except Unsupported as exc:
                row = {**common, "status": "skipped", "reason": str(exc)}
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                row = {**common, "status": "error", "reason": f"out of memory: {str(exc).splitlines()[0][:200]}; try a smaller workload or batch"}
            except Exception as exc:  # noqa: BLE001 - a failed cell must not stop the sweep
                tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
                row = {**common, "status": "error", "reason": f"{type(exc).__name__}: {exc} [{tb}]"[:500]}
            if row.get("status") == "ok" and base is not None and base.get("baseline_ms") and pass_ == "fwd":
                row["speedup"] = base["baseline_ms"] / row["ms"]
                if base.get("fa2_ms"):
                    row["speedup_vs_fa2"] = base["fa2_ms"] / row["ms"]
            last = self.writer.append(row)
            self.progress.update(1)
        return last

    def _measure(self, name, sparsity, knobs, pass_, q, k, v, ref, ctx, wl) -> dict:
        m: AttentionMethod = create_method(name, num_heads=wl.heads, head_dim=wl.head_dim, sparsity=sparsity, **knobs)
        m = m.to(self.device)
        if any(p.is_floating_point() for p in m.parameters()):
            m = m.to(self.dtype)
        m.eval()
        spec = self.spec
        with torch.no_grad():
            out = m(q, k, v, ctx)
        if not torch.isfinite(out).all():
            return {"status": "error", "reason": "output contains NaN or Inf"}
        rep = m.report()
        acc = compare(out, ref)
        del out
        row: dict[str, Any] = {"status": "ok", "reason": "", "backend": rep.backend, "density": rep.density, "sparsity": 1.0 - rep.density}
        row.update(acc)
        b, h, n, d = q.shape
        dense = dense_flops(b, h, n, n, d)
        executed = rep.flops_total
        if pass_ == "fwd":
            with torch.no_grad():
                t = measure(lambda: m(q, k, v, ctx), self.device, warmup_ms=spec.warmup_ms, rep_ms=spec.rep_ms)
                layout = m.select(q, k, ctx)
                if layout is not None:
                    row["select_ms"] = measure(lambda: m.select(q, k, ctx), self.device, warmup_ms=spec.warmup_ms, rep_ms=spec.rep_ms).median_ms
                row["peak_mem_gib"] = peak_memory_gib(lambda: m(q, k, v, ctx), self.device)
        else:
            qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
            grad = torch.randn_like(q)

            def step():
                o = m(qg, kg, vg, ctx)
                o.backward(grad)
                qg.grad = kg.grad = vg.grad = None

            t = measure(step, self.device, warmup_ms=spec.warmup_ms, rep_ms=spec.rep_ms)
            dense *= 1 + BACKWARD_FACTOR
            executed *= 1 + BACKWARD_FACTOR
        row.update(t.as_row())
        row.update({f"flops_{part}": val for part, val in rep.flops.items()})
        card = self.writer.provenance["card"]
        row.update(
            {
                "flops_executed": executed,
                "flops_dense": dense,
                "tflops_dense_equiv": tflops(dense, t.median_ms),
                "tflops_executed": tflops(executed, t.median_ms),
                "mfu": mfu(executed, t.median_ms, card),
            }
        )
        if rep.extra:
            row["extra"] = json.dumps(rep.extra, default=str)
        row["kernel_path"] = json.dumps(execution_paths(q.device, q.dtype, d), sort_keys=True)
        return row


def count_cells(spec: RunSpec) -> int:
    per_wl = 0
    for name in spec.methods:
        per_wl += len(spec.sparsities) if sweeps_sparsity(name) else 1
    if spec.baselines:
        per_wl += len(dense_baselines())
    per_wl *= 2 if spec.backward else 1
    per_dit = sum(len(spec.sparsities) if sweeps_sparsity(n) else 1 for n in spec.methods)
    n_dit = len([w for w in spec.workloads if w.startswith("dit:")])
    return per_wl * (len(spec.workloads) - n_dit) + per_dit * n_dit


def run(spec: RunSpec, *, quiet: bool = False) -> Path:
    """Measure every cell of ``spec``; returns the path of ``rows.jsonl``."""
    from tqdm.auto import tqdm

    validate_spec(spec)
    writer = RowWriter(spec.out, resume=spec.resume, device=spec.device)
    # disable=None: no bar when stderr is not a terminal (CI logs, the device tool)
    with tqdm(total=count_cells(spec), disable=True if quiet else None, unit="cell", dynamic_ncols=True) as bar:
        sweep = _Sweep(spec, writer, bar)
        for w in spec.workloads:
            if w.startswith("dit:"):
                from salad_bench.harness.dit import run_dit_workload

                run_dit_workload(
                    w,
                    spec.methods,
                    spec.sparsities,
                    writer=writer,
                    device=spec.device,
                    dtype=DTYPES[spec.dtype],
                    weights=spec.weights,
                    progress=bar,
                    knobs=spec.knobs,
                    compiled=spec.compile,
                )
                continue
            sweep.workload(get_workload(w))
    return writer.path
