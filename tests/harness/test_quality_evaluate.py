"""The quality study end to end on a tiny random mini Wan (CPU): rows of kind "quality"."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")
pytest.importorskip("salad_bench.harness.integrations.wan")

from salad_bench.harness.quality.evaluate import main, step_for_t  # noqa: E402
from salad_bench.harness.quality.model import MiniWan, MiniWanConfig, save_checkpoint  # noqa: E402
from salad_bench.harness.results import read_jsonl  # noqa: E402

TINY = MiniWanConfig(num_layers=2, num_heads=2, head_dim=64, ffn_dim=64, freq_dim=32, frames=4, height=16, width=16)
FIELDS = (
    "method", "label", "arm", "family", "sparsity_target", "density", "val_loss", "val_loss_full", "val_loss_rel",
    "val_loss_band0", "velocity_mse", "psnr", "ssim", "temporal_flickering", "temporal_flickering_source",
    "sample_quality", "train_steps", "train_params", "objective", "train_seed", "train_lr", "base_bar", "status", "reason",
)  # fmt: skip
LABELS = {"full", "full_ft", "topk", "salad", "salad_no_linear", "salad_drop20", "sparse_lora"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    torch.manual_seed(0)
    save_checkpoint(MiniWan(TINY), root / "ckpt", {"steps_done": 0})
    out = root / "run"
    args = [
        "--checkpoint",
        str(root / "ckpt"),
        "--methods",
        "full,topk,salad,salad_no_linear,salad_drop20,sparse_lora,nope_typo",
    ]
    with pytest.raises(KeyError, match="nope_typo"):  # unknown names fail before any work
        main([*args, "--out", str(out)])
    args[-1] = "full,topk,salad,salad_no_linear,salad_drop20,sparse_lora"
    common = ["--sparsity", "0.5", "--steps", "2", "--batch", "2", "--train-samples", "4", "--n-val", "2", "--n-eval", "2",
              "--sample-steps", "2", "--eval-batch", "2", "--no-latency", "--save-samples", "--no-base-bar",
              "--out", str(out)]  # fmt: skip
    assert main(args + common) == 0
    rows = {r["label"]: r for r in read_jsonl(out / "rows.jsonl")}
    return rows, out, args, common


def test_every_method_has_a_complete_ok_row(study):
    rows, *_ = study
    assert set(rows) == LABELS
    for name, r in rows.items():
        assert r["kind"] == "quality" and r["status"] == "ok", (name, r.get("reason"))
        assert all(f in r for f in FIELDS), [f for f in FIELDS if f not in r]
        assert r["git_sha"] is not None or r["git_sha"] is None  # provenance stamped by RowWriter
        assert r["val_loss_rel"] == pytest.approx(r["val_loss"] / r["val_loss_full"] - 1)


def test_full_matches_the_reference_and_sparse_methods_are_sparse(study):
    rows, *_ = study
    full = rows["full"]
    assert full["density"] == 1.0 and full["val_loss_rel"] == pytest.approx(0.0, abs=1e-6)
    assert full["psnr"] is None and full["psnr_identical"] and full["ssim"] == pytest.approx(1.0)
    assert full["velocity_mse"] == pytest.approx(0.0, abs=1e-10)  # the base model is the teacher
    assert max(full["velocity_mse_per_video"]) == pytest.approx(0.0, abs=1e-10)
    for name in ("topk", "salad", "sparse_lora"):
        assert rows[name]["density"] < 1.0 and rows[name]["sparsity_target"] == 0.5
        assert rows[name]["velocity_mse"] > 0


def test_the_full_control_is_fine_tuned_with_the_same_recipe_and_named(study):
    rows, *_ = study
    control, base = rows["full_ft"], rows["full"]
    assert control["method"] == base["method"] == "full" and control["arm"] == "ft" and base["arm"] == "as_is"
    assert control["sparsity_target"] == 0.0 and control["config_hash"] != base["config_hash"]
    for key in ("train_steps", "train_lr", "train_seed", "train_batch", "train_params", "objective"):
        assert control[key] == rows["salad"][key], key
    assert control["velocity_mse"] > 0  # it moved away from the base


def test_per_band_losses_partition_the_overall_loss(study):
    rows, *_ = study
    for r in rows.values():
        bands = [r[f"val_loss_band{j}"] for j in range(4)]
        assert r["t_bands"] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(r["t_grid"]) == 8  # two points per band
        assert np.mean(bands) == pytest.approx(r["val_loss"], rel=1e-6)
        per_video = np.mean([r[f"val_loss_band{j}_per_video"] for j in range(4)], axis=0)
        assert per_video == pytest.approx(r["val_loss_per_video"], rel=1e-5)


def test_training_budget_is_recorded(study):
    rows, *_ = study
    assert rows["topk"]["train_steps"] == 0 and rows["topk"]["train_params"] is None
    assert rows["salad"]["train_steps"] == 2 and rows["sparse_lora"]["train_steps"] == 2
    n_base = sum(p.numel() for p in MiniWan(TINY).parameters())
    assert rows["salad"]["train_params"] == "all" and rows["salad"]["trainable_params"] > n_base  # the whole DiT + SALAD's
    # the whole model trains, so even without its linear branch the sparse model fine-tunes
    assert rows["salad_no_linear"]["train_steps"] == 2
    assert "dropped_layers" in rows["salad_drop20"]
    assert rows["salad"]["sample_quality"] in ("ok", "skipped")
    if rows["salad"]["sample_quality"] == "skipped":  # a reason, never a number
        assert rows["salad"]["sample_quality_reason"] and "classifier_accuracy" not in rows["salad"]
    assert rows["salad"]["base_bar"] == "not checked (--no-base-bar)"


def test_curves_samples_and_resume(study):
    rows, out, args, common = study
    curve = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines()]
    assert {c["label"] for c in curve} >= {"salad", "sparse_lora", "full_ft"}
    samples = np.load(out / "samples.npz")
    salad = rows["salad"]["cell"]
    assert samples[salad].shape == (2, 4, 16, 16, 3) and samples[salad].dtype == np.uint8
    assert main(args + common + ["--resume"]) == 0  # nothing left to do: no new rows
    assert len(read_jsonl(out / "rows.jsonl")) == len(rows)
    assert salad in np.load(out / "samples.npz").files  # a resumed call keeps the earlier calls' videos


def test_per_method_checkpoints_load_back(study):
    """What each method trained is saved under <out>/finetuned/<method> and reproduces its weights."""
    from salad_bench.harness.integrations.wan import install_attention
    from salad_bench.harness.quality.model import load_checkpoint, load_finetuned

    rows, out, *_ = study
    assert "finetuned_checkpoint" not in rows["topk"]  # nothing trained, nothing saved
    assert not list((out / "finetuned").glob("*.resume.pt"))  # finished runs leave no resume state
    for name in ("salad", "sparse_lora"):
        ckpt = out / "finetuned" / rows[name]["cell"]
        assert rows[name]["finetuned_checkpoint"] == str(ckpt)
        card = json.loads((ckpt / "card.json").read_text())
        assert card["method"] == name and card["train_steps"] == 2 and card["elements"] == rows[name]["trainable_params"]
        model, _ = load_checkpoint(out.parent / "ckpt")
        install_attention(model.transformer, name, sparsity=0.5)
        before = {n: p.clone() for n, p in model.named_parameters()}
        info = load_finetuned(model, ckpt)
        assert info["method"] == name and info["recipe"]["train_params"] == "all"
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert any(n.startswith("prompt") for n in moved) and any("sparse_method" in n or "lora" in n for n in moved)


def test_save_samples_merges_and_refuses_other_labels(tmp_path):
    from salad_bench.harness.quality.evaluate import save_samples

    path, labels = tmp_path / "samples.npz", np.arange(2)
    a, b = np.zeros((2, 1), np.uint8), np.ones((2, 1), np.uint8)
    save_samples(path, {"salad": a}, labels)
    save_samples(path, {"vsa": b}, labels)
    with np.load(path) as f:
        assert set(f.files) == {"salad", "vsa", "labels"} and (f["vsa"] == 1).all()
    with pytest.raises(ValueError, match="other evaluation labels"):
        save_samples(path, {"sla": a}, np.arange(3))
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable samples file"):
        save_samples(path, {"sla": a}, labels)


def test_a_base_with_a_null_class_is_sampled_guided_and_fine_tuned_with_label_dropout(study, tmp_path):
    """Guidance and label dropout follow the base: rows record them, and a cell's config_hash stays the same."""
    import dataclasses

    rows, _, args, common = study
    assert rows["salad"]["sample_guidance"] == 1.0 and rows["salad"]["train_label_dropout"] == 0.0
    assert rows["topk"]["sample_guidance"] == 1.0 and rows["topk"]["train_label_dropout"] is None
    torch.manual_seed(0)
    save_checkpoint(MiniWan(dataclasses.replace(TINY, null_class=True)), tmp_path / "ckpt", {"steps_done": 0})
    argv = [*args, *common]
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "ckpt")
    argv[argv.index("--methods") + 1] = "salad"
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    assert main(argv) == 0
    guided = {r["label"]: r for r in read_jsonl(tmp_path / "run" / "rows.jsonl")}
    assert set(guided) == {"salad", "full_ft"} and all(r["status"] == "ok" for r in guided.values())
    for label, r in guided.items():
        assert r["sample_guidance"] == 5.0 and r["train_label_dropout"] == 0.1 and r["train_steps"] == 2
        assert r["config_hash"] == rows[label]["config_hash"]
        card = json.loads((tmp_path / "run" / "finetuned" / r["cell"] / "card.json").read_text())
        assert card["train_config"]["label_dropout"] == 0.1


def test_label_dropout_of_a_fine_tuning_follows_the_base():
    import dataclasses

    from salad_bench.harness.quality.evaluate import EvalSettings, parse_args, with_base_label_dropout
    from salad_bench.harness.quality.train import FINETUNE_DEFAULTS

    plain, null = MiniWan(TINY), MiniWan(dataclasses.replace(TINY, null_class=True))
    assert with_base_label_dropout(FINETUNE_DEFAULTS, plain) is FINETUNE_DEFAULTS
    assert with_base_label_dropout(FINETUNE_DEFAULTS, null).label_dropout == 0.1
    own = dataclasses.replace(FINETUNE_DEFAULTS, label_dropout=0.2)
    assert with_base_label_dropout(own, null).label_dropout == 0.2
    with pytest.raises(ValueError, match="no null class"):
        with_base_label_dropout(own, plain)
    with pytest.raises(ValueError, match="guidance"):
        EvalSettings(guidance=0.5)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--checkpoint", "x", "--out", "y", "--guidance", "0.5"])
    assert exc.value.code == 2
    assert parse_args(["--checkpoint", "x", "--out", "y"]).guidance == 5.0


def test_step_for_t():
    assert step_for_t(1.0, 20) == 0 and step_for_t(0.0, 20) == 19 and step_for_t(0.5, 20) == 10


def test_a_base_that_misses_the_bar_is_refused(study, monkeypatch, capsys):
    """require_base_bar (the other half of issue #25) decides whether a base may carry the study."""
    import sys
    import types

    _, out, args, common = study
    fake = types.ModuleType("salad_bench.harness.quality.base_bar")

    def require_base_bar(ckpt):
        raise RuntimeError("attention mass kept by top-k at 90%: 0.31 < 0.8")

    fake.require_base_bar = require_base_bar
    monkeypatch.setitem(sys.modules, "salad_bench.harness.quality.base_bar", fake)
    argv = [a for a in args + common if a != "--no-base-bar"]
    argv[argv.index("--out") + 1] = str(out.parent / "refused")
    assert main(argv) == 2
    assert "base-model bar" in capsys.readouterr().err and not (out.parent / "refused").exists()
