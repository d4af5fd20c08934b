"""Analytic FLOPs, throughput and MFU (CPU-testable; one convention for the whole project).

Forward attention: ``4 * B * H * Nq * Nk * D`` (QK^T and PV, two FLOPs per multiply-add); backward is
``2.5x`` forward (flash-attention's benchmark convention). "Dense-equivalent" TFLOP/s divides the
dense count by the measured time (it tracks speedup); "executed" TFLOP/s divides what the method
really computes (it tracks kernel quality).
"""

from __future__ import annotations

from salad_bench.methods.base import dense_flops

__all__ = ["dense_flops", "BACKWARD_FACTOR", "PEAK_BF16_TFLOPS", "peak_tflops", "tflops", "mfu"]

BACKWARD_FACTOR = 2.5

# Dense bf16 tensor-core peaks in TFLOP/s by vendor datasheet (no sparsity), keyed by a substring of
# torch.cuda.get_device_name(). Used only for MFU; speedups never depend on it.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
    "RTX 5090": 209.0,
}


def peak_tflops(card: str) -> float | None:
    """Datasheet bf16 peak for a card name, or None when the card is not in the table."""
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in card:
            return val
    return None


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def mfu(flops: float, ms: float, card: str) -> float | None:
    peak = peak_tflops(card)
    return None if peak is None else tflops(flops, ms) / peak
