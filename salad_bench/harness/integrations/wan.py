"""Registered attention methods inside diffusers' Wan2.1 transformer (``WanTransformer3DModel``).

:func:`install_attention` swaps the processor of every self-attention module (``blocks[i].attn1``)
for a :class:`SparseWanAttnProcessor` and registers one method instance per layer as a child module
``blocks[i].attn1.sparse_method``: SALAD's projection and gate are then ordinary parameters of the
model (they train, appear in ``state_dict()`` under ``blocks.<i>.attn1.sparse_method.*``, save and
load). Cross-attention (``attn2``) is never touched. :func:`restore_attention` puts the original
processors back and removes the added modules.

A method that asks for LoRA on the projections (``wants_projection_lora``, e.g. ``sparse_lora``) gets
peft LoRA layers on ``attn1``'s ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (its roles q, k, v, out;
:mod:`harness.integrations.lora`), installed per layer beside the method and handed to it
(``attach_projection_lora``: its trainable parameters and its FLOPs); restoring removes them.
Fused projections (``to_qkv``) cannot take LoRA on q, k or v: such a request raises ``Unsupported``.

The processor reproduces diffusers' ``WanAttnProcessor`` (diffusers 0.33-0.42) exactly up to the
attention call: Q/K/V projections (fused or not), RMS qk-norm across heads (on the ``(B, N, C)``
tensors, before the head split), the head split, Wan's interleaved 3D RoPE on ``(B, N, H, D)``;
then hands the method ``q, k, v`` as ``(B, H, N, D)`` views (``transpose(1, 2)``, no copy: the
same tensors diffusers' native backend gives SDPA) and applies ``to_out`` as diffusers does. With
method ``full`` on the CPU the model output is bit-identical to the stock processor.

Grid capture: the transformer forward turns ``hidden_states`` ``(B, C, F, H, W)`` into tokens with a
``patch_size`` conv, so the token grid is ``(F // p_t, H // p_h, W // p_w)``. A forward pre-hook on
the model (``with_kwargs=True``: pipelines call it with keywords) reads that shape before every
forward and stores the grid in a state object shared by the layer processors; the same hook asks each
layer's method whether it runs dense at this layer and step (:meth:`AttentionMethod.dense_at`, its
warm-up). Each method call gets ``AttnContext(grid=..., layer=i, num_layers=L, step=..., num_steps=...,
dense=..., hidden_states=x)``; inside a compiled block ``layer`` and ``step`` are None (an integer read
there would compile one graph per layer and per step: every block shares one graph, two with a dense
warm-up). Here ``x`` is the self-attention input ``(B, N, C)`` (the normed, modulated block input that Q/K/V are
projected from). A method that sets ``wants_unrotated_qk`` (SALAD's linear branch, which applies its
own RoPE) also gets ``q_unrotated``/``k_unrotated``: ``(B, H, N, D)`` views of q and k after qk-norm and
before Wan's RoPE, the tensors the processor already holds (no copy; they stay alive for the call).

Token order: when every installed method poses its problem in one token order of the grid
(:meth:`AttentionMethod.token_order`: ``sta``'s tiles, ``vsa``'s cubes), the blocks run in that order, as
FastVideo runs STA: forward hooks write the patch embedding's output in that order, permute the rotary
tables alike and put ``proj_out``'s output back into raster order before the unpatchify (every module
in between is token-wise), and each call gets ``AttnContext(token_order=perm)``, so the method gathers
nothing per layer. Three index_selects per forward instead of two k/v gathers per layer. A per-token
timestep (Wan 2.2 TI2V) keeps raster order.

The sampling step is not visible to the transformer: samplers call :func:`set_step` before each
step (or pass :func:`step_callback` as a pipeline's ``callback_on_step_end``), so methods that keep
the first steps dense know where they are.

Timing: inside :func:`time_attention` every method call is bracketed by CUDA events (wall clock on
the CPU); ``timer.take_ms()`` sums the calls since the last take. It times the method call only
(selection + sparse kernel + any extra branch), not the projections, qk-norm or RoPE.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from salad_bench.harness.integrations import require_diffusers
from salad_bench.methods import AttentionMethod, AttnContext, Unsupported, create_method

__all__ = [
    "METHOD_ATTR",
    "AttentionTimer",
    "SparseWanAttnProcessor",
    "WanAttnState",
    "attention_state",
    "cast_like_diffusers",
    "install_attention",
    "installed_methods",
    "new_transformer",
    "restore_attention",
    "set_step",
    "step_callback",
    "time_attention",
]

METHOD_ATTR = "sparse_method"
_STATE_ATTR = "_sparse_attn_state"
# The projection of each role a method may ask LoRA on (methods.base.PROJECTIONS), in diffusers' WanAttention.
PROJECTION_MODULES = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}

MethodFactory = Callable[..., AttentionMethod]


class AttentionTimer:
    """Per-call timing of the method calls inside forwards (CUDA events, or perf_counter on the CPU), and
    of the calls of the methods they are built on (``inner``: SALAD's sparse branch), kept apart."""

    def __init__(self) -> None:
        self._calls: dict[bool, list[tuple[Any, Any]]] = {False: [], True: []}
        self._open: list[Any] = []  # started inner calls (hooks carry no token)

    def start(self, device: torch.device) -> Any:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token: Any, device: torch.device, inner: bool = False) -> None:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._calls[inner].append((token, ev))
        else:
            self._calls[inner].append((token, time.perf_counter()))

    def push(self, device: torch.device) -> None:
        self._open.append(self.start(device))

    def pop(self, device: torch.device) -> None:
        self.stop(self._open.pop(), device, inner=True)

    def take_calls_ms(self, inner: bool = False) -> list[float]:
        """Milliseconds of each call since the last take (synchronises the device); ``inner``: of the calls
        of the methods the installed ones are built on."""
        calls, self._calls[inner] = self._calls[inner], []
        if calls and isinstance(calls[0][0], torch.cuda.Event):
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in calls]
        return [(b - a) * 1e3 for a, b in calls]

    def take_ms(self, inner: bool = False) -> float:
        """Summed milliseconds of the calls since the last take."""
        return float(sum(self.take_calls_ms(inner)))


@dataclass
class WanAttnState:
    """Shared by the processors of one model: what the forward knows beyond the tensors."""

    patch_size: tuple[int, int, int]
    num_layers: int
    num_steps: int = 1
    step: int = 0
    grid: tuple[int, int, int] | None = None
    timer: AttentionTimer | None = None
    originals: list[Any] = field(default_factory=list)
    loras: list[Any] = field(default_factory=list)  # InstalledLoRA per layer that asked for it
    processors: list[Any] = field(default_factory=list)  # (SparseWanAttnProcessor, its method) per layer
    hook: Any = None
    order_hooks: list[Any] = field(default_factory=list)  # patch_embedding, rope, proj_out (token order)
    # (perm, inverse) when this forward runs in the methods' own token order (see _shared_order), else None
    order: tuple[torch.Tensor, torch.Tensor] | None = None
    orders: dict[Any, Any] = field(default_factory=dict)  # (grid, device) -> (perm, inverse) or None


def _wan_class():
    require_diffusers()
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def _check_wan(model: torch.nn.Module) -> None:
    cls = _wan_class()
    if not isinstance(model, cls):
        raise TypeError(f"expected a diffusers WanTransformer3DModel, got {type(model).__name__}")


def attention_state(model: torch.nn.Module) -> WanAttnState | None:
    """The installed state of ``model``, or None when no method is installed."""
    return model.__dict__.get(_STATE_ATTR)


def _grid_pre_hook(state: WanAttnState):
    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        state.order = None
        if x is None or x.dim() != 5:
            state.grid = None
            return None
        _, _, f, h, w = x.shape
        p_t, p_h, p_w = state.patch_size
        state.grid = (f // p_t, h // p_h, w // p_w)
        for proc, method in state.processors:
            proc.dense = method.dense_at(proc.layer, state.step)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        # a per-token timestep (Wan 2.2 TI2V) conditions tokens by raster position: no reordering
        if not (torch.is_tensor(timestep) and timestep.dim() > 1):
            state.order = _shared_order(state, x.device)
        return None

    return hook


def _shared_order(state: WanAttnState, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(perm, inverse) when every installed method poses its problem in one token order of this grid
    (:meth:`AttentionMethod.token_order`, e.g. ``sta``'s tiles), else None. Decided once per grid and device."""
    key = (state.grid, str(device))
    if key not in state.orders:
        n = math.prod(state.grid)
        orders = [m.token_order(state.grid, n, device) for _, m in state.processors]
        first = orders[0] if orders else None
        same = first is not None and all(o is not None and torch.equal(o.to(first.device), first) for o in orders)
        state.orders[key] = (first.to(device), torch.argsort(first).to(device)) if same else None
    return state.orders[key]


def _order_hooks(model: torch.nn.Module, state: WanAttnState) -> list[Any]:
    """Forward hooks that run the blocks in the methods' shared token order (state.order, when set):
    the patch embedding's output is written in that order (the forward's ``flatten(2)`` then reads the
    sequence permuted), the rotary tables are permuted alike, and ``proj_out``'s output is put back into
    raster order before the unpatchify. Every module between them is token-wise."""

    def patches(module, args, out):
        if state.order is None:
            return None
        return out.flatten(2).index_select(2, state.order[0]).view_as(out)

    def rope(module, args, out):
        if state.order is None:
            return None
        return tuple(t.index_select(1, state.order[0]) for t in out)

    def unpermute(module, args, out):
        if state.order is None:
            return None
        return out.index_select(1, state.order[1])

    return [model.patch_embedding.register_forward_hook(patches), model.rope.register_forward_hook(rope),
            model.proj_out.register_forward_hook(unpermute)]


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Verbatim from diffusers' WanAttnProcessor (interleaved pairs, x: (B, N, H, D)).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SparseWanAttnProcessor:
    """Wan self-attention with the core attention delegated to ``attn.sparse_method``.

    A plain object (not a module): the method lives on the attention module, so there is exactly
    one owner of its parameters.
    """

    def __init__(self, layer: int, state: WanAttnState) -> None:
        self.layer = layer
        self.state = state
        self.dense = False  # the method's dense_at(layer, step), set before each forward (_grid_pre_hook)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SparseWanAttnProcessor is for self-attention (attn1): no encoder states, no mask")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        method: AttentionMethod = getattr(attn, METHOD_ATTR)
        unrotated = None
        if rotary_emb is not None:
            if getattr(method, "wants_unrotated_qk", False):  # references to the tensors before rotation: no copy
                unrotated = (query.transpose(1, 2), key.transpose(1, 2))
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        st = self.state
        grid = st.grid if st.grid is not None and math.prod(st.grid) == query.shape[1] else None
        # Compiled, the layer and step stay out of the graph (one graph for every layer and step, or two
        # with a dense warm-up): the warm-up phase decided before the forward is all the method gets.
        compiling = torch.compiler.is_compiling()
        ctx = AttnContext(
            grid=grid,
            layer=None if compiling else self.layer,
            num_layers=st.num_layers,
            step=None if compiling else st.step,
            num_steps=st.num_steps,
            dense=self.dense,
            hidden_states=hidden_states,
            q_unrotated=None if unrotated is None else unrotated[0],
            k_unrotated=None if unrotated is None else unrotated[1],
            token_order=None if st.order is None or grid is None else st.order[0],
        )
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, N, D) views
        timer = st.timer
        token = timer.start(q.device) if timer is not None else None
        out = method(q, k, v, ctx)
        if timer is not None:
            timer.stop(token, q.device)

        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def install_attention(
    model: torch.nn.Module,
    method: str | MethodFactory,
    *,
    sparsity: float = 0.0,
    num_steps: int = 1,
    method_dtype: torch.dtype | None = None,
    layer_offset: int = 0,
    num_layers: int | None = None,
    **knobs: Any,
) -> list[AttentionMethod]:
    """Put a registered method into every self-attention layer of a ``WanTransformer3DModel``.

    ``method`` is a registry name (``knobs`` override its config) or a factory
    ``f(num_heads=, head_dim=, sparsity=, **knobs) -> AttentionMethod`` (tests, stubs). Each layer gets
    its own instance, registered as ``blocks[i].attn1.sparse_method`` and moved to the layer's device
    and to ``method_dtype`` (default: the layer's weight dtype). A method already installed is
    restored first. Returns the instances in layer order.

    ``layer_offset`` / ``num_layers``: the blocks are layers ``layer_offset ...`` of a model of
    ``num_layers`` (default: the model's own blocks, from 0), for a model built with fewer blocks than the
    one it stands for; methods see those layer indices (dense warm-up layers follow them).
    """
    _check_wan(model)
    blocks = list(model.blocks)
    depth = len(blocks) if num_layers is None else num_layers
    if layer_offset < 0 or layer_offset + len(blocks) > depth:
        raise ValueError(f"layer_offset={layer_offset} with {len(blocks)} blocks does not fit a model of {depth} layers")
    if attention_state(model) is not None:
        restore_attention(model)
    state = WanAttnState(patch_size=tuple(model.config.patch_size), num_layers=depth, num_steps=num_steps)
    build = (lambda **kw: create_method(method, **kw)) if isinstance(method, str) else method
    instances: list[AttentionMethod] = []
    try:
        for i, block in enumerate(blocks):
            attn = block.attn1
            heads = attn.heads
            m = build(num_heads=heads, head_dim=attn.inner_dim // heads, sparsity=sparsity, **knobs)
            weight = attn.to_q.weight
            m = m.to(device=weight.device, dtype=method_dtype or weight.dtype)
            m.train(model.training)
            attn.add_module(METHOD_ATTR, m)
            state.originals.append(attn.processor)
            proc = SparseWanAttnProcessor(layer_offset + i, state)
            proc.dense = m.dense_at(proc.layer, state.step)
            attn.set_processor(proc)
            state.processors.append((proc, m))
            instances.append(m)
            _install_projection_lora(attn, m, state)
    except BaseException:
        _undo(blocks, state)
        raise
    state.hook = model.register_forward_pre_hook(_grid_pre_hook(state), with_kwargs=True)
    state.order_hooks = _order_hooks(model, state)
    model.__dict__[_STATE_ATTR] = state
    return instances


def _install_projection_lora(attn: torch.nn.Module, method: AttentionMethod, state: WanAttnState) -> None:
    spec = getattr(method, "wants_projection_lora", None)
    if spec is None:
        return
    if attn.fused_projections and set(spec.targets) & {"q", "k", "v"}:
        raise Unsupported(f"{method.name}: LoRA on q, k, v needs separate to_q/to_k/to_v; this model fused them "
                          "(to_qkv): unfuse with model.unfuse_qkv_projections()")
    from salad_bench.harness.integrations.lora import install_lora

    installed = install_lora(attn, tuple(PROJECTION_MODULES[t] for t in spec.targets), spec.rank, spec.alpha)
    state.loras.append(installed)
    method.attach_projection_lora(installed.parameters, installed.features)


def _undo(blocks: list[torch.nn.Module], state: WanAttnState) -> None:
    if state.loras:
        from salad_bench.harness.integrations.lora import remove_lora

        for installed in state.loras:
            remove_lora(installed)
            method = installed.module._modules.get(METHOD_ATTR)
            if method is not None:
                method.attach_projection_lora(None)
        state.loras.clear()
    for block, proc in zip(blocks, state.originals, strict=False):
        block.attn1.set_processor(proc)
    for block in blocks:
        if METHOD_ATTR in block.attn1._modules:
            del block.attn1._modules[METHOD_ATTR]


def restore_attention(model: torch.nn.Module) -> None:
    """Undo :func:`install_attention`: original processors back, ``sparse_method`` modules removed."""
    state = attention_state(model)
    if state is None:
        return
    _undo(list(model.blocks), state)
    if state.hook is not None:
        state.hook.remove()
    for h in state.order_hooks:
        h.remove()
    del model.__dict__[_STATE_ATTR]


def installed_methods(model: torch.nn.Module) -> list[AttentionMethod]:
    """The method instances in layer order (empty when none is installed)."""
    if attention_state(model) is None:
        return []
    return [block.attn1._modules[METHOD_ATTR] for block in model.blocks]


def _state_or_raise(model: torch.nn.Module) -> WanAttnState:
    state = attention_state(model)
    if state is None:
        raise RuntimeError("no attention method is installed on this model; call install_attention first")
    return state


def set_step(model: torch.nn.Module, step: int, num_steps: int | None = None) -> None:
    """Tell the installed methods which sampling step the next forwards belong to."""
    state = _state_or_raise(model)
    if num_steps is not None:
        state.num_steps = num_steps
    if not 0 <= step < max(state.num_steps, 1):
        raise ValueError(f"step={step} is outside [0, num_steps={state.num_steps})")
    state.step = step


def step_callback(model: torch.nn.Module) -> Callable[..., dict]:
    """A diffusers ``callback_on_step_end`` that advances the step after each denoising step.

    Call ``set_step(model, 0, num_steps)`` before the pipeline; the callback sets step ``i + 1``.
    """

    def callback(pipe, i: int, t, callback_kwargs: dict) -> dict:
        state = _state_or_raise(model)
        state.step = min(i + 1, max(state.num_steps - 1, 0))
        return {}

    return callback


@contextlib.contextmanager
def time_attention(model: torch.nn.Module) -> Iterator[AttentionTimer]:
    """Time every method call of forwards run inside the block, and apart the calls of the methods they
    are built on (see :class:`AttentionTimer`)."""
    state = _state_or_raise(model)
    timer = AttentionTimer()
    state.timer = timer
    # the methods an installed method is built on (SALAD's sparse branch) are timed too, as inner calls
    handles = []
    for _proc, method in state.processors:
        for child in method.children():
            if isinstance(child, AttentionMethod):
                handles.append(child.register_forward_pre_hook(lambda _m, args: timer.push(args[0].device)))
                handles.append(child.register_forward_hook(lambda _m, args, _out: timer.pop(args[0].device)))
    try:
        yield timer
    finally:
        state.timer = None
        for h in handles:
            h.remove()


# -- building models ------------------------------------------------------------------------------


def cast_like_diffusers(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters and buffers to ``dtype`` except the modules diffusers keeps in fp32
    (``_keep_in_fp32_modules``: rope, time_embedder, scale_shift_table, norm1/2/3), as
    ``from_pretrained(torch_dtype=...)`` does."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point():
                continue
            target = torch.float32 if dtype != torch.float32 and any(k in name for k in keep) else dtype
            if p.dtype != target:
                p.data = p.data.to(target)
    return model


def new_transformer(
    config: dict[str, Any], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` with random weights, created directly on ``device`` in ``dtype``
    (default-dtype and device contexts: no fp32 copy on the host), fp32 modules kept as diffusers does,
    in eval mode with gradients off."""
    cls = _wan_class()
    prev = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(prev)
    cast_like_diffusers(model, dtype)
    return model.eval().requires_grad_(False)
