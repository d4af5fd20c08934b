"""Analytic FLOP-speedup gate for CI (CPU only, no timing).

For every registered method (the dense reference at 0, every sparse method at 50% and 90%), build each method at a small Wan-like shape, run it once
on seeded random inputs, and compute ``dense_flops / report().flops_total``: the speedup the method
could reach if time followed FLOPs. A change that makes a method compute more than it did (a lost
skip, a denser layout, an extra branch) moves this ratio, and the check fails before any GPU run.

    python -m salad_bench.harness.expected_flops --check results/expected/flops.json   # exit 1 on a mismatch
    python -m salad_bench.harness.expected_flops --write results/expected/flops.json   # regenerate

Cells whose method (or a method it builds on) is not registered are skipped with a message; a
registered cell with no expectation is listed as unchecked (``--strict`` fails on it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salad_bench.harness.errors import Parser
from salad_bench.harness.flops import dense_flops

__all__ = ["SHAPE", "cases", "CheckResult", "check", "compute", "main"]

# B, H, grid (T, H, W), D: a small Wan-like latent. N = 5*16*17 = 1360 leaves a ragged last block
# (1360 = 10*128 + 80), as Wan's 32,760 tokens do; (5, 16, 16) would divide evenly.
SHAPE: dict[str, Any] = {"B": 1, "H": 2, "grid": (5, 16, 17), "D": 64}
SEED = 0
TOLERANCE = 0.02  # relative

SPARSITIES = (0.5, 0.9)


def cases() -> list[tuple[str, float]]:
    """Every registered method: the registry's ``reference`` dense method at 0, every method that
    sweeps sparsity at :data:`SPARSITIES` (other dense backends compute the same FLOPs as the reference)."""
    from salad_bench.methods import METHODS

    out: list[tuple[str, float]] = []
    for name in METHODS.names():
        traits = METHODS.get(name).traits
        if "reference" in traits:
            out.append((name, 0.0))
        elif "dense" not in traits and "lossy" not in traits:
            out += [(name, s) for s in SPARSITIES]
    return out


def _inputs():
    import torch

    g = torch.Generator().manual_seed(SEED)
    b, h, d = SHAPE["B"], SHAPE["H"], SHAPE["D"]
    n = SHAPE["grid"][0] * SHAPE["grid"][1] * SHAPE["grid"][2]
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(3))


def _measure(name: str, sparsity: float, qkv) -> dict[str, Any]:
    import torch

    from salad_bench.methods import AttnContext, create_method

    torch.manual_seed(SEED)  # methods with random init (none today) stay reproducible
    m = create_method(name, num_heads=SHAPE["H"], head_dim=SHAPE["D"], sparsity=sparsity).eval()
    with torch.no_grad():
        m(*qkv, AttnContext(grid=tuple(SHAPE["grid"])))
    rep = m.report()
    b, h, n, d = qkv[0].shape
    dense = dense_flops(b, h, n, n, d)
    return {
        "method": name,
        "sparsity": sparsity,
        "density": round(float(rep.density), 6),
        "flops_total": rep.flops_total,
        "flops_dense": dense,
        "flop_speedup": round(dense / rep.flops_total, 6),
    }


def compute(cells=None, *, log=print) -> tuple[list[dict[str, Any]], list[str]]:
    """Entries for the cells whose methods are registered, and a message per skipped cell."""
    from salad_bench.methods import METHODS
    from salad_bench.methods.registry import UnknownNameError

    qkv = _inputs()
    entries, skipped = [], []
    for name, sparsity in cases() if cells is None else cells:
        if name not in METHODS:
            skipped.append(f"{name}@{sparsity:.2f}: method not registered")
            continue
        try:
            entries.append(_measure(name, sparsity, qkv))
        except UnknownNameError as exc:  # a variant built on a method not registered yet
            skipped.append(f"{name}@{sparsity:.2f}: {exc}".split(" Known:")[0])
    for s in skipped:
        log(f"skip {s}")
    return entries, skipped


def _key(e: dict[str, Any]) -> tuple[str, float]:
    return e["method"], round(float(e["sparsity"]), 6)


@dataclass
class CheckResult:
    failures: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


class ExpectationsError(ValueError):
    """An expectations file that cannot be read; the message names the file and the fix."""


def load_expectations(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    fix = f"regenerate it with: python -m salad_bench.harness.expected_flops --write {path}"
    if not path.is_file():
        raise ExpectationsError(f"{path}: no such expectations file; {fix}")
    try:
        data = json.loads(path.read_text())
        for e in data["entries"]:
            _key(e), float(e["flop_speedup"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ExpectationsError(f"{path}: malformed expectations ({type(exc).__name__}: {exc}); {fix}") from None
    return data


def check(path: str | Path, *, only: list[str] | None = None, strict: bool = False, log=print) -> CheckResult:
    """Recompute every cell and compare with ``path``; ``only`` limits the methods checked.

    A registered cell with no expectation is listed as unchecked, and fails only when ``strict``.
    """
    data = load_expectations(path)
    if data.get("shape") and _shape_json(data["shape"]) != _shape_json(SHAPE):
        raise ExpectationsError(
            f"{path}: written for shape {data['shape']}, this code uses {SHAPE}; regenerate it with --write"
        )
    tol = float(data.get("tolerance_rel", TOLERANCE))
    expected = {_key(e): e for e in data["entries"]}
    todo = [c for c in cases() if only is None or c[0] in only]
    res = CheckResult()
    if not strict:  # cells without an expectation are not worth computing
        from salad_bench.methods import METHODS

        res.unchecked = [
            f"{m}@{s:.2f}: no expectation in {path} (run --write)"
            for m, s in todo
            if m in METHODS and (m, s) not in expected
        ]
        todo = [c for c in todo if c in expected]
    entries, res.skipped = compute(todo, log=log)
    for e in entries:
        label = f"{e['method']}@{e['sparsity']:.2f}"
        want = expected.get(_key(e))
        if want is None:
            res.failures.append(f"{label}: no expectation in {path} (run --write)")
            continue
        got, ref = e["flop_speedup"], float(want["flop_speedup"])
        err = abs(got - ref) / ref
        msg = f"{label}: FLOP speedup {got:.4f}, expected {ref:.4f} ({100 * err:.2f}% off, tolerance {100 * tol:.1f}%)"
        (res.failures if err > tol else res.passed).append(msg)
    return res


def _shape_json(shape: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in shape.items()}


def write(path: str | Path, *, log=print) -> list[dict[str, Any]]:
    import torch

    entries, _ = compute(log=log)
    data = {
        "about": "dense_flops / executed flops per (method, sparsity); regenerate with python -m salad_bench.harness.expected_flops --write",
        "shape": _shape_json(SHAPE),
        "seed": SEED,
        "tolerance_rel": TOLERANCE,
        "torch": torch.__version__,
        "entries": entries,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m salad_bench.harness.expected_flops", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", metavar="FILE", help="recompute and compare with FILE (exit 1 on a mismatch)")
    mode.add_argument("--write", metavar="FILE", help="recompute and write FILE")
    ap.add_argument("--only", help="comma list of methods to check")
    ap.add_argument("--strict", action="store_true", help="fail when a registered cell has no expectation")
    args = ap.parse_args(argv)
    if args.write:
        entries = write(args.write)
        print(f"wrote {args.write}: {len(entries)} cell(s)")
        return 0
    try:
        res = check(args.check, only=args.only.split(",") if args.only else None, strict=args.strict)
    except ExpectationsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for title, items in (("FAIL", res.failures), ("ok", res.passed), ("unchecked", res.unchecked)):
        for s in items:
            print(f"{title}: {s}")
    print(
        f"{'PASS' if res.ok else 'FAIL'}: {len(res.passed)} ok, {len(res.failures)} failed, {len(res.skipped)} skipped, {len(res.unchecked)} unchecked"
    )
    return 0 if res.ok else 1


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
