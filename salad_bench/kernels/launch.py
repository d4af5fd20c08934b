"""Shared launch helpers of the Triton kernels: the interpreter flag, the SM count, and three ways to launch.

* :data:`INTERPRET`: whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), as the
  kernel modules were created (Triton reads the variable when a ``@triton.jit`` function is made).
* :func:`sm_count`: streaming multiprocessors of a CUDA device.
* :func:`autotuned`: an autotuned kernel on a GPU, one fixed config in the interpreter (no timer there).
* :func:`fitted`: a fixed config, retried with fewer stages or smaller tiles where it overflows shared memory.
* :func:`launch` / :class:`Site`: a cheaper relaunch of a compiled kernel, for launches whose host time
  shows in the timing. ``kernel[grid](...)`` spends its host time binding arguments, building the
  specialisation key (for a tensor descriptor, the string of its shared-memory layout) and looking the
  kernel up; on the device machine's host that is as long as the linear branch's kernels themselves
  (docs/lab/kernels-notes.md). :func:`launch` keeps the compiled kernel under a key of everything Triton
  specialises on (dtypes, 16-byte alignment of pointers, integers divisible by 16 or equal to 1, the
  constexpr values and launch options) and calls its launcher directly on a hit. The first launch for a
  key, any argument type it does not know, and launches under a profiler hook go through ``kernel[grid]``.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["INTERPRET", "Site", "autotuned", "check_inference", "check_q_index", "check_qkv", "check_residual", "fitted", "interpreting", "launch", "needs_grad", "sm_count"]


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (Triton's CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# As the kernel modules see it: read at import, as Triton reads it when it creates their kernels.
INTERPRET = interpreting()


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, head_dims: tuple[int, ...]) -> None:
    """The checks every Triton attention kernel makes of its inputs: one ``(B, H, N, D)`` shape and dtype,
    a CUDA device (or the interpreter), fp16/bf16/fp32 and a head dim in ``head_dims``. ``kernel`` names
    the kernel in the messages (``ValueError`` for bad input, ``Unsupported`` for what it cannot run)."""
    from salad_bench.kernels.errors import Unsupported

    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, N, D) shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes disagree: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise Unsupported(f"the Triton {kernel} kernel needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); got {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Unsupported(f"the Triton {kernel} kernel supports float16, bfloat16 and float32, not {q.dtype}")
    if q.shape[-1] not in head_dims:
        raise Unsupported(f"the Triton {kernel} kernel supports head_dim {head_dims}, not {q.shape[-1]}")


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record a call on these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None,
                    q_index: torch.Tensor | None) -> None:
    """The forward-only extras of a block-sparse call, each where given: :func:`check_residual`,
    :func:`check_q_index`."""
    if residual is not None:
        check_residual(q, residual)
    if q_index is not None:
        check_q_index(q, q_index, k, v)


def check_residual(q: torch.Tensor, residual: torch.Tensor) -> None:
    """A residual the forward can add in its epilogue: q's shape, dtype and device; inference only."""
    if residual.shape != q.shape or residual.dtype != q.dtype or residual.device != q.device:
        raise ValueError(
            f"residual must match q: shape {tuple(q.shape)}, {q.dtype} on {q.device}; got shape "
            f"{tuple(residual.shape)}, {residual.dtype} on {residual.device}"
        )
    if residual.stride(-1) != 1:
        raise ValueError(f"residual's last dim must be contiguous (strides {residual.stride()}); pass residual.contiguous()")
    if needs_grad(q, residual):
        raise ValueError(
            "residual= is added in the forward's epilogue and has no backward; under autograd add the residual "
            "to the attention output outside (or run under torch.no_grad())"
        )


def check_q_index(q: torch.Tensor, q_index: torch.Tensor, *others: torch.Tensor) -> None:
    """A query index the forward can read q and write its output through: integer, ``(N,)``, on q's
    device, inference only (no gradient asked of q or ``others``). That it is a permutation is the
    caller's promise (checking it would cost a sort and a host sync every call); an index out of range
    is refused on the CPU, where it is cheap."""
    n = q.shape[2]
    if q_index.dtype not in (torch.int32, torch.int64) or tuple(q_index.shape) != (n,) or q_index.device != q.device:
        raise ValueError(
            f"q_index must be an int32/int64 permutation of the {n} tokens, shape ({n},), on {q.device}; got "
            f"{q_index.dtype} of shape {tuple(q_index.shape)} on {q_index.device}"
        )
    cheap = q_index.device.type == "cpu" and not torch.compiler.is_compiling()  # no device sync, no data guard
    if cheap and n and (int(q_index.min()) < 0 or int(q_index.max()) >= n):
        raise ValueError(f"q_index holds tokens outside 0..{n - 1}")
    if needs_grad(q, *others):
        raise ValueError(
            "q_index= reads q and writes the output through an index in the forward alone, which has no backward; "
            "under autograd gather q and the output outside (or run under torch.no_grad())"
        )


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (its index, or the current device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:  # asked once per device: a per-call cost otherwise
    return torch.cuda.get_device_properties(index).multi_processor_count


def autotuned(tuned, grid, args: tuple, consts: dict, fixed: dict) -> None:
    """``tuned[grid](*args, **consts)`` for a ``triton.autotune``-d kernel on a GPU. The interpreter has no
    timer to tune with: there its kernel runs once with ``fixed`` (constexprs such as BLOCK_M, and
    ``num_warps`` / ``num_stages``). ``grid`` is a tuple or a function of the launch's constexprs."""
    if not INTERPRET:
        tuned[grid](*args, **consts)
        return
    meta = {**consts, **fixed}
    tuned.fn[grid(meta) if callable(grid) else grid](*args, **meta)


_FITTED: dict = {}  # (kernel, constexprs, requested config) -> the config that fitted the card


def fitted(kernel, grid: tuple, args: tuple, consts: dict, cfg: dict) -> None:
    """:func:`launch` with the config ``cfg`` (``BLOCK``, ``num_warps``, ``num_stages``); where it overflows
    shared memory, retried with fewer stages, then smaller tiles. The config that fitted is remembered."""
    import triton

    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), tuple(sorted(consts.items())),
           tuple(sorted(cfg.items())))
    cur = dict(_FITTED.get(key, cfg))
    while True:
        c = dict(cur)
        nw, ns = c.pop("num_warps"), c.pop("num_stages")
        try:
            launch(kernel, grid, args, {**consts, **c}, {"num_warps": nw, "num_stages": ns})
            _FITTED[key] = cur
            return
        except triton.runtime.errors.OutOfResources:
            if cur["num_stages"] > 1:
                cur["num_stages"] -= 1
            elif cur["BLOCK"] > 16:
                cur["BLOCK"] //= 2
            else:
                raise


_COMPILED: dict = {}


_PLAIN = frozenset((int, bool, str, float))  # constexpr value types compared by value (others by identity)


def _spec(x) -> object:
    """The part of an argument that a compiled kernel depends on (raises TypeError for an unknown type)."""
    t = type(x)  # exact types first: this runs for every argument of every launch
    if t is int:
        return ("i", not x & 15, x == 1, -2**31 <= x < 2**31)
    if t is torch.Tensor:
        return (x.dtype, not x.data_ptr() & 15)
    if t is float:
        return "f"
    if isinstance(x, torch.Tensor):
        return (x.dtype, not x.data_ptr() & 15)
    if isinstance(x, bool):
        return ("b", x)
    if isinstance(x, int):
        return ("i", not x & 15, x == 1, -2**31 <= x < 2**31)
    if isinstance(x, float):
        return "f"
    if hasattr(x, "block_shape") and hasattr(x, "base"):  # a host-side tensor descriptor
        return ("d", x.base.dtype, tuple(x.block_shape), id(getattr(x, "layout", None)), not x.base.data_ptr() & 15,
                tuple(not s & 15 for s in x.shape), tuple(not s & 15 for s in x.strides))
    raise TypeError(type(x))


def _stream():
    """Triton's handle of the current CUDA stream (what ``kernel[grid]`` launches on)."""
    from triton.runtime.driver import driver

    return driver.active.get_current_stream(driver.active.get_current_device())


def _hooked(hook) -> bool:
    """Whether a profiler hook is set (Triton 3.6 keeps an empty hook chain when none is)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(kernel, grid: tuple, args: tuple, consts: dict, options: dict | None = None) -> None:
    """``kernel[grid](*args, **consts, **options)``, with the compiled kernel reused on later calls.
    ``consts`` are the constexpr parameters (hashable values, or objects kept alive and reused by identity,
    such as cached layouts); ``options`` the launch options (``num_warps``, ``num_stages``) of a Triton
    kernel."""
    from triton import knobs

    options = options or {}
    if not torch.cuda.is_available():  # the interpreter: nothing compiled to keep
        kernel[grid](*args, **consts, **options)
        return
    try:
        key = _key(kernel, args, consts, options)
    except TypeError:
        kernel[grid](*args, **consts, **options)
        return
    hit = _COMPILED.get(key)
    if hit is None or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
        ck = kernel[grid](*args, **consts, **options)
        # the constexprs in parameter order after the positional arguments: fixed by the key
        _COMPILED[key] = (ck, tuple(consts.get(p.name, p.default) for p in kernel.params[len(args):]))
        return
    _run(hit, grid, args)


def _key(kernel, args: tuple, consts: dict, options: dict) -> tuple:
    """What picks the compiled kernel for these arguments (raises TypeError for an unknown argument type)."""
    return (id(kernel), tuple(map(_spec, args)),
            tuple((k, v if type(v) in _PLAIN else id(v)) for k, v in consts.items()),
            tuple(options.items()), torch.cuda.current_device())


def _run(hit: tuple, grid: tuple, args: tuple) -> None:
    """Launch a cached ``(compiled kernel, constexpr values)`` through the kernel's launcher."""
    ck, tail = hit
    ck.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _stream(), ck.function,
           ck.packed_metadata, None, None, None, *args, *tail)


class Site:
    """One launch site whose caller already keys everything :func:`launch` keys on (dtypes, alignment,
    the integers' divisibility, constexprs, device), e.g. a pass built per input signature: the first
    call goes through :func:`launch`, later ones straight to the compiled kernel it kept."""

    __slots__ = ("kernel", "grid", "consts", "hit")

    def __init__(self, kernel, grid: tuple, consts: dict):
        self.kernel, self.grid, self.consts, self.hit = kernel, grid, consts, None

    def __call__(self, *args) -> None:
        from triton import knobs

        hit = self.hit
        if hit is None or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            launch(self.kernel, self.grid, args, self.consts)
            if torch.cuda.is_available():
                try:
                    self.hit = _COMPILED.get(_key(self.kernel, args, self.consts, {}))
                except TypeError:  # an argument type launch() does not key: every call takes its normal path
                    pass
            return
        _run(hit, self.grid, args)
