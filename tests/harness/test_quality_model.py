"""The mini Wan and its checkpoint format: round trip, shards < limit, clear errors on damage."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from salad_bench.harness.quality.model import (  # noqa: E402
    CheckpointError,
    MiniWan,
    MiniWanConfig,
    load_checkpoint,
    save_checkpoint,
)

TINY = MiniWanConfig(num_layers=2, num_heads=2, head_dim=64, ffn_dim=128, freq_dim=32, frames=4, height=16, width=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = MiniWan(TINY)
    # a small shard limit forces several shards, as the 16 MB limit does for the real model
    save_checkpoint(model, tmp_path, {"steps_done": 5}, max_shard_bytes=800_000)
    return model, tmp_path


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 4, 16, 16, generator=g), torch.tensor([0.3, 0.8]), torch.tensor([1, 7])


def test_forward_shape_and_wan_architecture():
    model = MiniWan(TINY)
    out = model(*_inputs())
    assert out.shape == (2, 3, 4, 16, 16)
    assert type(model.transformer).__name__ == "WanTransformer3DModel"
    assert model.transformer.config.qk_norm == "rms_norm_across_heads"


def test_round_trip_and_shard_sizes(saved):
    model, d = saved
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert all(p.stat().st_size < 1_000_000 for p in shards)
    loaded, card = load_checkpoint(d)
    assert card["steps_done"] == 5 and card["model_config"] == TINY.as_dict()
    assert (d / "README.md").exists()
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), loaded(*_inputs()))


def test_missing_shard_names_the_file(saved):
    _, d = saved
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(d)


def test_corrupt_shard_names_the_file(saved):
    _, d = saved
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(d)


def test_config_mismatch_with_card_names_the_file(saved):
    _, d = saved
    card = json.loads((d / "card.json").read_text())
    card["model_config"]["num_layers"] = 3
    (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"card\.json.*num_layers"):
        load_checkpoint(d)


@pytest.mark.parametrize("card", [[1, 2], "card", {"model_config": "oops"}, {"shard_sha256": [1]}])
def test_a_card_of_the_wrong_shape_names_the_file(saved, card):
    _, d = saved
    (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"card\.json.*(not a card|not a JSON object)"):
        load_checkpoint(d)


def test_shards_that_disagree_name_the_file(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, d = saved
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    with safe_open(str(victim), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    cfg["ffn_dim"] = 256
    save_file(tensors, str(victim), metadata={**meta, "config": json.dumps(cfg)})
    _rehash(d)
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(d)


def test_wrong_tensor_shape_names_the_file(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, d = saved
    victim = sorted(d.glob("model-*.safetensors"))[0]
    with safe_open(str(victim), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].numel() + 1)
    save_file(tensors, str(victim), metadata=meta)
    _rehash(d)
    with pytest.raises(CheckpointError, match=f"{victim.name}.*{name}"):
        load_checkpoint(d)


def _rehash(d):
    """Record the edited shards' digests in the card, so the checks behind the digest are reached."""
    from salad_bench.harness.quality.model import shard_digests

    card = json.loads((d / "card.json").read_text())
    card["shard_sha256"] = shard_digests(sorted(d.glob("model-*.safetensors")))
    (d / "card.json").write_text(json.dumps(card))


def test_a_flipped_byte_in_a_shard_names_the_shard(saved):
    _, d = saved
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0x01  # inside the last tensor's data: safetensors itself would load it silently
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{victim.name}: sha256 differs"):
        load_checkpoint(d)


def test_nan_weights_are_refused_naming_the_tensor(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, d = saved
    victim = sorted(d.glob("model-*.safetensors"))[0]
    with safe_open(str(victim), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in sorted(tensors) if tensors[k].is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(victim), metadata=meta)
    _rehash(d)
    with pytest.raises(CheckpointError, match=f"{victim.name}: tensor {name} holds NaN"):
        load_checkpoint(d)


def test_the_committed_checkpoint_verifies():
    from pathlib import Path

    card = json.loads((Path(__file__).resolve().parents[2] / "checkpoints/mini-wan-v2/card.json").read_text())
    assert set(card["shard_sha256"]) == set(card["shards"])
    load_checkpoint(Path(__file__).resolve().parents[2] / "checkpoints/mini-wan-v2")


def test_empty_directory_and_no_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no model-"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "nope")


# -- the null class (classifier-free guidance) -------------------------------------------------------------
def test_null_class_config_round_trip(tmp_path):
    from salad_bench.harness.quality.model import MiniWanConfig

    cfg = MiniWanConfig(**{**TINY.as_dict(), "null_class": True, "patch": TINY.patch})
    assert MiniWanConfig.from_dict(cfg.as_dict()) == cfg and cfg.as_dict()["null_class"] is True
    torch.manual_seed(0)
    model = MiniWan(cfg)
    assert model.prompt.weight.shape[0] == cfg.num_classes + 1 and model.null_label == cfg.num_classes
    assert MiniWan(TINY).null_label is None and MiniWan(TINY).prompt.weight.shape[0] == TINY.num_classes
    save_checkpoint(model, tmp_path, {"steps_done": 1})
    loaded, card = load_checkpoint(tmp_path)
    assert loaded.config == cfg and card["model_config"]["null_class"] is True
    x, t, _ = _inputs()
    labels = torch.tensor([3, cfg.num_classes])  # a class and the null class
    with torch.no_grad():
        assert torch.equal(model(x, t, labels), loaded(x, t, labels))
    with pytest.raises(ValueError, match="null_class"):
        MiniWanConfig(null_class="yes")


def test_a_card_without_the_null_class_field_loads_as_before(saved):
    """Checkpoints written before the field (the committed one among them) load with null_class False."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, d = saved
    for shard in sorted(d.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        cfg = json.loads(meta["config"])
        del cfg["null_class"]
        save_file(tensors, str(shard), metadata={**meta, "config": json.dumps(cfg)})
    card = json.loads((d / "card.json").read_text())
    del card["model_config"]["null_class"]
    (d / "card.json").write_text(json.dumps(card))
    _rehash(d)
    loaded, _ = load_checkpoint(d)
    assert loaded.config == TINY and not loaded.config.null_class and loaded.null_label is None
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), loaded(*_inputs()))


def test_add_null_class_keeps_the_classes_and_starts_the_null_row_at_their_mean():
    from salad_bench.harness.quality.model import add_null_class

    torch.manual_seed(0)
    model = MiniWan(TINY).eval()
    rng = torch.get_rng_state()
    new = add_null_class(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the global random state is left alone
    assert new.config.null_class and new.null_label == TINY.num_classes and not new.training
    assert model.prompt.weight.shape[0] == TINY.num_classes  # the original is unchanged
    assert torch.equal(new.prompt.weight[-1], model.prompt.weight.mean(0))
    assert torch.equal(new.prompt.weight[:-1], model.prompt.weight)
    x, t, labels = _inputs()
    with torch.no_grad():
        assert torch.equal(new(x, t, labels), model(x, t, labels))
        assert new(x, t, torch.full_like(labels, new.null_label)).shape == x.shape
    with pytest.raises(ValueError, match="already has a null class"):
        add_null_class(new)
