"""A tiny Wan config shared by the harness tests."""

from __future__ import annotations

# A Wan transformer small enough for float64 on the CPU (head_dim 16: below what the Triton kernels
# take, so these models run the torch paths); tests override num_layers where they need to.
WAN_TINY_16: dict = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)
