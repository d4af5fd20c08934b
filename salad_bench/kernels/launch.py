"""A cheaper relaunch of a compiled Triton/Gluon kernel, for launches whose host time shows in the timing.

``kernel[grid](...)`` spends its host time binding arguments, building the specialisation key (for a
tensor descriptor, the string of its shared-memory layout) and looking the kernel up. On the device
machine's host that is 40-50 us per launch (docs/lab/kernels-notes.md, run 12), as long as the linear branch's
kernels themselves. :func:`launch` keeps the compiled kernel under a key of everything Triton 3.6
specialises on (dtypes, 16-byte alignment of pointers, integers divisible by 16 or equal to 1, the
constexpr values and launch options) and calls its launcher directly on a hit. The first launch for a key,
any argument type it does not know, and launches under a profiler hook go through ``kernel[grid]``.
"""

from __future__ import annotations

import torch

__all__ = ["Site", "launch"]

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
