"""shard_for_finetune (FSDP2 per Wan block, then the root) under torchrun on the CPU (gloo, 2 ranks): the same
gradients and step as one unsharded process with the same global batch, SALAD's parameters sharded with
their blocks, a full state dict on rank 0 with the unsharded keys, and a sharded checkpoint that loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) is not in this torch")

from tests.harness.torchrun import torchrun  # noqa: E402

WORKER = Path(__file__).with_name("fsdp_worker.py")


def test_shard_for_finetune_needs_the_process_group():
    from salad_bench.harness.quality.fsdp import shard_for_finetune, transformer_of

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already up in this process")
    with pytest.raises(ValueError, match="process group"):
        shard_for_finetune(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no transformer blocks"):
        transformer_of(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_fully_shard_on_two_cpu_ranks_equals_one_process(tmp_path):
    p = torchrun([str(WORKER), str(tmp_path / "found.json"), str(tmp_path / "dcp")], timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    found = json.loads((tmp_path / "found.json").read_text())
    fp32 = found["fp32"]
    assert fp32["loss"] == pytest.approx(fp32["ref_loss"], rel=1e-5)  # the two halves of the global batch
    assert fp32["grad_rel"] < 1e-5 and fp32["step_rel"] < 1e-3  # averaged gradients, one AdamW step
    assert 0.45 < fp32["local_fraction"] < 0.55  # each rank holds half of every parameter
    assert fp32["method_params_sharded"] and fp32["param_dtype"] == "torch.float32"
    assert found["full_state_dict"]["same_keys"] and found["full_state_dict"]["max_err"] < 1e-4
    assert found["dcp_round_trip"] == 0.0
    bf16 = found["bf16"]  # bf16 compute, fp32 master weights
    assert bf16["param_dtype"] == "torch.float32" and bf16["loss"] == pytest.approx(bf16["ref_loss"], rel=2e-2)
    assert bf16["grad_rel"] < 0.1
