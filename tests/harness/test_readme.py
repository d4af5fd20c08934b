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


def _dit_row(method, compiled, ms, speedup, model="wan2.1-1.3b-480p", **kw):
    wl = f"dit:{model}" + ("+compile" if compiled else "")
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
    assert "SALAD: linear branch, projection, gate, merge), eager, per forward" in new
    assert "around them): salad on wan2.1-1.3b-480p 24.5 ms of 360.0 ms" in new
    assert readme.main(["--readme", str(root / "README.md"), "--check"]) == 0


def test_whole_model_rows_replace_block_scaled_ones_and_each_group_comes_from_one_run(tmp_path):
    root = tmp_path / "repo"
    old, new = root / "results" / "dit" / "2026-12-06-h100-aaaaaaa", root / "results" / "dit" / "2026-12-07-h100-bbbbbbb"
    for d in (old, new):
        d.mkdir(parents=True)
    scaled = "wan2.1-1.3b-720p[blocks=4/30]"
    old_rows = [_dit_row("full", True, 500.0, 1.0), _dit_row("salad", True, 250.0, 2.0),  # 480p compiled: kept
                _dit_row("full", True, 2000.0, 1.0, model=scaled), _dit_row("salad", True, 600.0, 3.33, model=scaled),
                _dit_row("full", False, 640.0, 1.0), _dit_row("topk", False, 330.0, 1.94)]
    new_rows = [_dit_row("full", True, 2100.0, 1.0, model="wan2.1-1.3b-720p", date="2026-12-07T00:00:00", git_sha="bbbbbbb"),
                _dit_row("salad", True, 700.0, 3.0, model="wan2.1-1.3b-720p", date="2026-12-07T00:00:00", git_sha="bbbbbbb"),
                _dit_row("full", False, 650.0, 1.0, date="2026-12-07T00:00:00", git_sha="bbbbbbb"),
                _dit_row("salad", False, 360.0, 1.81, date="2026-12-07T00:00:00", git_sha="bbbbbbb")]
    old_rows = [dict(r, git_sha="aaaaaaa") for r in old_rows]
    (old / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    (new / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new_rows))
    text = readme.dit_block(root)
    assert "[blocks=" not in text and "| wan2.1-1.3b-720p | salad | – | – | 700.0 | **3.00x**" in text
    assert "| wan2.1-1.3b-480p | salad | 360.0 | 1.81x | 250.0 | **2.00x**" in text  # eager from new, compiled from old
    assert "| wan2.1-1.3b-480p | topk |" not in text  # the eager group is the newer run's, which has no topk
    assert "`results/dit/2026-12-06-h100-aaaaaaa` (commit aaaaaaa)" in text
    assert "`results/dit/2026-12-07-h100-bbbbbbb` (commit bbbbbbb)" in text


def test_unknown_block_and_missing_file_exit_2(tmp_path, capsys):
    f = tmp_path / "R.md"
    f.write_text("<!-- generated:nope -->\n<!-- /generated:nope -->\n")
    assert readme.main(["--readme", str(f)]) == 2
    assert "no generator" in capsys.readouterr().err
    assert readme.main(["--readme", str(tmp_path / "missing.md")]) == 2


def test_a_target_without_rows_is_named_not_hidden(tmp_path):
    run = tmp_path / "results" / "gpu" / "r"
    run.mkdir(parents=True)
    row = {"status": "ok", "card": "NVIDIA H100 80GB HBM3", "method": "topk", "sparsity_target": 0.9, "qkv": "video",
           "ms": 1.2, "date": "2026-12-07", "git_sha": "abc"}
    (run / "rows.jsonl").write_text(json.dumps(row) + "\n")
    block = readme.targets_block(tmp_path)
    assert "| topk at 90% | <= 1.3 ms | 1.200 ms | yes |" in block
    missing = block.split("Targets without rows in any run of this card: ")[1]
    assert "salad at 90%" in missing and "sta at 90%: glue" in missing and "topk at 90%" not in missing


def test_a_target_the_newest_run_lacks_comes_from_the_newest_earlier_run_that_measured_it(tmp_path):
    def write(name, date, sha, rows):
        run = tmp_path / "results" / "gpu" / name
        run.mkdir(parents=True)
        base = {"status": "ok", "card": "NVIDIA H100 80GB HBM3", "sparsity_target": 0.9, "qkv": "video", "date": date,
                "git_sha": sha}
        (run / "rows.jsonl").write_text("".join(json.dumps({**base, **r}) + "\n" for r in rows))

    write("old", "2026-12-05", "aaaaaaa1", [{"method": "topk", "ms": 1.5}, {"method": "salad", "ms": 2.5}])
    write("mid", "2026-12-06", "bbbbbbb1", [{"method": "topk", "ms": 1.4}, {"method": "salad", "ms": 2.0}])
    write("new", "2026-12-07", "ccccccc1", [{"method": "topk", "ms": 1.2}])
    block = readme.targets_block(tmp_path)
    newest, rest = block.split("Not measured in that run")
    assert "`results/gpu/new`" in newest and "| topk at 90% | <= 1.3 ms | 1.200 ms | yes |" in newest
    assert "`results/gpu/mid` (git bbbbbbb)" in rest and "| salad at 90% (>= 7x cuDNN) | <= 1.6 ms | 2.000 ms |" in rest
    assert "results/gpu/old" not in block and "1.500" not in block  # the newer measurement wins
    assert "salad at 90%" not in block.split("Targets without rows in any run of this card: ")[1]
