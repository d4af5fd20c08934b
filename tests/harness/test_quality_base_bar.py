"""Issue #25's bar: the plateau test, the attention mass kept by topk, the card a study can require, and
train_base's --until-plateau pieces."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from salad_bench.harness.quality import base_bar  # noqa: E402
from salad_bench.harness.quality.base_bar import (  # noqa: E402
    BaseBarError,
    attention_masses,
    block_mass,
    kept_mass,
    layer_attention_mass,
    oracle_mass,
    plateau_test,
    read_val_curve,
    require_base_bar,
    row_top_mass,
)
from salad_bench.harness.quality.classifier import ClassifierConfig, VideoClassifier, save_classifier  # noqa: E402
from salad_bench.harness.quality.model import MiniWan, load_checkpoint, save_checkpoint  # noqa: E402
from salad_bench.harness.quality.train_base import TINY  # noqa: E402
from salad_bench.kernels.layout import BlockLayout  # noqa: E402
from salad_bench.methods.base import AttnContext  # noqa: E402

TINY_V2 = dataclasses.replace(TINY, data_version=2)
FAST = ["--per-class", "1", "--sample-steps", "2", "--real-per-class", "1", "--mass-videos", "2", "--mass-t", "0.5",
        "--device", "cpu"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the plateau -------------------------------------------------------------------------------------
def _curve(losses, lrs=None, every=250):
    return [(every * (i + 1), float(v), float(lrs[i] if lrs else 3e-4)) for i, v in enumerate(losses)]


def test_a_falling_curve_has_not_plateaued():
    res = plateau_test(_curve([0.2 * math.exp(-i / 10) + 0.05 for i in range(12)]))
    assert not res["plateaued"] and res["rel_fall"] > 0.01 and "still falls" in res["reason"]
    assert res["slope_ci95_per_1k"][1] < 0 and not res["ci_holds_zero"]


def test_a_flat_noisy_curve_at_a_constant_lr_has_plateaued():
    g = torch.Generator().manual_seed(0)
    flat = (0.1 + 0.0005 * torch.randn(12, generator=g)).tolist()
    res = plateau_test(_curve(flat))
    assert res["plateaued"] and abs(res["rel_fall"]) < 0.01 and res["lr_constant"], res
    lo, hi = res["slope_ci95_per_1k"]
    assert lo < res["slope_per_1k"] < hi


def test_a_flat_curve_under_a_decaying_lr_is_not_a_constant_lr_plateau():
    lrs = [3e-4 * 0.5 * (1 + math.cos(math.pi * i / 12)) for i in range(12)]
    res = plateau_test(_curve([0.1] * 12, lrs))
    assert not res["plateaued"] and "learning rate changes" in res["reason"]


def test_a_cooled_checkpoint_is_tested_on_its_constant_lr_phase(tmp_path):
    g = torch.Generator().manual_seed(1)
    flat = (0.1 + 0.0005 * torch.randn(10, generator=g)).tolist()
    lrs = [3e-4] * 10 + [3e-4 * (1 - i / 4) for i in range(4)]
    path = tmp_path / "curves.jsonl"
    path.write_text("".join(json.dumps({"step": s, "val_loss": v, "lr": lr}) + "\n"
                            for s, v, lr in _curve([*flat, 0.095, 0.09, 0.085, 0.08], lrs)))  # fmt: skip
    assert not base_bar.checkpoint_plateau(path)["plateaued"]  # the whole curve: the lr changes in the window
    res = base_bar.checkpoint_plateau(path, {"from_step": 2500, "steps": 1000})
    assert res["plateaued"] and res["steps"] == [750, 2500], res
    assert res["cooldown"]["val_loss_before"] == pytest.approx(flat[-1]) and res["cooldown"]["val_loss_after"] == 0.08
    assert res["cooldown"]["last_step"] == 3500 and "cooldown from step 2500" in res["reason"]
    falling = base_bar.checkpoint_plateau(path, {"from_step": 2000, "steps": 1500}, rel_tol=1e-9)
    assert not falling["plateaued"] and falling["reason"].startswith("constant-lr phase up to step 2000")
    assert not base_bar.checkpoint_plateau(tmp_path / "none.jsonl")["plateaued"]


def test_too_few_evaluations_and_the_t_quantile():
    assert not plateau_test(_curve([0.1] * 5), window=8)["plateaued"]
    assert base_bar._t975(4) == pytest.approx(2.776, abs=1e-3) and base_bar._t975(30) == pytest.approx(2.042, abs=1e-3)
    with pytest.raises(ValueError, match="window"):
        plateau_test(_curve([0.1] * 5), window=2)


def test_read_val_curve_keeps_the_last_row_per_step_and_skips_junk(tmp_path):
    rows = [{"phase": "base", "step": 10, "loss": 1.0}, {"phase": "base", "step": 250, "val_loss": 0.3, "lr": 1e-3},
            {"phase": "base", "step": 250, "val_loss": 0.2, "lr": 1e-3},  # logged again after a resume
            {"phase": "finetune", "step": 500, "val_loss": 9.0}, {"phase": "base", "step": 500, "val_loss": 0.1, "lr": 1e-3}]  # fmt: skip
    path = tmp_path / "curves.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)) + '\n{"step": 7')  # a line cut short
    assert read_val_curve(path) == [(250, 0.2, 1e-3), (500, 0.1, 1e-3)]


# -- attention mass ------------------------------------------------------------------------------------
def test_mass_is_one_when_topk_keeps_everything():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 300, 64, generator=g) for _ in range(2))
    m = attention_masses(q, k, AttnContext(), sparsity=0.0)
    assert torch.allclose(m["topk"], torch.ones(1, 2), atol=1e-5) and torch.allclose(m["density"], torch.ones(1, 2))
    assert torch.allclose(m["oracle"], torch.ones(1, 2), atol=1e-5)


def test_mass_equals_a_hand_computation_on_a_crafted_case():
    """N=6, blocks of 2 (ragged nothing), D=1, scale 1: the softmax of each row by hand."""
    q = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 0.0]).view(1, 1, 6, 1)
    k = torch.tensor([0.0, 1.0, 1.0, 0.0, -2.0, 3.0]).view(1, 1, 6, 1)
    tiles = torch.tensor([[True, False, False], [False, True, True], [True, False, True]]).view(1, 1, 3, 3)
    want = 0.0
    for i in range(6):
        e = [math.exp(float(q[0, 0, i, 0] * k[0, 0, j, 0])) for j in range(6)]
        kept = [j for j in range(6) if tiles[0, 0, i // 2, j // 2]]
        want += sum(e[j] for j in kept) / sum(e)
    bm = block_mass(q, k, 2, 2, rows_per_chunk=2)
    assert bm.sum().item() == pytest.approx(6.0, rel=1e-6)
    assert kept_mass(bm, tiles).item() == pytest.approx(want / 6, rel=1e-6)
    # the oracle with the same counts (1, 2, 2) keeps at least as much, and everything with 3 per row
    assert oracle_mass(bm, tiles.sum(-1)).item() >= want / 6 - 1e-7
    assert oracle_mass(bm, torch.full((1, 1, 3), 3)).item() == pytest.approx(1.0, rel=1e-6)


def test_row_top_mass_is_each_rows_best_keys_and_bounds_every_pattern():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 203, 16, generator=g), torch.randn(1, 2, 203, 16, generator=g) * 2
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
    want = torch.sort(p, -1, descending=True).values[..., :21].sum(-1).mean(-1)
    for rows in (64, 1024):
        assert torch.allclose(row_top_mass(q, k, 21, rows_per_chunk=rows), want, atol=1e-5)
    assert torch.allclose(row_top_mass(q, k, 203), torch.ones(1, 2), atol=1e-5)
    m = attention_masses(q, k, AttnContext(), sparsity=0.9)
    assert set(m) == {"topk", "oracle", "density", "row_top"}
    assert torch.allclose(m["row_top"], want, atol=1e-5)


def test_block_mass_handles_ragged_blocks_and_chunks():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 203, 16, generator=g), torch.randn(2, 1, 203, 16, generator=g)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)  # dense reference
    layout = BlockLayout.from_dense(torch.rand(2, 1, 2, 4, generator=g) < 0.5, 128, 64, 203)
    tiles = layout.to_dense()
    mask = tiles.repeat_interleave(128, 2)[:, :, :203].repeat_interleave(64, 3)[..., :203]
    want = (p * mask).sum(-1).mean(-1)
    for rows in (128, 1024):
        assert torch.allclose(kept_mass(block_mass(q, k, 128, 64, rows_per_chunk=rows), tiles), want, atol=1e-5)


def test_layer_attention_mass_on_a_tiny_model():
    torch.manual_seed(0)
    model = MiniWan(TINY_V2).eval()
    videos = torch.zeros(2, *TINY_V2.spec.shape)
    labels = torch.tensor([0, 5])
    rows = layer_attention_mass(model, videos, labels, (0.5,), sparsity=0.9, batch=1)
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 < r["topk_mass"] <= r["oracle_mass"] + 1e-6 <= 1 + 1e-5 and r["density"] < 1
        ph = r["per_head"]  # per head, and the layer's figure is their mean
        assert len(ph["topk"]) == len(ph["row_top"]) == TINY_V2.num_heads
        assert sum(ph["topk"]) / len(ph["topk"]) == pytest.approx(r["topk_mass"], abs=1e-4)
        assert sum(ph["row_top"]) / len(ph["row_top"]) == pytest.approx(r["row_top_mass"], abs=1e-4)
    full = layer_attention_mass(model, videos, labels, (0.5,), sparsity=0.0, batch=2)
    assert all(r["topk_mass"] == pytest.approx(1.0, abs=1e-5) for r in full)


def test_per_head_masses_are_each_heads_own():
    """Layer 0's per-head figures against attention_masses on the q, k read off the model by hand."""
    from salad_bench.harness.integrations.wan import install_attention, restore_attention
    from salad_bench.harness.quality.base_bar import attention_masses
    from salad_bench.harness.quality.data import ProceduralVideos
    from salad_bench.harness.quality.sampler import make_noise
    from salad_bench.methods.base import AttentionMethod, MethodConfig

    torch.manual_seed(0)
    model = MiniWan(TINY_V2).eval()
    videos, labels = ProceduralVideos("val", 1, TINY_V2.spec, TINY_V2.num_classes).batch([0], "cpu")
    rows = layer_attention_mass(model, videos, labels, (0.5,), sparsity=0.75, batch=1)
    seen = {}

    class Grab(AttentionMethod):
        family = "full"

        def attend(self, q, k, v, ctx):
            seen.setdefault(ctx.layer, attention_masses(q, k, ctx, 0.75))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    install_attention(model.transformer, lambda **kw: Grab(MethodConfig(), num_heads=kw["num_heads"], head_dim=kw["head_dim"]))
    noise = make_noise(1, TINY_V2.spec, 4321)  # the noise layer_attention_mass draws by default
    with torch.no_grad():
        model(0.5 * videos + 0.5 * noise, torch.full((1,), 0.5), labels)
    restore_attention(model.transformer)
    for r in rows:
        for key in ("topk", "row_top"):
            assert r["per_head"][key] == pytest.approx(seen[r["layer"]][key][0].tolist(), abs=1e-4)
    assert len(set(rows[0]["per_head"]["row_top"])) > 1  # the heads differ: nothing is averaged across them


# -- the bar end to end --------------------------------------------------------------------------------
@pytest.fixture
def tiny_inputs(tmp_path):
    torch.manual_seed(0)
    ckpt, clf = tmp_path / "base", tmp_path / "clf"
    save_checkpoint(MiniWan(TINY_V2), ckpt, {"steps_done": 0})
    flat = [{"phase": "base", "step": 10 * (i + 1), "val_loss": 1.0, "lr": 3e-4} for i in range(8)]
    (ckpt / "curves.jsonl").write_text("\n".join(map(json.dumps, flat)) + "\n")
    save_classifier(VideoClassifier(ClassifierConfig.for_spec(TINY_V2.spec, widths=(8, 16), feature_dim=16)), clf, {})
    return ckpt, clf


def test_bar_on_an_untrained_model_writes_a_card_that_fails_honestly(tiny_inputs, capsys):
    ckpt, clf = tiny_inputs
    assert base_bar.main(["--checkpoint", str(ckpt), "--classifier", str(clf), *FAST]) == 0
    bar = json.loads((ckpt / "bar.json").read_text())
    crit = {c["name"]: c for c in bar["criteria"]}
    assert bar["verdict"] == "fail" and set(crit) == {
        "val_loss_plateau",
        "sample_accuracy",
        "real_accuracy",
        "topk_mass_every_layer",
    }
    assert crit["val_loss_plateau"]["pass"]  # the flat curve written above: this one criterion holds
    assert not crit["real_accuracy"]["pass"] and crit["real_accuracy"]["threshold"] == 0.95
    assert not crit["topk_mass_every_layer"]["pass"] and len(bar["attention"]) == TINY_V2.num_layers
    assert bar["frechet_distance"]["samples_vs_real"] >= 0 and bar["frechet_distance"]["real_vs_real"] >= 0
    png = (ckpt / "samples.png").read_bytes()  # one row per class, 8 frames across
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (8 * 16).to_bytes(4, "big") + (16 * 16).to_bytes(4, "big")
    assert "_grid" not in bar
    md = (ckpt / "BAR.md").read_text()
    assert "**FAIL**" in md and "| sample_accuracy |" in md and "oracle mass" in md
    # no null class: sampled without guidance, and the card says so
    assert bar["guidance"]["scale"] == 1.0 and not bar["guidance"]["null_class"] and "unguided" not in bar["guidance"]
    assert crit["sample_accuracy"]["guidance"] == 1.0 and bar["settings"]["guidance"] == 5.0
    assert "no null class" in md
    out = capsys.readouterr().out
    assert "verdict: FAIL" in out and "FAIL real_accuracy" in out and "PASS val_loss_plateau" in out
    with pytest.raises(BaseBarError, match="fails the bar"):
        require_base_bar(ckpt)


def test_a_cooled_base_passes_the_plateau_of_its_constant_phase_and_the_card_says_so(tiny_inputs):
    """The bar reads the checkpoint card's cooldown: the plateau is tested before it (the decaying rows would fail
    a constant-lr test), and BAR.md reports the val loss before and after."""
    ckpt, clf = tiny_inputs
    torch.manual_seed(0)
    save_checkpoint(MiniWan(TINY_V2), ckpt, {"steps_done": 120, "cooldown": {"from_step": 80, "steps": 40}})
    decay = [{"phase": "base", "step": 80 + 10 * (i + 1), "val_loss": 0.9 - 0.05 * i, "lr": 3e-4 * (1 - (i + 1) / 4)}
             for i in range(4)]  # fmt: skip
    with open(ckpt / "curves.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in decay))
    bar = base_bar.run_bar(ckpt, clf, settings=base_bar.BarSettings(per_class=1, sample_steps=2, real_per_class=1,
                                                                    mass_videos=2, mass_t=(0.5,)))  # fmt: skip
    plateau = bar["criteria"][0]
    assert plateau["pass"] and plateau["detail"]["steps"] == [10, 80] and plateau["detail"]["cooldown"]["val_loss_after"] == 0.75
    md = base_bar.render_markdown({k: v for k, v in bar.items() if k != "_grid"})
    assert "constant-lr phase up to step 80" in md and "val loss 1.0000 at step 80, 0.7500 at step 120" in md
    save_checkpoint(MiniWan(TINY_V2), ckpt, {"steps_done": 120})  # the same curve without the card's cooldown: fails
    bar = base_bar.run_bar(ckpt, clf, settings=base_bar.BarSettings(per_class=1, sample_steps=2, real_per_class=1,
                                                                    mass_videos=2, mass_t=(0.5,)))  # fmt: skip
    assert not bar["criteria"][0]["pass"] and "learning rate changes" in bar["criteria"][0]["detail"]["reason"]


def test_a_model_with_a_null_class_is_judged_on_guided_samples_with_the_unguided_beside(tiny_inputs):
    ckpt, clf = tiny_inputs
    torch.manual_seed(0)
    save_checkpoint(MiniWan(dataclasses.replace(TINY_V2, null_class=True)), ckpt, {"steps_done": 0})
    bar = base_bar.run_bar(ckpt, clf, settings=base_bar.BarSettings(per_class=1, sample_steps=2, real_per_class=1,
                                                                    mass_videos=2, mass_t=(0.5,)))  # fmt: skip
    g = bar["guidance"]
    assert g["scale"] == 5.0 and g["null_class"] and "pre-registered" in g["note"]
    crit = {c["name"]: c for c in bar["criteria"]}
    assert crit["sample_accuracy"]["guidance"] == 5.0
    u = g["unguided"]
    assert 0 <= u["sample_accuracy"] <= 1 and u["frechet_samples_vs_real"] >= 0 and len(u["per_class"]) == TINY_V2.num_classes
    assert "not a criterion" in u["note"] and "unguided" not in crit  # information only
    md = base_bar.render_markdown({k: v for k, v in bar.items() if k != "_grid"})
    assert "classifier-free guidance 5" in md and "Unguided (guidance 1)" in md
    one = base_bar.run_bar(ckpt, clf, settings=base_bar.BarSettings(per_class=1, sample_steps=2, real_per_class=1,
                                                                    mass_videos=2, mass_t=(0.5,), guidance=1.0))  # fmt: skip
    assert one["guidance"]["scale"] == 1.0 and "unguided" not in one["guidance"]


def test_guidance_below_one_is_bad_input(tiny_inputs, capsys):
    ckpt, clf = tiny_inputs
    assert base_bar.main(["--checkpoint", str(ckpt), "--classifier", str(clf), *FAST, "--guidance", "0.5"]) == 2
    assert "--guidance must be a number >= 1" in capsys.readouterr().err
    assert not (ckpt / "bar.json").exists()


def test_require_base_bar_wants_a_passing_card_for_these_weights(tiny_inputs):
    ckpt, _ = tiny_inputs
    with pytest.raises(BaseBarError, match="no bar card.*base_bar"):
        require_base_bar(ckpt)
    digests = json.loads((ckpt / "card.json").read_text())["shard_sha256"]
    card = {"format": base_bar.BAR_FORMAT, "verdict": "pass", "checkpoint_shard_sha256": digests, "criteria": []}
    (ckpt / "bar.json").write_text(json.dumps(card))
    assert require_base_bar(ckpt)["verdict"] == "pass"
    for scale, ok in ((5.0, True), (1.0, False), (8.0, False)):  # a pass at a scale other than the pre-registered one
        (ckpt / "bar.json").write_text(json.dumps({**card, "guidance": {"null_class": True, "scale": scale}}))
        if ok:
            assert require_base_bar(ckpt)["guidance"]["scale"] == 5.0
        else:
            with pytest.raises(BaseBarError, match=f"guidance {scale}, not the pre-registered 5"):
                require_base_bar(ckpt)
    (ckpt / "bar.json").write_text(json.dumps({**card, "guidance": {"null_class": False, "scale": 1.0}}))
    assert require_base_bar(ckpt)["verdict"] == "pass"  # no null class: sampled unguided, nothing to pick
    torch.manual_seed(1)
    save_checkpoint(MiniWan(TINY_V2), ckpt, {"steps_done": 1})  # other weights, the old card left behind
    with pytest.raises(BaseBarError, match="other weights"):
        require_base_bar(ckpt)


def test_bad_inputs_exit_2_with_the_fix(tiny_inputs, tmp_path, capsys):
    ckpt, clf = tiny_inputs
    assert base_bar.main(["--checkpoint", str(tmp_path / "nope"), "--classifier", str(clf), *FAST]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint directory" in err and "fix:" in err and "train_base" in err
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert base_bar.main(["--checkpoint", str(ckpt), "--classifier", str(clf), *FAST]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "git checkout" in err
    assert not (ckpt / "bar.json").exists()


def test_a_classifier_for_another_spec_is_bad_input(tiny_inputs, tmp_path, capsys):
    ckpt, _ = tiny_inputs
    other = tmp_path / "clf-v1"
    save_classifier(VideoClassifier(ClassifierConfig.for_spec(TINY.spec, widths=(8, 16), feature_dim=16)), other, {})
    assert base_bar.main(["--checkpoint", str(ckpt), "--classifier", str(other), *FAST]) == 2
    assert "data version 1" in capsys.readouterr().err


# -- train_base --until-plateau ---------------------------------------------------------------------------
def test_until_plateau_in_pieces_equals_one_call_and_a_rerun_is_done(tmp_path, capsys):
    from salad_bench.harness.quality.train_base import main as train_base

    common = ["--tiny", "--until-plateau", "--max-steps", "6", "--batch", "2", "--val-every", "2", "--n-val", "2",
              "--plateau-window", "3", "--device", "cpu"]  # fmt: skip
    assert train_base(["--out", str(tmp_path / "one"), *common]) == 0
    # pieces of 0 s: the clock starts after a piece's first step, so each piece is two steps
    assert train_base(["--out", str(tmp_path / "pieces"), *common, "--check-every", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("base model: ") == 4 and "done: --max-steps 6" in out  # 1 piece, then 3 of 2 steps
    one, card = load_checkpoint(tmp_path / "one")
    pieces, _ = load_checkpoint(tmp_path / "pieces")
    for (name, a), b in zip(one.state_dict().items(), pieces.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-2 * a.abs().max().item() + 1e-6), name  # bf16 rounding apart
    assert card["steps_done"] == 6 and card["weights_dtype"] == "bf16" and card["data_version"] == 2
    assert card["train_config"]["min_lr_ratio"] == 1.0 and "still falls" in card["plateau"]["reason"]
    assert [p[0] for p in read_val_curve(tmp_path / "one" / "curves.jsonl")] == [2, 4, 6]
    assert train_base(["--out", str(tmp_path / "one"), *common]) == 0  # nothing left to do
    assert "done: --max-steps 6" in capsys.readouterr().out
    assert train_base(["--out", str(tmp_path / "one"), "--status", "--plateau-window", "3"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["steps_done"] == 6 and status["running"] is False and status["plateaued"] is False


def test_until_plateau_on_a_new_machine_refuses_or_goes_on_from_the_checkpoint(tmp_path, capsys):
    """The resume state did not travel (another machine): a rerun must not start afresh over the checkpoint;
    --from-checkpoint goes on from its weights with fresh optimiser moments, and the card says where."""
    from salad_bench.harness.quality.train_base import main as train_base

    common = ["--tiny", "--until-plateau", "--max-steps", "6", "--batch", "2", "--val-every", "2", "--n-val", "2",
              "--plateau-window", "3", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert train_base(common) == 0
    (tmp_path / "resume" / "state.pt").unlink()
    assert train_base(common) == 0  # finished: nothing to refuse
    card = json.loads((tmp_path / "card.json").read_text())
    card["steps_done"] = 4  # as if the last piece had not run
    card["train_config"]["sdpa_first"] = "cudnn"  # a retired field, as the committed base's card carries
    (tmp_path / "card.json").write_text(json.dumps(card))
    capsys.readouterr()
    assert train_base(common) == 2
    assert "--from-checkpoint" in capsys.readouterr().err
    assert train_base([*common, "--from-checkpoint", "--compile"]) == 0  # compiling is not a change of recipe
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["steps_done"] == 6 and card["optimizer_resets_at"] == [4]
    assert "fresh optimiser moments" in capsys.readouterr().out
    assert train_base([*common, "--from-checkpoint", "--lr", "1e-3"]) == 0  # done already: the recipe is not read


def _curve_rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_cooldown_after_the_plateau_decays_the_lr_to_zero_in_pieces_alike(tmp_path, capsys):
    """--cooldown goes on from the plateau's resume state (its moments: no reset), the lr falling linearly
    to 0; pieces equal one call; the card keeps the plateau of the constant phase; reruns and misuse."""
    from salad_bench.harness.quality.train import TrainConfig, lr_at
    from salad_bench.harness.quality.train_base import main as train_base

    common = ["--tiny", "--batch", "2", "--val-every", "2", "--n-val", "2", "--plateau-window", "3",
              "--plateau-rel-tol", "100", "--device", "cpu"]  # fmt: skip
    one, pieces = tmp_path / "one", tmp_path / "pieces"
    for out in (one, pieces):
        assert train_base(["--out", str(out), "--until-plateau", "--max-steps", "20", "--check-every", "0", *common]) == 0
    start = json.loads((one / "card.json").read_text())["steps_done"]
    assert start < 20 and json.loads((one / "card.json").read_text())["plateau"]["plateaued"]
    assert train_base(["--out", str(one), "--cooldown", "4", *common]) == 0
    assert train_base(["--out", str(pieces), "--cooldown", "4", "--check-every", "0", *common]) == 0
    assert "done: cooled down" in capsys.readouterr().out
    a, card = load_checkpoint(one)
    b, _ = load_checkpoint(pieces)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, rtol=0, atol=1e-2 * x.abs().max().item() + 1e-6), name
    assert card["steps_done"] == start + 4 and card["optimizer_resets_at"] == []
    assert card["cooldown"] == {"from_step": start, "steps": 4, "lr_from": 3e-4, "lr_to": 0.0, "schedule": "linear"}
    assert card["train_config"]["decay_start"] == start and card["train_config"]["min_lr_ratio"] == 0.0
    assert card["plateau"]["plateaued"] and f"cooldown from step {start}" in card["plateau"]["reason"]
    rows = _curve_rows(one / "curves.jsonl")
    lrs = {r["step"]: r["lr"] for r in rows if r["step"] > start and "lr" in r and "event" not in r}
    assert lrs == {start + 1: pytest.approx(3e-4), start + 2: pytest.approx(2.25e-4), start + 4: pytest.approx(0.75e-4)}
    assert lr_at(start + 4, TrainConfig(**card["train_config"])) == 0.0
    assert [r["step"] for r in rows if r.get("event") == "cooldown_start"] == [start]
    # reruns: done; another N or a constant lr after it is refused with the way on
    assert train_base(["--out", str(one), "--cooldown", "4", *common]) == 0
    assert "done: cooled down" in capsys.readouterr().out
    assert train_base(["--out", str(one), "--cooldown", "6", *common]) == 2
    assert "rerun with --cooldown 4" in capsys.readouterr().err
    assert train_base(["--out", str(one), "--until-plateau", "--max-steps", "40", *common]) == 2
    assert "cooled down from step" in capsys.readouterr().err


def test_cooldown_refuses_a_curve_without_a_plateau_and_a_new_machine_without_from_checkpoint(tmp_path, capsys):
    from salad_bench.harness.quality.train_base import main as train_base

    common = ["--tiny", "--batch", "2", "--val-every", "2", "--n-val", "2", "--plateau-window", "3", "--device", "cpu",
              "--out", str(tmp_path)]  # fmt: skip
    assert train_base(["--cooldown", "2", *common]) == 2
    assert "no trained checkpoint" in capsys.readouterr().err
    assert train_base(["--until-plateau", "--max-steps", "4", "--plateau-rel-tol", "1e-9", *common]) == 0
    assert train_base(["--cooldown", "2", "--plateau-rel-tol", "1e-9", *common]) == 2
    assert "has not plateaued" in capsys.readouterr().err
    common[-1] = str(tmp_path / "plateaued")
    assert train_base(["--until-plateau", "--max-steps", "6", "--plateau-rel-tol", "100", "--check-every", "0", *common]) == 0
    (tmp_path / "plateaued" / "resume" / "state.pt").write_bytes(b"not a state")
    assert train_base(["--cooldown", "2", "--plateau-rel-tol", "100", *common]) == 2
    assert "cannot read the resume state" in capsys.readouterr().err
    (tmp_path / "plateaued" / "resume" / "state.pt").unlink()
    assert train_base(["--cooldown", "2", "--plateau-rel-tol", "100", *common]) == 2
    assert "--from-checkpoint" in capsys.readouterr().err
    assert train_base(["--cooldown", "2", "--plateau-rel-tol", "100", "--from-checkpoint", *common]) == 0
    card = json.loads((tmp_path / "plateaued" / "card.json").read_text())
    assert card["steps_done"] == card["cooldown"]["from_step"] + 2 and card["optimizer_resets_at"] == [card["cooldown"]["from_step"]]
    with pytest.raises(SystemExit):
        train_base(["--cooldown", "0", *common])
    with pytest.raises(SystemExit):
        train_base(["--cooldown", "2", "--until-plateau", *common])


def test_until_plateau_drops_labels_to_a_null_class_from_the_start(tmp_path):
    from salad_bench.harness.quality.train_base import main as train_base

    assert train_base(["--tiny", "--until-plateau", "--max-steps", "2", "--batch", "2", "--val-every", "2", "--n-val", "2",
                       "--device", "cpu", "--out", str(tmp_path)]) == 0  # fmt: skip
    model, card = load_checkpoint(tmp_path)
    assert card["train_config"]["label_dropout"] == 0.1 and model.config.null_class and card["null_class_added_at"] == 0
    assert "null class with p=0.1" in card["objective"]


def test_from_checkpoint_adds_the_null_class_to_a_base_trained_without_and_records_the_step(tmp_path, capsys):
    """The committed base was trained without label dropout: going on with the recipe's dropout adds its null
    class (the mean of the class rows) at the checkpoint's step, recorded in the curve and the card; the resume
    states written since hold it, so the later pieces resume exactly."""
    from salad_bench.harness.quality.train_base import main as train_base

    common = ["--tiny", "--until-plateau", "--max-steps", "8", "--batch", "2", "--val-every", "2", "--n-val", "2",
              "--plateau-window", "3", "--check-every", "0", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert train_base([*common, "--label-dropout", "0"]) == 0
    old, card = load_checkpoint(tmp_path)
    assert not old.config.null_class and card["null_class_added_at"] is None
    card["steps_done"] = 4  # as if the last pieces had not run
    (tmp_path / "card.json").write_text(json.dumps(card))
    capsys.readouterr()
    assert train_base(common) == 2  # an exact resume cannot start the dropout
    err = capsys.readouterr().err
    assert "label dropout 0, the recipe now uses 0.1" in err and "--label-dropout 0" in err and "--from-checkpoint" in err
    (tmp_path / "resume" / "state.pt").unlink()
    assert train_base(common) == 2 and "--from-checkpoint" in capsys.readouterr().err
    assert train_base([*common, "--from-checkpoint"]) == 0  # pieces 4-6, then 6-8 from the state with the null class
    out = capsys.readouterr().out
    assert "null class added" in out and out.count("base model: ") == 2
    model, card = load_checkpoint(tmp_path)
    assert model.config.null_class and model.prompt.weight.shape[0] == TINY.num_classes + 1
    assert card["steps_done"] == 8 and card["train_config"]["label_dropout"] == 0.1
    assert card["null_class_added_at"] == 4 and card["optimizer_resets_at"] == [4]
    events = [json.loads(x) for x in (tmp_path / "curves.jsonl").read_text().splitlines() if '"event"' in x]
    assert [(e["event"], e["step"]) for e in events] == [("optimizer_reset", 4), ("null_class_added", 4)]


def test_until_plateau_compiled_continues_the_eager_run_alike(tmp_path, capsys, monkeypatch):
    """--compile (the blocks compiled in place, fullgraph): a compiled piece resumes an eager run's state
    (compile is not part of the recipe) and trains like the eager run to rounding."""
    from salad_bench.harness.quality import train_base as tb

    common = ["--tiny", "--until-plateau", "--max-steps", "4", "--batch", "2", "--val-every", "2", "--n-val", "2",
              "--plateau-window", "3", "--check-every", "0", "--device", "cpu"]  # fmt: skip
    assert tb.main(["--out", str(tmp_path / "eager"), *common]) == 0  # pieces of two steps
    # the first piece eager: the call's clock reads 0 s until that piece has started, then its 5 s are gone
    reads = iter([0.0, 0.0])
    monkeypatch.setattr(tb.time, "monotonic", lambda: next(reads, 1e6))
    assert tb.main(["--out", str(tmp_path / "mixed"), *common, "--time-budget", "5"]) == 0
    assert "not done" in capsys.readouterr().out
    assert json.loads((tmp_path / "mixed" / "card.json").read_text())["steps_done"] == 2
    monkeypatch.undo()
    assert tb.main(["--out", str(tmp_path / "mixed"), *common, "--compile"]) == 0  # the second piece compiled
    eager, mixed = (read_val_curve(tmp_path / name / "curves.jsonl") for name in ("eager", "mixed"))
    assert [p[0] for p in eager] == [p[0] for p in mixed] == [2, 4]
    for (_, a, *_), (_, b, *_) in zip(eager, mixed, strict=True):
        assert b == pytest.approx(a, rel=1e-3)
    card = json.loads((tmp_path / "mixed" / "card.json").read_text())
    assert card["train_config"]["compile"] is True and card["steps_done"] == 4


def test_compile_blocks_compiles_every_transformer_block_and_refuses_a_model_without():
    from salad_bench.harness.quality.model import MiniWan
    from salad_bench.harness.quality.train import compile_blocks
    from salad_bench.harness.quality.train_base import TINY

    model = MiniWan(TINY)
    keys = list(model.state_dict())
    compile_blocks(model)
    assert all(b._compiled_call_impl is not None for b in model.transformer.blocks)
    assert list(model.state_dict()) == keys  # compiled in place: checkpoints and resume states unchanged
    with pytest.raises(ValueError, match="no diffusers model with repeated blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
