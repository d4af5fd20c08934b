"""Metrics: VBench's temporal-flickering formula by hand, PSNR/SSIM, val loss and sampler determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from salad_bench.harness.quality.data import VideoSpec
from salad_bench.harness.quality.metrics import (
    fidelity,
    temporal_flickering,
    temporal_flickering_videos,
    to_uint8,
    val_loss,
)
from salad_bench.harness.quality.sampler import euler_sample, make_noise, timesteps


def test_temporal_flickering_matches_a_hand_computation_of_vbench_formula():
    # VBench (vbench/temporal_flickering.py): per consecutive pair np.mean(cv2.absdiff(float32, float32)),
    # then (255 - mean over pairs) / 255.
    f0 = np.array([[[0, 0, 0], [10, 20, 30]], [[255, 255, 255], [1, 2, 3]]], dtype=np.uint8)
    f1 = np.array([[[3, 0, 0], [10, 26, 30]], [[250, 255, 255], [1, 2, 3]]], dtype=np.uint8)
    f2 = np.array([[[3, 0, 0], [10, 26, 30]], [[250, 255, 255], [1, 2, 15]]], dtype=np.uint8)
    pair1 = (3 + 6 + 5) / 12  # |f1 - f0| summed over the 12 values, mean
    pair2 = 12 / 12
    expected = (255.0 - (pair1 + pair2) / 2) / 255.0
    assert temporal_flickering(np.stack([f0, f1, f2])) == pytest.approx(expected, abs=1e-7)  # float32 means, as VBench


def test_temporal_flickering_static_is_one_and_uses_uint8_frames():
    still = torch.zeros(2, 3, 5, 8, 8)
    assert temporal_flickering_videos(still) == 1.0
    flip = torch.full((1, 3, 4, 8, 8), -1.0)
    flip[:, :, 1::2] = 1.0  # black/white alternation: MAE 255 per pair
    assert temporal_flickering_videos(flip) == pytest.approx(0.0)
    assert to_uint8(flip).shape == (1, 4, 8, 8, 3)


def test_temporal_flickering_needs_two_frames():
    with pytest.raises(ValueError):
        temporal_flickering(np.zeros((1, 4, 4, 3), np.uint8))


def test_fidelity_identical_and_noisy():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 4, 16, 16, generator=g) * 2 - 1
    same = fidelity(ref, ref)
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0)
    noisy = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    f = fidelity(noisy, ref)
    mse01 = float((((noisy + 1) / 2 - (ref + 1) / 2) ** 2).mean())
    assert f["psnr"] == pytest.approx(10 * math.log10(1 / mse01), abs=0.2)
    assert 0 < f["ssim"] < 1


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, labels):
        return self.w * x + labels.view(-1, 1, 1, 1, 1).float() * 0.01


def test_val_loss_is_deterministic_and_exact_for_a_perfect_model():
    spec = VideoSpec(frames=2, height=4, width=4, patch=(1, 1, 1))
    x0 = torch.zeros(3, *spec.shape)
    labels = torch.tensor([0, 1, 2])
    m = _Linear()
    a = val_loss(m, x0, labels, t_grid=(0.5,), batch_size=2)
    b = val_loss(m, x0, labels, t_grid=(0.5,), batch_size=3)
    assert a == pytest.approx(b, rel=1e-6)

    class Perfect(torch.nn.Module):  # with x0 = 0, x_t = t*noise and the target velocity is noise
        def forward(self, x, t, labels):
            return x / t.view(-1, 1, 1, 1, 1)

    assert val_loss(Perfect(), x0, labels, t_grid=(0.3, 0.7)) == pytest.approx(0.0, abs=1e-10)


def test_euler_sampler_is_seeded_and_recovers_a_constant_flow():
    spec = VideoSpec(frames=2, height=4, width=4, patch=(1, 1, 1))
    n1, n2 = make_noise(2, spec, 5), make_noise(2, spec, 5)
    assert torch.equal(n1, n2) and torch.equal(make_noise(1, spec, 5, offset=1)[0], n1[1])
    target = torch.full_like(n1, 0.25)

    def velocity(x, t, labels):  # exact velocity of the straight path from target to n1
        return n1 - target

    steps = []
    out = euler_sample(velocity, n1, torch.zeros(2, dtype=torch.long), num_steps=4, on_step=steps.append)
    assert torch.allclose(out, target, atol=1e-5)
    assert steps == [0, 1, 2, 3]
    assert timesteps(2).tolist() == [1.0, 0.5, 0.0]
