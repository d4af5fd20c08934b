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
    "method", "family", "sparsity_target", "density", "val_loss", "val_loss_full", "val_loss_rel", "psnr", "ssim",
    "temporal_flickering", "train_steps", "train_params", "status", "reason",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


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
              "--sample-steps", "2", "--eval-batch", "2", "--no-latency", "--save-samples", "--out", str(out)]  # fmt: skip
    assert main(args + common) == 0
    rows = {r["method"]: r for r in read_jsonl(out / "rows.jsonl")}
    return rows, out, args, common


def test_every_method_has_a_complete_ok_row(study):
    rows, *_ = study
    assert set(rows) == {"full", "topk", "salad", "salad_no_linear", "salad_drop20", "sparse_lora"}
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
    for name in ("topk", "salad", "sparse_lora"):
        assert rows[name]["density"] < 1.0 and rows[name]["sparsity_target"] == 0.5


def test_training_budget_is_recorded(study):
    rows, *_ = study
    assert rows["topk"]["train_steps"] == 0
    assert rows["salad"]["train_steps"] == 2 and rows["sparse_lora"]["train_steps"] == 2
    assert rows["salad"]["trainable_params"] > 0 and rows["salad"]["train_params"] == "method"
    assert rows["salad_no_linear"]["train_steps"] == 0 and "gradient" in rows["salad_no_linear"]["reason"]
    assert "dropped_layers" in rows["salad_drop20"]


def test_curves_samples_and_resume(study):
    rows, out, args, common = study
    curve = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines()]
    assert {c["method"] for c in curve} >= {"salad", "sparse_lora"}
    samples = np.load(out / "samples.npz")
    assert samples["salad"].shape == (2, 4, 16, 16, 3) and samples["salad"].dtype == np.uint8
    assert main(args + common + ["--resume"]) == 0  # nothing left to do: no new rows
    assert len(read_jsonl(out / "rows.jsonl")) == len(rows)
    assert "salad" in np.load(out / "samples.npz").files  # a resumed call keeps the earlier calls' videos


def test_per_method_checkpoints_load_back(study):
    """What each method trained is saved under <out>/finetuned/<method> and reproduces its weights."""
    from salad_bench.harness.integrations.wan import install_attention
    from salad_bench.harness.quality.model import load_checkpoint, load_finetuned

    rows, out, *_ = study
    assert "finetuned_checkpoint" not in rows["topk"]  # nothing trained, nothing saved
    assert not list((out / "finetuned").glob("*.resume.pt"))  # finished runs leave no resume state
    for name in ("salad", "sparse_lora"):
        ckpt = out / "finetuned" / name
        assert rows[name]["finetuned_checkpoint"] == str(ckpt)
        card = json.loads((ckpt / "card.json").read_text())
        assert card["method"] == name and card["train_steps"] == 2 and card["elements"] == rows[name]["trainable_params"]
        model, _ = load_checkpoint(out.parent / "ckpt")
        install_attention(model.transformer, name, sparsity=0.5)
        before = {n: p.clone() for n, p in model.named_parameters()}
        info = load_finetuned(model, ckpt)
        assert info["method"] == name
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert moved and all(n.startswith("transformer.blocks") for n in moved)  # only the installed attention


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


def test_step_for_t():
    assert step_for_t(1.0, 20) == 0 and step_for_t(0.0, 20) == 19 and step_for_t(0.5, 20) == 10
