"""``dit:`` workloads: one whole Wan2.1 transformer forward per registered method and sparsity.

Each preset is a diffusers ``WanTransformer3DModel`` config plus a latent video shape (REFERENCE.md
section 1). Weights are random (created on the device in the run dtype) unless ``weights`` points at
a diffusers-format Wan2.1 directory (:mod:`harness.weights`). One forward = batch 1, the latent
``(1, 16, F, H, W)``, a timestep, and a 512-token text context of width ``text_dim`` (classifier-free
guidance would run two such forwards per step).

What a row measures (``kind="dit"``):

* ``ms`` / ``ms_p20`` / ``ms_p80``: the whole forward, :func:`harness.timing.measure` (do_bench on
  CUDA, perf_counter on the CPU).
* ``attn_ms``: the self-attention *method calls* inside the forward (selection, sparse kernel and
  any extra branch such as SALAD's linear attention and projection), each bracketed by CUDA events
  recorded on the stream around the call and summed over the layers; the median over
  ``attn_reps`` instrumented forwards. Q/K/V projections, qk-norm, RoPE and the output projection
  are the same for every method and count in ``rest_ms = ms - attn_ms``.
  ``attn_share = attn_ms / ms``. ``attn_extra_ms``: for a method built on another (SALAD on its sparse
  branch), its own work beyond that method's calls (timed apart the same way): SALAD's linear branch,
  projection and gate, and the merge where the sparse branch does not add the projection in its own
  kernel (``fuses_residual``); None for the others and in compiled rows.
* Cross-check, once per workload: ``rest_ms_stub`` is the forward with the attention call replaced
  by a zero-cost stub (an opaque operator that reads q, k, v and writes nothing, so a compiler keeps
  the q and k work); ``attn_ms_stub = ms - rest_ms_stub``. The two splits agree
  when event overhead and launch gaps are small; a gap between them is a finding, not noise to hide.
* Baseline: the same model with ``full`` pinned to the fastest dense backend for this shape (chosen
  once by ``full``'s own ``auto`` on the workload's q/k/v: cuDNN on Hopper when present), timed in
  the same process on the same card. ``speedup = baseline_ms / ms``; ``attn_speedup =
  baseline_attn_ms / attn_ms``. The ``full`` row re-uses the baseline measurement (it *is* the
  baseline, with ``backend`` naming what ``auto`` picked).
* ``token_order``: whether the blocks ran in the installed method's own token order (the Wan
  integration's hooks; ``sta``, ``vsa``, ``salad_sta``), so the method gathered nothing per layer.
* ``density``: mean over layers of each method's ``report().density``; ``backend``: the backends the
  layers report. The sampler step is ``step`` of ``num_steps`` (default: the middle of a 50-step
  run, past any dense warm-up steps) and is recorded.

Dense methods (family ``full``) get one row at ``sparsity_target`` 0.0, like the attention sweep.
A model that does not fit gives ``skipped`` rows naming the memory it needed; a method that cannot
run gives a ``skipped`` row (``Unsupported``); an exception or an out-of-memory cell an ``error``
row. Cells already in the results are skipped on resume.

Run alone: ``python -m salad_bench.harness.dit --workload dit:wan2.1-1.3b-480p --methods full,salad --sparsity 0.9 --out DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from salad_bench.harness.engine import Cell, Engine
from salad_bench.harness.errors import BadInput, Parser, check_writable_dir
from salad_bench.harness.flops import dense_flops
from salad_bench.harness.knobs import method_config
from salad_bench.harness.results import RowWriter, cell_identity
from salad_bench.harness.timing import measure, peak_memory_gib
from salad_bench.harness.workloads import DIT_WORKLOADS, DTYPES, Workload
from salad_bench.methods import METHODS, AttentionMethod, AttnContext, Unsupported, create_method
from salad_bench.methods.registry import UnknownNameError, close_names

__all__ = ["DIT_WORKLOADS", "get_dit_workload", "run_dit_workload", "main"]


def get_dit_workload(name: str) -> Workload:
    if name in DIT_WORKLOADS:
        return DIT_WORKLOADS[name]
    close = close_names(name, DIT_WORKLOADS, n=2)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise UnknownNameError(f"unknown DiT workload {name!r}.{hint} Known: {', '.join(DIT_WORKLOADS)}.")


# -- pieces ---------------------------------------------------------------------------------------


@torch.library.custom_op("salad_bench::zero_cost_attention", mutates_args=())
def _zero_cost(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An output shaped and strided like ``v``, left uninitialised: no kernel runs. An opaque operator
    that reads q and k, so a compiler cannot drop their projections, qk-norm and RoPE as dead code and
    the stub model keeps all the work but attention."""
    return torch.empty_like(v)


@_zero_cost.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(v)


class _ZeroCostAttention(AttentionMethod):
    """The cross-check stub: no attention, so the forward costs everything but it (eager or compiled)."""

    family = "full"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        self._remember(None, backend="stub")
        return _zero_cost(q, k, v)


def _stub_factory(*, num_heads: int, head_dim: int, sparsity: float = 0.0) -> AttentionMethod:
    from salad_bench.methods.base import MethodConfig

    return _ZeroCostAttention(MethodConfig(), num_heads=num_heads, head_dim=head_dim, name="zero_cost_stub")


def _inputs(wl: Workload, model_cfg: Any, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = model_cfg
    lat = torch.randn(1, c.in_channels, *wl.latent, generator=g).to(device, dtype)
    ctx = torch.randn(1, wl.text_len, c.text_dim, generator=g).to(device, dtype)
    return {
        "hidden_states": lat,
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": ctx,
        "return_dict": False,
    }


def _fastest_dense_backend(wl: Workload, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> str:
    """What ``full`` with backend ``auto`` picks for this workload's q/k/v (same strides as in the model)."""
    m = create_method(_reference(), num_heads=heads, head_dim=head_dim)
    q, k, v = (torch.randn(1, wl.n, heads, head_dim, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    with torch.no_grad():
        m(q, k, v, AttnContext(grid=wl.grid))
    del q, k, v
    return m.report().backend


def _reference() -> str:
    """The registry's ``reference`` dense method: the baseline of a whole-model run."""
    names = METHODS.with_trait("reference")
    if len(names) != 1:
        raise RuntimeError(f"exactly one method must carry the 'reference' trait; found {names}")
    return names[0]


def _identity(method: str, cfg: dict, workload: str, dtype: str, sparsity: float) -> dict[str, Any]:
    return cell_identity("dit", method, cfg, workload, dtype, "fwd", sparsity)


def compile_blocks(model: torch.nn.Module) -> None:
    """Regional compilation as diffusers recommends for DiTs: every transformer block compiled with
    ``fullgraph=True`` (one compiled graph reused by the repeated blocks). Dynamo's caches are reset
    first, so each cell compiles its own method instead of hitting the recompile limit."""
    torch._dynamo.reset()
    if hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(fullgraph=True)
    else:
        for block in model.blocks:
            block.compile(fullgraph=True)


def _forward_stats(
    model: torch.nn.Module, inputs: dict, device: torch.device, warmup_ms: float, rep_ms: float, attn_reps: int,
    compiled: bool = False,
) -> dict[str, Any]:
    """Time the forward, then split out the attention calls; the installed methods stay in place.

    ``compiled``: the blocks are compiled first; the first call's time (tracing and code generation)
    is ``compile_s``, kept out of the latency, and the attention is not timed call by call (events
    around the method would break the graph): ``attn_ms`` is then None and the caller takes the
    attention time from the difference to the zero-cost stub model."""
    import time

    from salad_bench.harness.integrations.wan import attention_state, installed_methods, time_attention

    def fn():
        return model(**inputs)

    outs: list[torch.Tensor] = []
    compile_s = None
    if compiled:
        compile_blocks(model)
        with torch.inference_mode():
            t0 = time.perf_counter()
            outs.append(fn()[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - t0
    with torch.inference_mode():
        peak = peak_memory_gib(lambda: outs.append(fn()[0]), device)  # first call: also warms up / compiles
        if not outs:
            outs.append(fn()[0])
        finite = bool(torch.isfinite(outs[0]).all())
        outs.clear()
        t = measure(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
        sums, inner = [], []
        if not compiled:
            with time_attention(model) as timer:
                for _ in range(max(1, attn_reps)):
                    fn()
                    sums.append(timer.take_ms())
                    inner.append(timer.take_ms(inner=True))
        reports = [m.report() for m in installed_methods(model)]
        state = attention_state(model)
        in_order = state is not None and state.order is not None  # the blocks ran in the methods' token order
    attn_ms = statistics.median(sums) if sums else None
    # a method built on another (SALAD on its sparse branch): its own work, per forward, beyond that method's
    extra = [a - b for a, b in zip(sums, inner, strict=True)] if any(inner) else []
    backends = sorted({r.backend for r in reports if r.backend})
    # methods with dense warm-up layers/steps also report the density averaged over a whole run
    eff = [r.extra.get("effective_density") for r in reports]
    effective = statistics.fmean(eff) if eff and all(isinstance(e, (int, float)) for e in eff) else None
    return {
        **t.as_row(),
        "attn_ms": attn_ms,
        "rest_ms": None if attn_ms is None else t.median_ms - attn_ms,
        "attn_share": attn_ms / t.median_ms if attn_ms is not None and t.median_ms > 0 else None,
        "compiled": compiled,
        "compile_s": compile_s,
        "attn_reps": len(sums),
        "attn_extra_ms": statistics.median(extra) if extra else None,
        "density": statistics.fmean(r.density for r in reports) if reports else None,
        "effective_density": effective,
        "backend": ",".join(backends),
        "token_order": in_order,
        "flops_attn_executed": float(sum(r.flops_total for r in reports)),
        "peak_mem_gib": peak,
        "output_finite": finite,
    }


def _oom_reason(exc: BaseException, what: str) -> str:
    first = str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
    return f"out of memory {what}: {first}"


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the workload ---------------------------------------------------------------------------------


def run_dit_workload(
    workload: str,
    methods: list[str],
    sparsities: list[float],
    *,
    writer: RowWriter,
    device: str,
    dtype: torch.dtype,
    weights: str | None = None,
    progress: Any = None,
    knobs: dict[str, dict[str, Any]] | None = None,
    step: int | None = None,
    num_steps: int = 50,
    warmup_ms: float | None = None,
    rep_ms: float | None = None,
    attn_reps: int = 3,
    seed: int = 0,
    compiled: bool = False,
    blocks: int | None = None,
) -> None:
    """Time one Wan2.1 transformer forward per (method, sparsity); append one ``kind="dit"`` row each.

    ``blocks``: build the model with this many transformer blocks (all of the same shape) and give the
    whole model's times from them: the forward without blocks plus the blocks' time scaled to the full
    depth, methods told their blocks are the model's last layers and dense warm-up layers counted at the
    dense block's time (:func:`scale_blocks`). Rows name it in the workload (``[blocks=K/L]``).

    ``methods`` are registry names (globs allowed); ``knobs`` maps a method name to config overrides;
    ``progress`` is a tqdm-like bar or a callable receiving each row. ``warmup_ms``/``rep_ms`` go to
    :func:`harness.timing.measure` (defaults: 500/2000 ms on CUDA, 25/100 ms on the CPU).
    """
    wl = get_dit_workload(workload)
    dev = torch.device(device)
    names = METHODS.select(methods)
    knobs = knobs or {}
    if dev.type == "cpu" and wl.n > 4096:
        raise ValueError(
            f"{wl.dit_name} has N={wl.n:,} tokens per layer: far too large for a CPU run; use dit:tiny or --device cuda"
        )
    step = num_steps // 2 if step is None else step
    if not 0 <= step < num_steps:
        raise ValueError(f"step={step} is outside [0, num_steps={num_steps})")
    warmup_ms = (500.0 if dev.type == "cuda" else 25.0) if warmup_ms is None else warmup_ms
    rep_ms = (2000.0 if dev.type == "cuda" else 100.0) if rep_ms is None else rep_ms
    dtype_name = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))
    depth = int(wl.model["num_layers"])
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= depth):
        raise ValueError(f"blocks={blocks!r}: give a whole number of transformer blocks in [1, {depth}] for {wl.dit_name}")
    if blocks == depth:
        blocks = None
    if blocks is not None and weights is not None:
        raise ValueError("--dit-blocks times a random-weight model of fewer blocks; drop it with --weights")
    wl_id = wl.dit_name if weights is None else f"{wl.dit_name}[weights={Path(weights).name}]"
    wl_id += f"[blocks={blocks}/{depth}]" if blocks else ""
    wl_id += "+compile" if compiled else ""  # compiled and eager rows are different cells

    engine = Engine(writer, progress)
    cells = engine.pending(
        Cell(_identity(name, method_config(name, knobs, s), wl_id, dtype_name, s), label=f"{wl.dit_name} {name} s={s}")
        for name in names
        for s in ([0.0] if "dense" in METHODS.get(name).traits else sparsities)
    )
    if not cells:
        return

    common = {
        "B": 1,
        "N": wl.n,
        "grid": list(wl.grid),
        "device": str(dev),
        "layers": None,
        "text_len": wl.text_len,
        "latent": list(wl.latent),
        "weights": weights or "random",
        "step": step,
        "num_steps": num_steps,
        "seed": seed,
        "timer_attn": "cuda-events-around-method-calls"
        if dev.type == "cuda"
        else "cpu-perf_counter-around-method-calls",
    }

    def stamped(**base: float) -> list[Cell]:
        return [dataclasses.replace(c, fields={**common, "family": METHODS.get(c.ident["method"]).family}, base=base)
                for c in cells]

    def fail_all(status: str, reason: str) -> None:
        engine.fail(stamped(), status, reason)

    from salad_bench.harness.integrations.wan import install_attention, new_transformer, restore_attention

    engine.note(f"{wl.dit_name}: building the model")
    try:
        if weights is None:
            config = wl.model if blocks is None else {**wl.model, "num_layers": blocks}
            model = new_transformer(config, device=dev, dtype=dtype, seed=seed)
        else:
            from salad_bench.harness.weights import load_transformer

            model = load_transformer(weights, device=dev, dtype=dtype)
        mcfg = model.config
        inputs = _inputs(wl, mcfg, dev, dtype, seed)
    except torch.cuda.OutOfMemoryError as exc:
        _free(dev)
        gib = _param_gib(wl.model, dtype)
        fail_all(
            "skipped",
            _oom_reason(exc, f"building {wl.dit_name} (weights alone {gib:.1f} GiB in {dtype_name})")
            + "; use a larger card",
        )
        return
    heads, head_dim = mcfg.num_attention_heads, mcfg.attention_head_dim
    common.update(
        {"H": heads, "D": head_dim, "layers": depth, "params": sum(p.numel() for p in model.parameters())}
    )
    flops_dense = depth * dense_flops(1, heads, wl.n, wl.n, head_dim)
    where = {} if blocks is None else {"layer_offset": depth - blocks, "num_layers": depth}
    if blocks is not None:
        engine.note(f"{wl.dit_name}: the forward without blocks")
        no_blocks_ms = _no_blocks_ms(model, inputs, dev, warmup_ms, rep_ms)
        common.update({"blocks_measured": blocks, "no_blocks_ms": no_blocks_ms, "params": None,
                       "extrapolated": f"{blocks} of {depth} blocks timed (as layers {depth - blocks}..{depth - 1}); "
                                       f"the forward without blocks + the blocks' time x {depth}/{blocks}"})

    def whole(got: dict[str, Any], dense_layers: int = 0) -> dict[str, Any]:
        if blocks is None:
            return got
        return scale_blocks(got, no_blocks_ms, blocks, depth, dense=base if dense_layers else None,
                            dense_layers=dense_layers)

    # Baseline: full, pinned to the fastest dense backend for this shape.
    try:
        engine.note(f"{wl.dit_name}: baseline")
        best = _fastest_dense_backend(wl, heads, head_dim, dev, dtype)
        pin = {"backend": best} if best in ("cudnn", "flash", "efficient", "math", "flex", "flash_attn", "fa4") else {}
        install_attention(model, _reference(), num_steps=num_steps, **where, **pin)
        _set(model, step, num_steps)
        base = whole(_forward_stats(model, inputs, dev, warmup_ms, rep_ms, attn_reps, compiled))
        install_attention(model, _stub_factory, num_steps=num_steps, **where)
        stub = whole(_forward_stats(model, inputs, dev, warmup_ms, rep_ms, 1, compiled))
        if compiled:  # attention = forward - the same compiled forward with zero-cost attention
            base = _with_stub_split(base, stub)
        restore_attention(model)
    except Exception as exc:  # noqa: BLE001 - without a baseline no cell of this workload can be measured
        restore_attention(model)
        model = None  # freed before the cache is emptied
        _free(dev)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            fail_all("skipped", _oom_reason(exc, f"running dense {wl.dit_name}") + "; use a larger card")
        else:
            status = "skipped" if isinstance(exc, Unsupported) else "error"
            fail_all(status, f"dense baseline failed: {type(exc).__name__}: {exc}"[:500])
        return
    if not base["output_finite"]:
        fail_all("error", f"the dense model's output on {wl.dit_name} has NaN or Inf (bad or corrupt weights?); "
                 "check the weights with python -m salad_bench.harness.weights check DIR")
        return
    common.update(
        {
            "baseline_method": _reference(),
            "baseline_backend": base["backend"],
            "baseline_ms": base["ms"],
            "baseline_attn_ms": base["attn_ms"],
            "rest_ms_stub": stub["ms"],
            "flops_attn_dense": flops_dense,
        }
    )

    def measure_cell(cell: Cell) -> dict[str, Any]:
        name, s = cell.ident["method"], cell.ident["sparsity_target"]
        cfg = method_config(name, knobs, s)
        try:
            if name == _reference() and not knobs.get(name):
                got = dict(base)  # full/auto is the baseline: same model, same backend, same process
            else:
                install_attention(model, name, sparsity=s, num_steps=num_steps, **where, **knobs.get(name, {}))
                _set(model, step, num_steps)
                warm = int(cfg.get("dense_first_layers", 0) or 0)
                if blocks is not None and warm > depth - blocks:
                    raise ValueError(f"{name} keeps its first {warm} of {depth} layers dense, more than the "
                                     f"{depth - blocks} layers beside the {blocks} timed blocks; give --dit-blocks at "
                                     f"most {depth - warm}, or time the whole model")
                got = whole(_forward_stats(model, inputs, dev, warmup_ms, rep_ms, attn_reps, compiled), warm)
                if compiled:
                    got = _with_stub_split(got, stub)
        finally:
            restore_attention(model)
            _free(dev)
        row = {"status": "ok", "reason": "", **got}
        row["sparsity"] = 1.0 - got["density"] if got.get("density") is not None else None
        row["attn_speedup"] = base["attn_ms"] / got["attn_ms"] if got["attn_ms"] and got["attn_ms"] > 0 else None
        row["attn_ms_stub"] = got["ms"] - stub["ms"]
        row.update(_sampling_estimate(got["ms"], base["ms"], cfg, num_steps))
        if not got["output_finite"]:
            row.update({"status": "error", "reason": f"{name} made the model's output NaN or Inf (the dense "
                        "model's was finite); its timing is kept in the row but it is not a result"})
        return row

    engine.run(stamped(speedup=base["ms"]), measure_cell)
    model = inputs = None  # freed before the cache is emptied
    _free(dev)


def _no_blocks_ms(model: torch.nn.Module, inputs: dict, device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """The forward's time without its transformer blocks (embeddings, the output head)."""
    kept = model.blocks
    model.blocks = torch.nn.ModuleList()
    try:
        with torch.inference_mode():
            return measure(lambda: model(**inputs), device, warmup_ms=warmup_ms, rep_ms=rep_ms).median_ms
    finally:
        model.blocks = kept


def scale_blocks(got: dict[str, Any], no_blocks_ms: float, k: int, depth: int, *, dense: dict[str, Any] | None = None,
                 dense_layers: int = 0) -> dict[str, Any]:
    """``got`` (the stats of a forward with ``k`` blocks) as a ``depth``-block forward's: each time ``t``
    becomes ``no_blocks_ms + (depth - dense_layers) / k * (t - no_blocks_ms)`` plus, for ``dense_layers``
    warm-up layers, that many of ``dense``'s blocks (``dense``: the dense model's stats, already scaled).
    Attention time and FLOPs scale with the blocks; the measured time stays as ``ms_measured``."""
    f = (depth - dense_layers) / k
    dense_block = (dense["ms"] - no_blocks_ms) / depth if dense_layers else 0.0
    out = {**got, "ms_measured": got["ms"], "peak_mem_gib": None, "peak_mem_gib_measured": got.get("peak_mem_gib")}
    for key in ("ms", "ms_p20", "ms_p80"):
        if got.get(key) is not None:
            out[key] = no_blocks_ms + f * (got[key] - no_blocks_ms) + dense_layers * dense_block
    if got.get("attn_extra_ms") is not None:  # warm-up layers are counted at the dense model's time (below)
        out["attn_extra_ms"] = f * got["attn_extra_ms"]
    if got.get("attn_ms") is not None:
        out["attn_ms"] = f * got["attn_ms"] + (dense_layers * dense["attn_ms"] / depth if dense_layers else 0.0)
        out["rest_ms"] = out["ms"] - out["attn_ms"]
        out["attn_share"] = out["attn_ms"] / out["ms"] if out["ms"] > 0 else None
    if got.get("flops_attn_executed") is not None:
        dense_flops_block = dense["flops_attn_executed"] / depth if dense_layers else 0.0
        out["flops_attn_executed"] = f * got["flops_attn_executed"] + dense_layers * dense_flops_block
    return out


def _sampling_estimate(ms: float, dense_ms: float, cfg: dict[str, Any], num_steps: int) -> dict[str, Any]:
    """A ``num_steps`` sampling loop with classifier-free guidance (two forwards per step), extrapolated
    from this cell's one-forward median: steps the method keeps dense (``dense_first_steps``) at the
    dense forward's time, the rest at this one's. Dense warm-up *layers* are already inside ``ms``."""
    dense_steps = min(int(cfg.get("dense_first_steps", 0) or 0), num_steps)
    total = 2 * (dense_steps * dense_ms + (num_steps - dense_steps) * ms)
    return {"sampling_ms_est": total, "sampling_steps": num_steps, "sampling_dense_steps": dense_steps,
            "sampling_note": f"extrapolated: 2 forwards (CFG) x {num_steps} steps from one forward's median"}


def _with_stub_split(got: dict[str, Any], stub: dict[str, Any]) -> dict[str, Any]:
    attn = max(got["ms"] - stub["ms"], 0.0)
    return {**got, "attn_ms": attn, "rest_ms": got["ms"] - attn, "attn_share": attn / got["ms"] if got["ms"] else None,
            "attn_split": "compiled forward minus the compiled zero-cost-attention forward"}


def _set(model: torch.nn.Module, step: int, num_steps: int) -> None:
    from salad_bench.harness.integrations.wan import set_step

    set_step(model, step, num_steps)


def _param_gib(config: dict[str, Any], dtype: torch.dtype) -> float:
    """Transformer weights in GiB (counted on the meta device: no memory)."""
    from salad_bench.harness.integrations.wan import _wan_class

    with torch.device("meta"):
        n = sum(p.numel() for p in _wan_class()(**config).parameters())
    return n * torch.tensor([], dtype=dtype).element_size() / 2**30


# -- a whole WanPipeline, as a user samples ----------------------------------------------------------


def video_size(wl: Workload) -> tuple[int, int, int]:
    """``(num_frames, height, width)`` in pixels of a preset's latent (Wan's VAE: 4x in time, 8x in space)."""
    t, h, w = wl.latent
    return (t - 1) * 4 + 1, h * 8, w * 8


def _pipeline_seconds(pipe: Any, steps: int, first_step: int, num_steps: int, size: tuple[int, int, int],
                      guidance: float, device: torch.device) -> float:
    """Wall time of one ``pipe(...)`` call of ``steps`` denoising steps (text encoding and VAE decode
    included), the methods told they are at steps ``first_step, first_step + 1, ...`` of ``num_steps``."""
    import time

    from salad_bench.harness.integrations.wan import set_step

    model = pipe.transformer
    set_step(model, first_step, num_steps)

    def advance(_pipe, i, _t, _kw):
        set_step(model, min(first_step + i + 1, num_steps - 1))
        return {}

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe(prompt="a red ball bounces across a wooden floor", negative_prompt="", num_frames=size[0],
             height=size[1], width=size[2], num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator(device="cpu").manual_seed(0), output_type="latent",
             callback_on_step_end=advance, max_sequence_length=64)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run_pipeline_workload(
    workload: str,
    methods: list[str],
    sparsities: list[float],
    *,
    weights: str,
    writer: RowWriter,
    device: str,
    dtype: torch.dtype,
    progress: Any = None,
    knobs: dict[str, dict[str, Any]] | None = None,
    num_steps: int = 50,
    short: tuple[int, int] = (2, 4),
    guidance: float = 5.0,
    compiled: bool = False,
    reps: int = 3,
) -> None:
    """Sample through a real ``WanPipeline`` (``weights``: a full diffusers-format Wan2.1 directory) at
    the video size of ``workload`` (a ``dit:`` preset), per method and sparsity; one ``kind="pipeline"``
    row each.

    Each cell runs the pipeline with ``short[0]`` and ``short[1]`` denoising steps (classifier-free
    guidance: two transformer forwards per step), ``reps`` times each (the fastest call of each length
    counts), after one untimed call that also compiles. The difference gives the time of one step, ``step_ms``; the rest, ``fixed_ms``, is text encoding, latent
    set-up and scheduler overhead (``output_type="latent"``: no VAE decode). The ``num_steps`` run is
    extrapolated from these, saying so: steps the method keeps dense (``dense_first_steps``) at the
    dense step time, the rest at its own. The methods are told they are in the middle of the run (past
    any dense warm-up); ``speedup`` compares steps, ``sampling_speedup`` whole runs, against ``full``
    run the same way (eager or compiled) in the same process.
    """
    from salad_bench.harness.integrations.wan import install_attention, restore_attention
    from salad_bench.harness.weights import load_pipeline

    wl = get_dit_workload(workload if workload.startswith("dit:") else f"dit:{workload}")
    dev = torch.device(device)
    size = video_size(wl)
    dtype_name = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))
    wl_id = f"pipeline:{wl.name}[weights={Path(weights).name}]" + ("+compile" if compiled else "")
    knobs = knobs or {}
    ref = _reference()
    names = METHODS.select(methods)
    if ref not in names:
        names = [ref, *names]  # the baseline of every speedup
    pipe = load_pipeline(weights, device=dev, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    common = {"device": str(dev), "weights": str(weights), "num_frames": size[0], "height": size[1],
              "width": size[2], "guidance": guidance, "sampling_steps": num_steps, "short_steps": list(short), "short_reps": reps,
              "compiled": compiled, "scheduler": type(pipe.scheduler).__name__,
              "sampling_note": f"extrapolated to {num_steps} CFG steps from pipeline calls of {short[0]} and {short[1]} steps"}
    mid = num_steps // 2
    base_step = None

    def sample(cell: Cell) -> dict[str, Any]:
        name, s = cell.ident["method"], cell.ident["sparsity_target"]
        try:
            install_attention(pipe.transformer, name, sparsity=s, num_steps=num_steps, **knobs.get(name, {}))
            t0 = time.perf_counter()
            if compiled:
                compile_blocks(pipe.transformer)
            _pipeline_seconds(pipe, 1, mid, num_steps, size, guidance, dev)  # warm-up (and compile)
            first_s = time.perf_counter() - t0
            t_a = min(_pipeline_seconds(pipe, short[0], mid, num_steps, size, guidance, dev) for _ in range(reps))
            t_b = min(_pipeline_seconds(pipe, short[1], mid, num_steps, size, guidance, dev) for _ in range(reps))
        finally:
            restore_attention(pipe.transformer)
            _free(dev)
        if t_b <= t_a:
            raise RuntimeError(f"{short[1]} steps took no longer than {short[0]} ({t_b:.3f} s vs {t_a:.3f} s): "
                               "the step time is below the timing noise; use more steps apart")
        step_ms = (t_b - t_a) / (short[1] - short[0]) * 1e3
        fixed_ms = max(t_a * 1e3 - short[0] * step_ms, 0.0)
        dense_steps = min(int(method_config(name, knobs, s).get("dense_first_steps", 0) or 0), num_steps)
        dense_step = base_step if base_step is not None and name != ref else step_ms
        est = fixed_ms + dense_steps * dense_step + (num_steps - dense_steps) * step_ms
        base_est = fixed_ms + num_steps * dense_step
        return {"status": "ok", "reason": "", "step_ms": step_ms, "ms": step_ms, "fixed_ms": fixed_ms,
                "first_call_s": first_s, "compile_s": first_s if compiled else None,
                "sampling_dense_steps": dense_steps, "sampling_ms_est": est,
                "speedup": dense_step / step_ms if step_ms > 0 else None,
                "sampling_speedup": base_est / est if est > 0 else None, "timer": "perf_counter-around-pipe"}

    engine = Engine(writer, progress)
    for name in names:
        family = METHODS.get(name).family
        for s in [0.0] if "dense" in METHODS.get(name).traits else sparsities:
            ident = {**_identity(name, method_config(name, knobs, s), wl_id, dtype_name, s), "kind": "pipeline"}
            row = engine.cell(Cell(ident, {**common, "family": family}, label=f"pipeline {name} s={s}"), sample)
            if name == ref and row["status"] == "ok":
                base_step = row["step_ms"]
    pipe = None  # freed before the cache is emptied
    _free(dev)


# -- command line ---------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog="python -m salad_bench.harness.dit", description="Time whole Wan2.1 transformer forwards per attention method."
    )
    p.add_argument(
        "--workload", "--workloads", dest="workload", default="dit:wan2.1-1.3b-480p", help="comma list of dit: presets"
    )
    p.add_argument("--methods", default="full,salad,topk", help="comma list of registered methods (globs allowed)")
    p.add_argument("--sparsity", default="0.9", help="comma list of target sparsities")
    p.add_argument("--out", required=False, default=None, help="run directory (rows.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue a run: skip cells already in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--weights", default=None, help="diffusers-format Wan2.1 directory (default: random weights)")
    p.add_argument(
        "--step", type=int, default=None, help="sampler step the forward belongs to (default num_steps // 2)"
    )
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--attn-reps", type=int, default=3)
    p.add_argument("--knobs", default="{}", help='JSON: {"salad": {"sparse": "sta"}}')
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block (both sides)")
    p.add_argument("--dit-blocks", type=int, default=None, metavar="K",
                   help="time a model of K blocks and scale to the full depth (large models within a time budget)")
    p.add_argument("--pipeline", action="store_true",
                   help="sample through a real WanPipeline at the preset's video size (needs --weights: a full "
                        "diffusers-format Wan2.1 directory); rows of kind 'pipeline'")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.list:
        for w in DIT_WORKLOADS.values():
            print(f"{w.dit_name:24s} grid {'x'.join(map(str, w.grid)):10s} N={w.n:>6,d}  {w.note}")
        return 0
    if not args.out:
        raise BadInput("--out DIR is required (where rows.jsonl is written)")
    check_writable_dir(args.out)
    dtype = DTYPES[args.dtype]
    sparsities = [float(s) for s in args.sparsity.split(",") if s.strip()]
    writer = RowWriter(args.out, resume=args.resume, device=args.device)

    def show(row: dict) -> None:
        if row.get("status") != "ok":
            print(
                f"{row['workload']:24s} {row['method']:16s} s={row['sparsity_target']:<5} {row['status']}: {row.get('reason', '')}",
                flush=True,
            )
            return
        print(
            f"{row['workload']:24s} {row['method']:16s} s={row['sparsity_target']:<5} {row['ms']:9.2f} ms"
            f" (attn {row['attn_ms']:8.2f} = {100 * row['attn_share']:4.1f}%, stub {row['attn_ms_stub']:8.2f})"
            f" density {row['density']:.3f}  speedup {row['speedup']:.2f}x vs full[{row['baseline_backend']}]"
            f"  attn {row['attn_speedup'] or float('nan'):.2f}x  peak {row['peak_mem_gib'] or 0:.1f} GiB  [{row['backend']}]",
            flush=True,
        )

    for w in [w.strip() for w in args.workload.split(",") if w.strip()]:
        if args.pipeline:
            if not args.weights:
                raise BadInput("--pipeline needs --weights DIR (a full diffusers-format Wan2.1 directory; docs/REAL_WEIGHTS.md)")
            run_pipeline_workload(w, args.methods.split(","), sparsities, weights=args.weights, writer=writer,
                                  device=args.device, dtype=dtype, knobs=json.loads(args.knobs),
                                  num_steps=args.num_steps, compiled=args.compile,
                                  progress=lambda r: print(json.dumps({k: r.get(k) for k in (
                                      "method", "sparsity_target", "status", "step_ms", "fixed_ms", "speedup",
                                      "sampling_speedup", "reason")}), flush=True))
            continue
        run_dit_workload(
            w,
            args.methods.split(","),
            sparsities,
            writer=writer,
            device=args.device,
            dtype=dtype,
            weights=args.weights,
            progress=show,
            knobs=json.loads(args.knobs),
            step=args.step,
            num_steps=args.num_steps,
            warmup_ms=args.warmup_ms,
            rep_ms=args.rep_ms,
            attn_reps=args.attn_reps,
            blocks=args.dit_blocks,
            compiled=args.compile,
        )
    print(f"rows: {writer.path}")
    return 0


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    raise SystemExit(guarded(main))
