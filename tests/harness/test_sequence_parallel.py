"""Head-sharded attention calls, what sequence parallelism (Ulysses: after an all-to-all each rank holds the
full sequence for H/G heads) hands a method: ``(B, H_local, N, D)``. A method whose selection and weights are
per head gives, on two head halves concatenated, exactly what it gives on all heads. SALAD's sparse and
linear branches are per head; its merge (a C x C projection and a gate pooled over all channels) mixes
heads, so under sequence parallelism it runs after the all-to-all back, on the sequence shard with all C
channels (docs/SCALE_OUT.md)."""

from __future__ import annotations

import pytest
import torch

from salad_bench.harness.workloads import Workload, make_qkv
from salad_bench.methods import METHODS, AttnContext, Unsupported, create_method

WL = Workload("sp", (2, 8, 16), 4, 64, 2)  # 256 tokens, 4 heads
HALVES = (slice(0, 2), slice(2, 4))


def _head_local() -> list[str]:
    """Registered methods without parameters of their own (selection and masks only); of the dense backends
    (each trivially per head) only ``full``."""
    out = []
    for name in METHODS.names():
        if "dense" in METHODS.get(name).traits and name != "full":
            continue
        m = create_method(name, num_heads=4, head_dim=64, sparsity=0.5)
        if not any(True for _ in m.parameters()):
            out.append(name)
    return out


@pytest.fixture(scope="module")
def qkv():
    q, k, v = make_qkv(WL, seed=0)
    return q, k, v, AttnContext(grid=WL.grid, num_layers=WL.layers)


def _halves(name: str, qkv, **knobs):
    q, k, v, ctx = qkv
    outs = []
    for sl in HALVES:
        m = create_method(name, num_heads=2, head_dim=64, sparsity=0.5, **knobs)
        outs.append(m(q[:, sl].contiguous(), k[:, sl].contiguous(), v[:, sl].contiguous(), ctx))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", _head_local())
@torch.no_grad()
def test_a_head_local_method_on_two_head_halves_equals_all_heads(name, qkv):
    q, k, v, ctx = qkv
    try:
        full = create_method(name, num_heads=4, head_dim=64, sparsity=0.5)(q, k, v, ctx)
    except Unsupported as exc:
        pytest.skip(f"{name} does not run here: {exc}")
    torch.testing.assert_close(_halves(name, qkv), full, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_sla_shares_its_head_projection_so_every_rank_holds_a_copy(qkv):
    q, k, v, ctx = qkv
    full = create_method("sla", num_heads=4, head_dim=64, sparsity=0.5)
    torch.nn.init.normal_(full.proj.weight, std=0.1)  # (D, D), the same map for every head
    outs = []
    for sl in HALVES:
        m = create_method("sla", num_heads=2, head_dim=64, sparsity=0.5)
        m.load_state_dict(full.state_dict())  # replicated, not sharded
        outs.append(m(q[:, sl].contiguous(), k[:, sl].contiguous(), v[:, sl].contiguous(), ctx))
    torch.testing.assert_close(torch.cat(outs, dim=1), full(q, k, v, ctx), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_salad_branches_are_per_head_and_its_merge_needs_every_head(qkv):
    q, k, v, ctx = qkv
    salad = create_method("salad", num_heads=4, head_dim=64, sparsity=0.5, proj_init="random",
                          gate_granularity="head")  # fmt: skip
    torch.nn.init.normal_(salad.gate_proj.weight, std=0.1)
    salad.eval()
    want = salad(q, k, v, ctx)
    # per head: the sparse branch and the linear branch (shared Q/K/V maps, RoPE per head)
    out_s = _halves(salad.config.sparse, qkv)
    branch = create_method("salad", num_heads=2, head_dim=64, sparsity=0.5)
    out_l = torch.cat([branch.linear_branch(q[:, sl], k[:, sl], v[:, sl], ctx) for sl in HALVES], dim=1)
    torch.testing.assert_close(out_s, salad.sparse(q, k, v, ctx), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_l, salad.linear_branch(q, k, v, ctx), rtol=1e-5, atol=1e-6)
    # the projection takes every head's branch output (Proj is C x C) and the gate pools all C channels
    torch.testing.assert_close(out_s + salad.project(out_l, salad.gate_value(q, ctx)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="built for 4 heads"):
        salad(q[:, :2], k[:, :2], v[:, :2], ctx)  # one rank's heads alone cannot run the whole method
    # and the projection is per token: a sequence shard with all channels gives its tokens' rows of the output
    g = salad.gate_value(q, ctx)
    part = out_s[:, :, :128] + salad.project(out_l[:, :, :128], g)
    torch.testing.assert_close(part, want[:, :, :128], rtol=1e-5, atol=1e-5)
