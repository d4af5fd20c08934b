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


def _old_euler_sample(model, noise, labels, num_steps):
    """The sampler as it was before guidance: one conditional forward per step."""
    ts = timesteps(num_steps)
    x = noise.float()
    for i in range(num_steps):
        x = x + (ts[i + 1] - ts[i]).item() * model(x, ts[i].expand(x.shape[0]), labels).float()
    return x.clamp(-1, 1)


class _FakeWan:
    """A velocity that depends on x, t and the label (the null label 9 included); counts forwards."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, t, labels):
        self.calls.append(labels.clone())
        shift = labels.float().view(-1, 1, 1, 1, 1)
        return 0.3 * x * t.view(-1, 1, 1, 1, 1) - 0.05 * shift + 0.1


def test_euler_sample_guidance_one_is_the_old_sampler_and_g_is_the_cfg_formula():
    spec = VideoSpec(frames=2, height=4, width=4, patch=(1, 1, 1))
    noise, labels = make_noise(3, spec, 11), torch.tensor([0, 4, 7])
    fake = _FakeWan()
    plain = euler_sample(fake, noise, labels, num_steps=5)
    assert torch.equal(plain, _old_euler_sample(_FakeWan(), noise, labels, 5)) and len(fake.calls) == 5
    assert torch.equal(euler_sample(fake, noise, labels, num_steps=5, guidance=1.0, null_label=9), plain)
    g, null, ts = 4.0, 9, timesteps(5)
    x = noise.clone()  # by hand: v_null + g (v_cond - v_null), one Euler step at a time
    for i in range(5):
        t = ts[i].expand(3)
        v_cond, v_null = fake(x, t, labels), fake(x, t, torch.full_like(labels, null))
        x = x + (ts[i + 1] - ts[i]).item() * (v_null + g * (v_cond - v_null))
    guided = _FakeWan()
    out = euler_sample(guided, noise, labels, num_steps=5, guidance=g, null_label=null)
    assert torch.allclose(out, x.clamp(-1, 1), atol=1e-6) and not torch.allclose(out, plain)
    assert len(guided.calls) == 5 and guided.calls[0].tolist() == [0, 4, 7, 9, 9, 9]  # one forward: cond, then null
    with pytest.raises(ValueError, match="null_label"):
        euler_sample(fake, noise, labels, num_steps=2, guidance=g)
    with pytest.raises(ValueError, match="finite"):
        euler_sample(fake, noise, labels, num_steps=2, guidance=float("nan"), null_label=null)


def test_band_grid_and_band_means_partition_the_overall_mean():
    from salad_bench.harness.quality.metrics import T_BANDS, band_grid, band_means

    grid = band_grid(T_BANDS, 2)
    assert grid == (0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375)
    vals = np.random.default_rng(0).uniform(size=(5, len(grid)))
    bands = band_means(vals, grid, T_BANDS)
    assert bands.shape == (5, 4) and np.allclose(bands.mean(1), vals.mean(1))  # equal points per band
    assert np.allclose(bands[:, 0], vals[:, :2].mean(1))
    uneven = (0.1, 0.2, 0.3, 0.9)  # 3 points in the first band, none in two bands, 1 in the last (t=1 counts)
    b = band_means(vals[:, :4], uneven, (0.0, 0.5, 0.75, 1.0))
    assert np.isnan(b[:, 1]).all() and np.allclose(3 / 4 * b[:, 0] + 1 / 4 * b[:, 2], vals[:, :4].mean(1))
    with pytest.raises(ValueError):
        band_grid((0.0, 0.5, 0.5, 1.0))


def test_velocity_metrics_agree_with_val_loss_and_are_zero_against_itself():
    from salad_bench.harness.quality.metrics import velocity_metrics

    spec = VideoSpec(frames=2, height=4, width=4, patch=(1, 1, 1))
    x0 = torch.randn(3, *spec.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    m = _Linear()
    grid = (0.2, 0.6)
    vm = velocity_metrics(m, x0, labels, teacher=m, t_grid=grid, batch_size=2)
    assert vm["loss"].shape == (3, 2) and float(vm["loss"].mean()) == pytest.approx(val_loss(m, x0, labels, t_grid=grid))
    assert np.all(vm["teacher_mse"] == 0)
    other = _Linear()
    other.w.data.fill_(0.25)  # velocity differs by 0.25 * x_t
    vm2 = velocity_metrics(other, x0, labels, teacher=m, t_grid=grid)
    noise = make_noise(3, spec, 4321)
    xt = (1 - 0.2) * x0[0] + 0.2 * noise[0]
    assert vm2["teacher_mse"][0, 0] == pytest.approx(float((0.25 * xt).square().mean()), rel=1e-5)
    assert "teacher_mse" not in velocity_metrics(m, x0, labels, t_grid=grid)


def test_temporal_flickering_on_the_adapters_mp4_matches_its_decoded_frames(tmp_path):
    """The score VBench computes on the mp4 files it is given: the adapter's files, decoded as it decodes them."""
    pytest.importorskip("imageio_ffmpeg")
    from salad_bench.harness.quality.metrics import read_mp4_frames, temporal_flickering_mp4
    from salad_bench.harness.quality.vbench import write_custom_input

    t = torch.linspace(0, 1, 6).view(1, 1, 6, 1, 1)
    x = torch.linspace(-1, 1, 16).view(1, 1, 1, 1, 16)
    videos = torch.cat([(0.8 * torch.sin(3 * x + 2 * t)).expand(1, 3, 6, 16, 16),
                        (0.5 * torch.cos(5 * x - t)).expand(1, 3, 6, 16, 16)])  # fmt: skip
    paths = write_custom_input(videos, ["a b", "c d"], tmp_path)
    res = temporal_flickering_mp4(paths)
    frames, reader = read_mp4_frames(paths[0])
    assert frames.shape == (6, 16, 16, 3) and frames.dtype == np.uint8 and reader == res["reader"]
    assert res["per_video"][0] == pytest.approx(temporal_flickering(frames))
    assert res["score"] == pytest.approx(np.mean(res["per_video"]))
    # near-lossless H.264: within a fraction of a grey level of the frames before encoding
    assert res["per_video"] == pytest.approx([temporal_flickering(v) for v in to_uint8(videos)], abs=2e-3)


def test_sample_quality_hook_reports_a_reason_never_a_number(monkeypatch):
    import sys
    import types

    from salad_bench.harness.quality.metrics import CLASSIFIER_MODULE, sample_quality

    videos, labels = torch.zeros(2, 3, 2, 4, 4), torch.tensor([0, 1])
    monkeypatch.setitem(sys.modules, CLASSIFIER_MODULE, None)  # the module is not there
    out = sample_quality(videos, labels, videos, classifier_dir="clf")
    assert out["sample_quality"] == "skipped" and out["sample_quality_reason"]
    assert "classifier_accuracy" not in out and "frechet_distance" not in out
    monkeypatch.setitem(sys.modules, CLASSIFIER_MODULE, types.ModuleType(CLASSIFIER_MODULE))  # no interface
    assert "load_classifier" in sample_quality(videos, labels, videos, classifier_dir="clf")["sample_quality_reason"]

    class Clf:  # the interface of harness/quality/classifier.py's VideoClassifier
        def predict(self, v):
            return torch.tensor([0, 2])

        def features(self, v):
            return v.flatten(1)[:, :3].double()

    fake = types.ModuleType(CLASSIFIER_MODULE)
    fake.load_classifier = lambda d, device="cpu": (Clf(), {})
    fake.frechet_distance = lambda a, b: 1.5
    monkeypatch.setitem(sys.modules, CLASSIFIER_MODULE, fake)
    assert "no classifier checkpoint" in sample_quality(videos, labels, videos)["sample_quality_reason"]
    ok = sample_quality(videos, labels, videos, classifier_dir="clf")
    assert ok == {"sample_quality": "ok", "classifier_accuracy": 0.5, "classifier_correct_per_video": [1, 0],
                  "frechet_distance": 1.5, "classifier": "clf"}  # fmt: skip

    def broken(d, device="cpu"):
        raise ValueError("videos must be (B, 3, 16, 48, 48)")

    fake.load_classifier = broken
    why = sample_quality(videos, labels, videos, classifier_dir="clf")
    assert why["sample_quality"] == "skipped" and "(B, 3, 16, 48, 48)" in why["sample_quality_reason"]
