"""A Wan transformer sharded for a full fine-tune on several GPUs: FSDP2 per block, then the root.

    model = MiniWan(cfg)                       # or a diffusers WanTransformer3DModel (real Wan2.1 weights)
    install_attention(transformer, "salad", sparsity=0.9)   # the method in every block first
    shard_for_finetune(model)                  # under torchrun, after init_process_group
    opt = torch.optim.AdamW(model.parameters(), ...)

Each transformer block becomes one FSDP2 unit (``torch.distributed.fsdp.fully_shard``): its parameters,
gradients and optimiser states live 1/G on each rank, and a block's full weights exist only while it
runs (all-gathered before, freed after). The root wraps what is left (patch and time embeddings, the
output head, MiniWan's class embedding). The sparse method sits inside its block's ``attn1``, so its own
parameters (SALAD's linear branch and gate) are sharded with the block. With ``checkpoint`` every block's
activations are recomputed in the backward (diffusers' gradient checkpointing, non-reentrant), so one
block's activations are alive at a time; a method whose forward changes its own state would see each call
twice. ``mp`` is the compute dtype (bf16: parameters all-gathered in bf16, gradients reduced in fp32, the
master weights and AdamW states stay fp32). docs/SCALE_OUT.md is the recipe and its memory arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["full_state_dict", "shard_for_finetune", "transformer_of"]


def transformer_of(model: nn.Module) -> nn.Module:
    """The Wan transformer inside ``model``: the model itself, or its ``transformer`` (MiniWan)."""
    for m in (model, getattr(model, "transformer", None)):
        if m is not None and isinstance(getattr(m, "blocks", None), nn.ModuleList):
            return m
    raise ValueError(f"{type(model).__name__} has no transformer blocks (a .blocks ModuleList, or .transformer.blocks)")


def shard_for_finetune(
    model: nn.Module,
    mesh=None,
    *,
    checkpoint: bool = True,
    mp: torch.dtype | None = torch.bfloat16,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over ``mesh`` (default: all ranks of the default process group,
    on this rank's device type) and return it.

    ``checkpoint``: activation checkpointing per block. ``mp``: parameter dtype in forward and backward
    (None: the parameters' own); gradients are reduced in fp32. ``reshard_after_forward``: free a block's
    gathered weights after its forward (ZeRO-3; False keeps them until the backward, ZeRO-2-like, more
    memory, one all-gather less per block).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not torch.distributed.is_initialized():
        raise ValueError("shard_for_finetune needs the process group: start under torchrun and call "
                         "torch.distributed.init_process_group first (harness.quality.train.init_distributed)")  # fmt: skip
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        kind = next(model.parameters()).device.type
        mesh = init_device_mesh(kind, (torch.distributed.get_world_size(),))
    transformer = transformer_of(model)
    if checkpoint:
        transformer.enable_gradient_checkpointing()
    policy = MixedPrecisionPolicy(param_dtype=mp, reduce_dtype=torch.float32 if mp is not None else None)
    for block in transformer.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root keeps its parameters gathered after forward: the backward needs them first anyway
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded ``model`` on rank 0, on the CPU, with the keys of the
    unsharded model (empty on the other ranks): what rank 0 saves as the fine-tuned checkpoint. Every rank
    must call it (it all-gathers). The resumable training state is better saved sharded
    (``torch.distributed.checkpoint``, docs/SCALE_OUT.md)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
