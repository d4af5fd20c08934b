"""Run by tests/harness/test_fsdp.py under torchrun (2 ranks, gloo): shard_for_finetune on the tiny MiniWan
with SALAD in every block, against the same model unsharded in the same process. Writes its findings as JSON
to argv[1] (rank 0)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def norm(ts) -> float:
    return sum(float(t.float().norm() ** 2) for t in ts) ** 0.5


def main(out: str, ckpt_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from salad_bench.harness.integrations.wan import install_attention
    from salad_bench.harness.quality.fsdp import full_state_dict, shard_for_finetune
    from salad_bench.harness.quality.metrics import flow_matching_mse
    from salad_bench.harness.quality.model import MiniWan, MiniWanConfig
    from salad_bench.harness.quality.train import init_distributed

    d, _ = init_distributed("cpu")
    cfg = MiniWanConfig(num_layers=2, num_heads=2, head_dim=64, ffn_dim=64, freq_dim=32, frames=2, height=16, width=16)

    def build() -> MiniWan:
        torch.manual_seed(0)
        m = MiniWan(cfg)
        install_attention(m.transformer, "salad", sparsity=0.5, proj_init="random")
        return m.train()

    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 2, 16, 16, generator=g)
    lab, t = torch.arange(4) % 3, torch.rand(4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    mine = slice(2 * d.rank, 2 * d.rank + 2)  # this rank's half of the global batch
    found: dict = {"world": d.world}
    for mp in (None, torch.bfloat16):
        model, ref = build(), build()
        shard_for_finetune(model, checkpoint=True, mp=mp)
        opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, ref))
        loss = flow_matching_mse(model, x0[mine], lab[mine], t[mine], noise[mine]).mean()
        loss.backward()
        ref_loss = flow_matching_mse(ref, x0, lab, t, noise).mean()
        ref_loss.backward()
        both = torch.stack([loss.detach().float()])
        dist.all_reduce(both)
        grads = [(p.grad.full_tensor(), q.grad) for p, q in zip(model.parameters(), ref.parameters(), strict=True)]
        sharded_local = sum(p.to_local().numel() for p in model.parameters())
        opt.step()
        ref_opt.step()
        init = build().state_dict()
        after = [(p.full_tensor(), q.detach()) for p, q in zip(model.parameters(), ref.parameters(), strict=True)]
        names = [n for n, _ in ref.named_parameters()]
        key = "fp32" if mp is None else "bf16"
        found[key] = {
            "loss": float(both) / d.world,
            "ref_loss": float(ref_loss.detach()),
            "grad_rel": norm(a - b for a, b in grads) / norm(b for _, b in grads),
            "step_rel": norm(a - b for a, b in after) / norm(b - init[n] for n, (_, b) in zip(names, after, strict=True)),
            "local_fraction": sharded_local / sum(p.numel() for p in ref.parameters()),
            "param_dtype": str(next(model.parameters()).dtype),
            "method_params_sharded": all(
                hasattr(p, "full_tensor") for n, p in model.named_parameters() if "sparse_method" in n
            ),
        }
        if mp is None:
            sd = full_state_dict(model)  # rank 0: the unsharded keys and values
            if d.main:
                want = ref.state_dict()
                found["full_state_dict"] = {
                    "same_keys": sorted(sd) == sorted(want),
                    "max_err": max(float((sd[k].float() - want[k].float()).abs().max()) for k in want),
                }
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=ckpt_dir)  # each rank its shard
            fresh = build()
            shard_for_finetune(fresh, checkpoint=True, mp=None)
            state = {"model": get_model_state_dict(fresh)}
            dcp.load(state, checkpoint_id=ckpt_dir)
            set_model_state_dict(fresh, state["model"])
            found["dcp_round_trip"] = max(
                float((a.full_tensor() - b.full_tensor()).abs().max())
                for a, b in zip(fresh.parameters(), model.parameters(), strict=True)
            )
    if d.main:
        with open(out, "w") as f:
            json.dump(found, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
