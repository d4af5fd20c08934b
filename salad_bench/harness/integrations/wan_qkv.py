"""Q/K/V as a Wan2.1 self-attention layer makes them: the third input kind (``--qkv wan``).

A diffusers ``WanTransformer3DModel`` with the workload's heads and head_dim and seeded random weights
runs on a seeded random latent of the workload's grid (1x2x2 patchify), a random text embedding and
t=500; the first block's self-attention hands its q, k, v to a capturing method, i.e. exactly what an
installed attention method sees: after the projections, the RMS qk-norm across heads and Wan's 3D
RoPE, in ``(B, H, N, D)`` and in the memory layout the model hands them over: views of token-major
``(B, N, H, D)`` buffers, not contiguous tensors (the other kinds are contiguous), so a method or kernel
timed on this kind pays what it pays inside the model for its layout. Only block 0 runs (the forward
stops there).

Why a third kind: kernel speed can depend on the score statistics. ``random`` gives a few nats of
logit spread per row; ``video`` (its default ``sharpness``) gives rows that span hundreds of nats,
sharper than this layer; a random-weight Wan layer sits near ``random`` (qk-norm makes every token's
q and k unit-RMS, so rows span about 5 to 10 nats). Trained Wan weights give peaked rows between the
two (use ``--weights`` runs for those).
"""

from __future__ import annotations

from typing import Any

import torch

from salad_bench.methods.base import AttentionMethod, AttnContext, MethodConfig

__all__ = ["wan_layer_qkv"]


class _Captured(Exception):
    pass


class _Capture(AttentionMethod):
    family = "full"

    def __init__(self, sink: dict, **kw: Any) -> None:
        super().__init__(MethodConfig(), name="qkv_capture", **kw)
        self._sink = sink

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        # copies in the layout the model hands a method: (B, H, N, D) views of token-major buffers
        self._sink["qkv"] = tuple(x.detach().clone(memory_format=torch.preserve_format) for x in (q, k, v))
        raise _Captured


def wan_layer_qkv(
    model_config: dict, grid: tuple[int, int, int], heads: int, head_dim: int, *, batch: int = 1, seed: int = 0,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, text_len: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` ``(batch, heads, T*H*W, head_dim)`` from block 0 of a random-weight Wan2.1 DiT built
    from ``model_config`` (a ``WanTransformer3DModel`` config) with ``heads`` x ``head_dim`` and one layer."""
    from salad_bench.harness.integrations.wan import install_attention, new_transformer

    config = {**model_config, "num_attention_heads": heads, "attention_head_dim": head_dim, "num_layers": 1}
    model = new_transformer(config, device=device, dtype=dtype, seed=seed)
    sink: dict = {}
    install_attention(model, lambda **kw: _Capture(sink, num_heads=kw["num_heads"], head_dim=kw["head_dim"]))
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    t, h, w = grid
    lat = torch.randn(batch, config["in_channels"], t, 2 * h, 2 * w, generator=g).to(device, dtype)
    text = torch.randn(batch, text_len, config["text_dim"], generator=g).to(device, dtype)
    try:
        with torch.no_grad():
            model(hidden_states=lat, timestep=torch.full((batch,), 500.0, device=device),
                  encoder_hidden_states=text, return_dict=False)
    except _Captured:
        pass
    del model
    if "qkv" not in sink:
        raise RuntimeError("the Wan layer never called its self-attention")
    return sink["qkv"]
