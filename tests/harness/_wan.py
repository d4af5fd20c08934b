"""A tiny Wan config shared by the harness tests."""

from __future__ import annotations

# A Wan transformer small enough for float64 on the CPU (head_dim 16: below what the Triton kernels
# take, so these models run the torch paths); tests override num_layers where they need to.
WAN_TINY_16: dict = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)


def wan_inputs(frames: int = 3, h: int = 16, w: int = 16, seed: int = 1, dtype=None) -> dict:
    """Seeded forward inputs for a WAN_TINY_16 model (latent 4 x frames x h x w, 8 text tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    return {
        "hidden_states": torch.randn(1, 4, frames, h, w, generator=g).to(dtype),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g).to(dtype),
        "return_dict": False,
    }


def run_model(model, inputs: dict):
    """The model's output tensor, without gradients."""
    import torch

    with torch.no_grad():
        return model(**inputs)[0]


def assert_compiled_trains_like_eager(model, ref_model, inputs: dict) -> None:
    """``model``'s blocks compiled (inductor, fullgraph) give ``ref_model``'s output and gradients (eager,
    same weights): forward within 1e-4, every parameter's gradient within 1e-3."""
    import torch

    for block in model.blocks:
        block.compile(fullgraph=True)
    out, ref = model(**inputs)[0], ref_model(**inputs)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (pn, p), (_, r) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        if r.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-3, atol=1e-5, msg=pn)
