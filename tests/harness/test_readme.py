"""The README's measured tables are generated from the committed runs and must not drift from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from salad_bench.harness import readme

ROOT = Path(__file__).resolve().parents[2]


def test_committed_readme_blocks_match_the_committed_runs(capsys):
    assert readme.main(["--check"]) == 0, capsys.readouterr().out
    assert set(readme.blocks((ROOT / "README.md").read_text())) == {"headline", "targets", "dit"}


def _dit_row(method, compiled, ms, speedup, **kw):
    wl = "dit:wan2.1-1.3b-480p" + ("+compile" if compiled else "")
    return {"kind": "dit", "status": "ok", "method": method, "workload": wl, "ms": ms, "attn_ms": ms * 0.4,
            "speedup": speedup, "card": "NVIDIA H100 80GB HBM3", "date": "2026-12-06T00:00:00", "git_sha": "abc1234",
            "torch": "2.11", "triton": "3.6", "cudnn": 91900, "compile_s": 40.0 if compiled else None,
            "sampling_ms_est": 100 * ms, **kw}


def test_stale_block_is_refused_and_a_rewrite_fixes_it(tmp_path, capsys):
    root = tmp_path / "repo"
    (root / "results").mkdir(parents=True)
    shutil.copytree(ROOT / "results" / "gpu", root / "results" / "gpu")
    run = root / "results" / "dit" / "2026-12-06-h100"
    run.mkdir(parents=True)
    rows = [_dit_row("full", True, 500.0, 1.0, attn_ms=250.0), _dit_row("salad", True, 250.0, 2.0),
            _dit_row("full", False, 640.0, 1.0), _dit_row("salad", False, 360.0, 1.78, attn_extra_ms=24.5)]
    (run / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = "intro\n<!-- generated:dit -->\nold numbers\n<!-- /generated:dit -->\nend\n"
    (root / "README.md").write_text(text)
    assert readme.main(["--readme", str(root / "README.md"), "--check"]) == 2
    assert "out of date: dit" in capsys.readouterr().out
    assert readme.main(["--readme", str(root / "README.md")]) == 0
    new = (root / "README.md").read_text()
    assert new.startswith("intro\n") and new.endswith("end\n") and "old numbers" not in new
    salad = next(line for line in new.splitlines() if line.startswith("| wan2.1-1.3b-480p | salad"))
    assert "360.0 | 1.78x | 250.0 | **2.00x**" in salad and "| 40 |" in salad
    # the Amdahl ceiling from the dense model's own attention share, eager and compiled
    assert "Ceiling if attention cost nothing" in new and "wan2.1-1.3b-480p eager 1.67x (attention 40%), compiled 2.00x (attention 50%)" in new
    assert "SALAD: linear branch, projection, gate, merge), eager, per forward: salad on wan2.1-1.3b-480p 24.5 ms of 360.0 ms" in new
    assert readme.main(["--readme", str(root / "README.md"), "--check"]) == 0


def test_unknown_block_and_missing_file_exit_2(tmp_path, capsys):
    f = tmp_path / "R.md"
    f.write_text("<!-- generated:nope -->\n<!-- /generated:nope -->\n")
    assert readme.main(["--readme", str(f)]) == 2
    assert "no generator" in capsys.readouterr().err
    assert readme.main(["--readme", str(tmp_path / "missing.md")]) == 2
