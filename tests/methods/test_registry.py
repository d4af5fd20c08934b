"""The typed registry: duplicates, typo suggestions, globs, variants, knob validation."""

from __future__ import annotations

import pytest

from salad_bench.methods import METHODS, AttentionMethod, UnknownNameError, create_method
from salad_bench.methods.base import MethodConfig
from salad_bench.methods.registry import Registry


class _Toy(AttentionMethod):
    Config = MethodConfig


def test_duplicate_name_raises():
    reg: Registry[AttentionMethod] = Registry("method", AttentionMethod)
    reg.register("toy")(_Toy)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("toy")(_Toy)


def test_non_subclass_rejected():
    reg: Registry[AttentionMethod] = Registry("method", AttentionMethod)
    with pytest.raises(TypeError, match="must subclass AttentionMethod"):
        reg.register("bad")(int)


def test_bad_name_rejected():
    reg: Registry[AttentionMethod] = Registry("method", AttentionMethod)
    with pytest.raises(ValueError, match="snake_case"):
        reg.register("Has Space")(_Toy)


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError) as info:
        METHODS.get("salda")
    msg = str(info.value)
    assert "did you mean" in msg.lower() and "'salad'" in msg and "Known:" in msg


def test_glob_selection_keeps_order_and_dedups():
    names = METHODS.select("full,salad*,full")
    assert names[0] == "full" and names.count("full") == 1
    assert "salad" in names and "salad_no_gate" in names
    assert all(n == "full" or n.startswith("salad") for n in names)


def test_glob_matching_nothing_raises():
    with pytest.raises(UnknownNameError, match="no method matches"):
        METHODS.select("nosuch*")


def test_variant_is_one_line_with_defaults():
    e = METHODS.get("salad_no_gate")
    assert e.cls is METHODS.get("salad").cls and e.defaults == {"gate": "none"} and e.family == "ablation"
    m = create_method("salad_no_gate", num_heads=2, head_dim=32)
    assert m.config.gate == "none" and m.name == "salad_no_gate"


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_impossible_sparsity_rejected(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        create_method("topk", num_heads=2, head_dim=32, sparsity=sparsity)


def test_unknown_knob_named():
    with pytest.raises(ValueError, match="no knob 'blok_q'.*block_q"):
        create_method("topk", num_heads=2, head_dim=32, blok_q=64)


def test_bad_knob_value_named():
    with pytest.raises(ValueError, match="block_q=48"):
        create_method("topk", num_heads=2, head_dim=32, block_q=48)
    with pytest.raises(ValueError, match="gate='sometimes'"):
        create_method("salad", num_heads=2, head_dim=32, gate="sometimes")


def test_every_entry_has_a_known_family():
    from salad_bench.methods.base import FAMILIES

    for e in METHODS.entries():
        assert e.family in FAMILIES, e.name


def test_a_family_is_the_classs_own_unless_given_and_must_be_known():
    from salad_bench.methods.base import FAMILIES

    reg: Registry[AttentionMethod] = Registry("method", AttentionMethod, FAMILIES)
    reg.register("toy")(_Toy)
    reg.register("toy_dense", family="full")(_Toy)
    reg.register_variant("toy_hot", "toy")
    assert [reg.get(n).family for n in ("toy", "toy_dense", "toy_hot")] == ["training_free", "full", "training_free"]
    with pytest.raises(ValueError, match="family 'sliding' is not one of full, training_free"):
        reg.register("toy_bad", family="sliding")(_Toy)
    assert "toy_bad" not in reg


def test_names_match_case_insensitively_in_suggestions():
    msg = str(pytest.raises(UnknownNameError, METHODS.get, "SALAD").value)
    assert "did you mean 'salad'" in msg.lower()


def test_traits_tell_the_harness_what_it_needs_without_names():
    from salad_bench.methods import METHODS

    assert METHODS.with_trait("reference") == ["full"]
    assert METHODS.with_trait("fa2") == ["full_flash"]
    baselines = METHODS.with_trait("dense_baseline")
    assert "full_cudnn" in baselines and "full_sage" not in baselines and "full" not in baselines
    assert "lossy" in METHODS.get("full_sage").traits and "dense" in METHODS.get("full_sage").traits
    assert not {"dense", "lossy"} & (METHODS.get("topk").traits | METHODS.get("salad_no_gate").traits)  # sparse: swept
    # the quality study asks which methods train and which it sweeps over every sparsity, never their names
    assert "trainable" in METHODS.get("salad_no_gate").traits and "headline" not in METHODS.get("salad_no_gate").traits
    assert METHODS.with_trait("headline") == ["salad", "salad_sta", "sla", "sparse_lora", "topk", "vsa"]
    assert not {"trainable"} & METHODS.get("topk").traits and "trainable" not in METHODS.get("full").traits


def test_a_variant_inherits_or_replaces_traits():
    from salad_bench.methods.base import AttentionMethod
    from salad_bench.methods.registry import Registry

    reg: Registry = Registry("method", AttentionMethod)
    reg.register("base", traits=("dense",))(type("B", (AttentionMethod,), {}))
    reg.register_variant("inherits", "base")
    reg.register_variant("replaces", "base", traits=("lossy",))
    assert reg.with_trait("dense") == ["base", "inherits"] and reg.with_trait("lossy") == ["replaces"]


def test_salad_bench_include_puts_an_outside_method_under_the_contract_test(tmp_path):
    """``SALAD_BENCH_INCLUDE`` loads a method file before collection (tests/conftest.py), so the
    registry-wide tests, which parametrize over ``METHODS.names()`` at import, cover ``--include`` methods."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    mine = tmp_path / "mine.py"
    mine.write_text("from salad_bench.methods.base import METHODS\n"
                    "METHODS.register_variant('included_probe', 'topk', description='from outside the project')\n")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "SALAD_BENCH_INCLUDE": os.pathsep.join([str(mine), str(mine)])}  # twice: loaded once
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/methods/test_contract.py",
         "-k", "test_shape_dtype_density and included_probe"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr


def test_salad_bench_include_names_a_bad_path(tmp_path):
    from tests.conftest import include_from_env

    assert include_from_env({}) == [] and include_from_env({"SALAD_BENCH_INCLUDE": ""}) == []
    with pytest.raises(pytest.UsageError, match="SALAD_BENCH_INCLUDE.*not a .py file"):
        include_from_env({"SALAD_BENCH_INCLUDE": str(tmp_path / "missing.py")})
