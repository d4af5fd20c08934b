"""LoRA adapters (``peft``) on a model's attention projections, for methods that ask for them
(``AttentionMethod.wants_projection_lora``, e.g. ``sparse_lora``).

:func:`install_lora` runs ``peft.inject_adapter_in_model`` with a ``LoraConfig`` on *one* attention
module (so only that module's named linears are adapted, never a cross-attention or FFN layer that
shares a name): each target becomes a ``peft`` ``lora.Linear`` whose ``base_layer`` is the original
``nn.Linear``, with PEFT's default initialisation (``A`` kaiming-uniform, ``B`` zero: the output is
unchanged until ``B`` trains), dropout 0 and scale ``alpha / rank``. peft freezes every other parameter
of the module it adapts; :func:`install_lora` keeps only the adapted layers' base weights frozen (LoRA's
premise) and puts the other flags back, and :func:`remove_lora` restores the module exactly: the
original linears, every ``requires_grad`` flag, no ``peft_config`` attribute.

peft is optional: without it :func:`install_lora` raises :class:`Unsupported` (the harness writes a
skipped row) with the command that installs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from salad_bench.methods import Unsupported

__all__ = ["ADAPTER", "InstalledLoRA", "install_lora", "remove_lora", "require_peft"]

ADAPTER = "default"  # peft's own default name: state_dict keys read ``<layer>.lora_A.default.weight``


def require_peft():
    """Import and return ``peft``, or raise :class:`Unsupported` that says how to get it."""
    try:
        import peft
    except ImportError as exc:
        raise Unsupported(
            "LoRA on the projections needs peft, which is not installed here; `pip install peft` (or "
            "`pip install 'salad-bench[diffusers]'`); on an offline machine carry the wheels of peft and accelerate"
        ) from exc
    return peft


@dataclass
class InstalledLoRA:
    """What :func:`install_lora` changed on one module, so that :func:`remove_lora` can undo it."""

    module: nn.Module
    names: tuple[str, ...]
    parameters: list[nn.Parameter]  # the LoRA factors, in target order (A, B per layer)
    features: list[tuple[int, int]]  # (in_features, out_features) of each adapted layer
    requires_grad: dict[int, bool] = field(default_factory=dict)  # flags of the module's parameters before
    had_peft_config: bool = False


def install_lora(module: nn.Module, names: tuple[str, ...], rank: int, alpha: float) -> InstalledLoRA:
    """Adapt the ``nn.Linear`` submodules ``names`` of ``module`` (e.g. ``to_q``, ``to_out.0``) with LoRA."""
    peft = require_peft()
    for name in names:
        layer = module.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"LoRA target {name!r} is a {type(layer).__name__}, not an nn.Linear")
        if rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"rank={rank} is more than {name}'s width ({layer.in_features} -> {layer.out_features})")
    flags = {id(p): p.requires_grad for p in module.parameters()}
    bases = {id(p) for name in names for p in module.get_submodule(name).parameters()}
    had = hasattr(module, "peft_config")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(names), bias="none")
    peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    params: list[nn.Parameter] = []
    features: list[tuple[int, int]] = []
    for name in names:
        layer = module.get_submodule(name)
        base = layer.get_base_layer()
        params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        features.append((base.in_features, base.out_features))
    for p in module.parameters():  # peft froze the whole module: only the adapted layers' bases stay frozen
        if id(p) in flags and id(p) not in bases:
            p.requires_grad_(flags[id(p)])
    return InstalledLoRA(module, tuple(names), params, features, flags, had)


def remove_lora(installed: InstalledLoRA) -> None:
    """Put the original linears back and every ``requires_grad`` flag as it was before :func:`install_lora`."""
    from peft.tuners.lora import LoraLayer

    module = installed.module
    for name in installed.names:
        layer = module.get_submodule(name)
        if isinstance(layer, LoraLayer):
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, layer.get_base_layer())
    for p in module.parameters():
        if id(p) in installed.requires_grad:
            p.requires_grad_(installed.requires_grad[id(p)])
    if not installed.had_peft_config and "peft_config" in module.__dict__:
        del module.__dict__["peft_config"]
