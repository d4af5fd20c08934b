"""The sweep: workloads x methods x sparsities, one row appended per measured cell.

For each Q/K/V workload the runner first times every dense backend present (the ``full_*``
variants) so that each method's speedup is over the fastest dense backend *measured in the same
process on the same card*, and over FA2 (SDPA's flash backend) beside it. A cell that cannot run
becomes a ``skipped`` row (with the reason) or an ``error`` row (out of memory, NaN output, an
exception) and the sweep goes on. ``dit:`` workloads are handed to :mod:`harness.dit`.

Under ``torchrun --nproc_per_node=G`` every rank builds the same plan and takes its share
(:mod:`harness.distributed`): the dense backends of every workload first (dealt out, then a barrier, so
each rank reads every baseline before it times a method), then the methods' cells (workload x method x
sparsity, with both passes), each dealt by its expected cost, heaviest first to the least-loaded rank. A
``dit:`` workload is one unit (its whole-model cells need their dense reference in the same process), so
it goes to one rank whole. Each rank times on its own GPU and appends to ``rows.rank<R>.jsonl``; the
speedup baseline is the fastest dense backend measured in this run on the same card.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salad_bench.harness.accuracy import compare, reference_attention
from salad_bench.harness.distributed import Dist, barrier, deal, rank_device
from salad_bench.harness.engine import Cell, Engine
from salad_bench.harness.errors import BadInput, check_writable_dir
from salad_bench.harness.flops import BACKWARD_FACTOR, dense_flops, mfu, tflops
from salad_bench.harness.knobs import method_config
from salad_bench.harness.results import RowWriter, cell_identity
from salad_bench.harness.timing import measure, peak_memory_gib
from salad_bench.harness.workloads import DTYPES, Workload, get_workload, make_qkv
from salad_bench.kernels import block_sparse_attention, execution_paths
from salad_bench.methods import METHODS, AttentionMethod, AttnContext, create_method

__all__ = ["RunSpec", "Unit", "run", "check_device", "make_spec", "dense_baselines", "plan", "sweeps_sparsity",
           "validate_spec"]



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
    dit_blocks: int | None = None  # dit: workloads: time this many blocks, scaled to the full depth


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
    wls = list(dict.fromkeys(w.strip() for w in (wls.split(",") if isinstance(wls, str) else wls) if w.strip()))
    if not wls:
        raise BadInput(f"no workload selected from {workloads!r}: give one or more names, e.g. --workloads cpu-tiny "
                       "(salad-bench list shows them all)")  # fmt: skip
    return RunSpec(
        methods=names,
        workloads=wls,
        sparsities=list(dict.fromkeys(sparsities)),  # each target once: a repeat would measure its cells again
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
    check_writable_dir(spec.out)
    for s in spec.sparsities:
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"sparsity {s} is impossible: it must be in [0, 1) (0.9 keeps 10% of the tiles)")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {spec.dtype!r}; use one of {', '.join(DTYPES)}")
    dev = torch.device(check_device(spec.device))
    for flag, used in (("--dit-blocks", spec.dit_blocks is not None), ("--compile", spec.compile)):
        if used and not any(w.startswith("dit:") for w in spec.workloads):
            raise ValueError(f"{flag} applies to whole-model workloads; add --workloads dit:<preset> or drop it")
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

            d = get_dit_workload(w)
            if spec.dit_blocks is not None and not 1 <= spec.dit_blocks <= d.layers:
                raise ValueError(f"--dit-blocks {spec.dit_blocks}: {w} has {d.layers} transformer blocks; "
                                 f"give a number in [1, {d.layers}]")
            continue
        wl = get_workload(w)
        if dev.type == "cpu" and wl.n > 16384:
            raise ValueError(
                f"workload {w!r} has N={wl.n:,} tokens: too large for a CPU run; use --workloads cpu-tiny "
                f"or run on a GPU (--device cuda)"
            )


def _identity(name: str, spec: RunSpec, workload: str, pass_: str, sparsity: float) -> dict:
    cfg = method_config(name, spec.knobs, sparsity)
    return cell_identity("attention", name, cfg, workload, spec.dtype, pass_, sparsity, spec.qkv)


class _Sweep:
    """The attention subject of the :class:`~harness.engine.Engine`: one cell per method, sparsity and pass
    of a Q/K/V workload."""

    def __init__(self, spec: RunSpec, writer: RowWriter, progress) -> None:
        self.spec = spec
        self.writer = writer
        self.engine = Engine(writer, progress, resume=spec.resume)
        self.device = torch.device(spec.device)
        self.dtype = DTYPES[spec.dtype]
        self.layout: str | None = None  # the memory layout of the workload's q, k, v (set per workload)

    # -- one workload ----------------------------------------------------------------------------
    def workload(self, wl: Workload, units: list[Unit]) -> None:
        """Measure ``units`` of one Q/K/V workload: its dense baselines first, then its methods' cells
        against the fastest dense backend this run has measured on this card."""
        spec = self.spec
        try:
            q, k, v = make_qkv(wl, kind=spec.qkv, seed=spec.seed, device=self.device, dtype=self.dtype)
        except torch.cuda.OutOfMemoryError:
            self.engine.fail(self.cells(wl, units, None), "error", f"out of memory creating q/k/v for {wl.name} ({wl.attention_gib():.1f} GiB); use a smaller workload")
            return
        if not all(torch.isfinite(t).all() for t in (q, k, v)):
            raise ValueError(f"q/k/v for {wl.name} contain NaN or Inf; check --qkv/--seed")
        ref = reference_attention(q, k, v)
        ctx = AttnContext(grid=wl.grid, num_layers=wl.layers)
        # "tokens": (B, H, N, D) views of token-major buffers, as a Wan layer hands them (the wan kind)
        self.layout = "heads" if q.is_contiguous() else "tokens" if q.transpose(1, 2).is_contiguous() else "strided"

        def measure(cell: Cell) -> dict:
            return self.measure_cell(cell, q, k, v, ref, ctx, wl)

        self.engine.run(self.cells(wl, [u for u in units if u.baseline], None), measure)
        bases = {p: self.baseline_info(wl, p) for p in self.passes()}
        self.engine.run(self.cells(wl, [u for u in units if not u.baseline], bases), measure)

    def passes(self) -> list[str]:
        return ["fwd", "fwd+bwd"] if self.spec.backward else ["fwd"]

    def baseline_info(self, wl: Workload, pass_: str = "fwd") -> dict[str, Any]:
        """The fastest dense backend among this run's rows of ``wl`` for one pass on this card (measured by
        this process, another rank, or before an interruption)."""
        spec = self.spec
        base: dict[str, float] = {}
        if spec.baselines:
            for name in dense_baselines():
                row = self.writer.done_row(_identity(name, spec, wl.name, pass_, 0.0))
                if row and row.get("status") == "ok":
                    base[name] = row["ms"]
        best = min(base, key=base.get) if base else None
        return {
            "baseline_method": best,
            "baseline_backend": METHODS.get(best).defaults.get("backend") if best else None,
            "baseline_ms": base.get(best) if best else None,
            "fa2_ms": base.get(_fa2()),
        }

    def cells(self, wl: Workload, units: list[Unit], bases: dict[str, dict[str, Any]] | None) -> list[Cell]:
        """Every pass of each unit's cell; with ``bases`` (the methods' cells: a pass's
        :meth:`baseline_info`) each row names its pass's dense baseline and gets its speedups over it."""
        shape = {"B": wl.batch, "H": wl.heads, "N": wl.n, "D": wl.head_dim, "grid": list(wl.grid),
                 "device": str(self.device), "seed": self.spec.seed, "qkv_layout": self.layout}

        def speedups(base: dict[str, Any]) -> dict[str, float]:
            pairs = {"speedup": base.get("baseline_ms"), "speedup_vs_fa2": base.get("fa2_ms")}
            return {key: ms for key, ms in pairs.items() if ms}

        out = []
        for u in units:
            for p in self.passes():
                base = (bases or {}).get(p) or {}
                out.append(Cell(_identity(u.method, self.spec, wl.name, p, u.sparsity),
                                {"family": METHODS.get(u.method).family, **shape, **base}, speedups(base),
                                f"{wl.name} {u.method} s={u.sparsity}"))  # fmt: skip
        return out

    SPLIT_ROUNDS = 5

    def split(self, m: AttentionMethod, q, k, v, ctx, layout, backend: str) -> dict[str, float]:
        """A forward split into its selection, the block-sparse kernel alone on the method's layout
        (``kernel_ms``), the method's own work alone (``own_ms``, 0 when it has none) and what is left, its
        glue (``glue_ms``: copies, casts, permutations, adds). The four are timed in turn, in
        :attr:`SPLIT_ROUNDS` rounds, and the glue is the median over rounds of each round's forward minus its
        parts, so that drift between timing windows (clocks, other work on the card) cancels instead of
        landing in the glue; ``glue_ms_p20``/``glue_ms_p80`` say how far the rounds spread."""
        spec = self.spec
        parts = {"fwd": lambda: m(q, k, v, ctx), "select": lambda: m.select(q, k, ctx),
                 "kernel": lambda: block_sparse_attention(q, k, v, layout, backend=backend)}
        if m.own_work(q, k, v, ctx) is not None:
            parts["own"] = lambda: m.own_work(q, k, v, ctx)
        rep_ms = max(spec.rep_ms / 2, 1.0)
        times: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(self.SPLIT_ROUNDS):
            for name, fn in parts.items():
                times[name].append(measure(fn, self.device, warmup_ms=spec.warmup_ms, rep_ms=rep_ms).median_ms)
        own = times.get("own", [0.0] * self.SPLIT_ROUNDS)
        glue = sorted(f - sel - ker - o for f, sel, ker, o in zip(times["fwd"], times["select"], times["kernel"], own, strict=True))
        mid = statistics.median
        return {"kernel_ms": mid(times["kernel"]), "own_ms": mid(own), "glue_ms": mid(glue),
                "glue_ms_p20": glue[len(glue) // 5], "glue_ms_p80": glue[-1 - len(glue) // 5],
                "split_fwd_ms": mid(times["fwd"]), "split_select_ms": mid(times["select"]), "split_rounds": len(glue)}

    # -- one cell --------------------------------------------------------------------------------
    def measure_cell(self, cell: Cell, q, k, v, ref, ctx, wl: Workload) -> dict:
        """The measured fields of one attention cell: accuracy, time, memory, FLOPs."""
        name, pass_, sparsity = cell.ident["method"], cell.ident["pass"], cell.ident["sparsity_target"]
        m: AttentionMethod = create_method(name, num_heads=wl.heads, head_dim=wl.head_dim, sparsity=sparsity,
                                           **self.spec.knobs.get(name, {}))
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
                    if m.splits_into_kernel():
                        row.update(self.split(m, q, k, v, ctx, layout, rep.backend))
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


@dataclass(frozen=True)
class Unit:
    """What one rank measures in one go: a method's cell of a Q/K/V workload (every pass of it), or a
    whole ``dit:`` workload (``method`` None). ``cost`` is the expected cost the ranks are balanced on:
    dense attention FLOPs x passes (a DiT workload: x layers x its cells); ``cells`` the rows it makes."""

    workload: str
    method: str | None
    sparsity: float = 0.0
    baseline: bool = False
    cost: float = 1.0
    cells: int = 1


def _units(spec: RunSpec, writer: RowWriter | None) -> tuple[list[Unit], list[Unit]]:
    """The sweep's units in the order a single process measures them: (dense baselines, the rest). With
    a ``writer`` (``--resume``) units whose every pass is done are left out."""
    passes = ["fwd", "fwd+bwd"] if spec.backward else ["fwd"]
    factor = 1.0 + ((1.0 + BACKWARD_FACTOR) if spec.backward else 0.0)

    def todo(w: str, name: str, s: float) -> bool:
        if writer is None or not spec.resume:
            return True
        return not all(writer.is_done(_identity(name, spec, w, p, s)) for p in passes)

    base: list[Unit] = []
    rest: list[Unit] = []
    per_dit = sum(len(spec.sparsities) if sweeps_sparsity(n) else 1 for n in spec.methods)
    for w in spec.workloads:
        if w.startswith("dit:"):
            from salad_bench.harness.dit import get_dit_workload

            d = get_dit_workload(w)
            flops = dense_flops(1, d.heads, d.n, d.n, d.head_dim) * d.layers * (per_dit + 1)
            rest.append(Unit(w, None, cost=flops, cells=per_dit))
            continue
        wl = get_workload(w)
        cost = dense_flops(wl.batch, wl.heads, wl.n, wl.n, wl.head_dim) * factor
        if spec.baselines:
            base += [Unit(w, n, 0.0, True, cost, len(passes)) for n in dense_baselines() if todo(w, n, 0.0)]
        for name in spec.methods:
            for s in spec.sparsities if sweeps_sparsity(name) else [0.0]:
                if todo(w, name, s):
                    rest.append(Unit(w, name, s, False, cost, len(passes)))
    return base, rest


def plan(spec: RunSpec, rank: int = 0, world: int = 1, writer: RowWriter | None = None) -> tuple[list[Unit], list[Unit]]:
    """The units rank ``rank`` of ``world`` measures: (its dense baselines, its other units), each list in
    the single-process order. Baselines and the rest are dealt separately (a barrier lies between them).
    A pure function of the spec and the run's rows, so every rank computes the same split."""
    out = []
    for units in _units(spec, writer):
        owner = deal([u.cost for u in units], world)
        out.append([u for u, r in zip(units, owner, strict=True) if r == rank])
    return out[0], out[1]


def run(spec: RunSpec, *, quiet: bool = False) -> Path:
    """Measure every cell of ``spec`` (this rank's share under torchrun); returns the path of this
    process's rows file. Under torchrun it returns once every rank is done, so the run's rows are all
    on disk."""
    import dataclasses

    from tqdm.auto import tqdm

    dist = Dist.from_env()
    spec = dataclasses.replace(spec, device=rank_device(spec.device, dist))
    validate_spec(spec)
    if torch.device(spec.device).type == "cuda" and torch.device(spec.device).index is not None:
        torch.cuda.set_device(spec.device)  # CUDA events, streams and Triton launches follow the current device
    writer = RowWriter(spec.out, resume=spec.resume, device=spec.device,
                       rank=dist.rank if dist.world > 1 else None, world_size=dist.world)  # fmt: skip
    _check_seed(spec, writer)
    barrier(dist)  # every rank has read the run's rows before any rank appends: the same plan everywhere
    base, rest = plan(spec, dist.rank, dist.world, writer)
    if dist.world > 1 and not quiet:
        print(f"rank {dist.rank}/{dist.world} on {spec.device}: {len(base)} baseline and {len(rest)} other units",
              flush=True)  # fmt: skip
    # disable=None: no bar when stderr is not a terminal (CI logs, the device tool); one bar per host
    bar_off = True if quiet or dist.local_rank != 0 else None
    with tqdm(total=sum(u.cells for u in base + rest), disable=bar_off, unit="cell", dynamic_ncols=True) as bar:
        sweep = _Sweep(spec, writer, bar)
        if dist.world == 1:  # each workload's baselines right before its methods
            _measure_units(sweep, base + rest)
        else:
            _measure_units(sweep, base)
            barrier(dist)
            writer.refresh()  # the other ranks' baselines
            _measure_units(sweep, rest)
    barrier(dist)
    return writer.path


def _check_seed(spec: RunSpec, writer: RowWriter) -> None:
    """The seed makes the inputs but is not part of a cell's identity: a resumed run must keep it, or the
    other seed's rows would be taken for this one's."""
    seeds = sorted({r["seed"] for r in writer.existing if r.get("kind") in ("attention", "dit") and "seed" in r} - {spec.seed})
    if seeds:
        raise BadInput(f"{spec.out} was measured with --seed {', '.join(map(str, seeds))}, this run asks for --seed {spec.seed}; "
                       f"resume with --seed {seeds[0]}, or give this seed its own --out")  # fmt: skip


def _measure_units(sweep: _Sweep, units: list[Unit]) -> None:
    spec = sweep.spec
    for w in spec.workloads:
        mine = [u for u in units if u.workload == w]
        if not mine:
            continue
        if w.startswith("dit:"):
            from salad_bench.harness.dit import run_dit_workload

            run_dit_workload(
                w,
                spec.methods,
                spec.sparsities,
                writer=sweep.writer,
                device=spec.device,
                dtype=DTYPES[spec.dtype],
                weights=spec.weights,
                progress=sweep.engine.progress,
                knobs=spec.knobs,
                compiled=spec.compile,
                blocks=spec.dit_blocks,
                seed=spec.seed,
            )
            continue
        sweep.workload(get_workload(w), mine)
