"""The paper's tables as an experiment config (experiments/paper_tables.toml): every table reads its rows,
grouping, goal and columns from it, and a bad file is refused with a message naming the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from salad_bench import cli
from salad_bench.harness import report
from salad_bench.harness.errors import BadInput
from tests.harness.test_report import CARD, synthetic_rows


def _headline_rows() -> pd.DataFrame:
    rows = [{"kind": "kernel", "method": m, "variant": f"headline_r{r}", "round": r, "status": "ok", "ms": ms * (1 + r / 10),
             "card": CARD, "run_id": "run1", "git_sha": "abc1234"}
            for r in range(3) for m, ms in (("sdpa_cudnn", 11.5), ("triton_block_sparse", 1.6))]  # fmt: skip
    return pd.concat([synthetic_rows(), pd.DataFrame(rows)], ignore_index=True)


def _toml(files: dict[str, list[str]], tables: dict[str, dict]) -> str:
    """A paper-tables file (JSON strings and lists of strings are TOML too)."""

    def value(v: object) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    out = ["[files]", *(f"{k} = {value(v)}" for k, v in files.items())]
    for name, keys in tables.items():
        out += ["", f"[tables.{name}]", *(f"{k} = {value(v)}" for k, v in keys.items())]
    return "\n".join(out) + "\n"


def _keys(spec: report.TableSpec) -> dict:
    keys = {"group_by": list(spec.group_by), "columns": list(spec.columns), "optional": list(spec.optional),
            "goal": spec.goal, "families": list(spec.families), "headers": dict(spec.headers)}  # fmt: skip
    return keys | ({"kind": spec.kind} if spec.kind else {})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tables.toml"
    path.write_text(text)
    return path


def test_committed_file_lays_out_every_table() -> None:
    paper = report.load_tables()
    assert paper == report.TABLES
    assert {n for names in paper.files.values() for n in names} == set(report.BUILDERS) == set(paper.tables)
    assert list(paper.files) == ["main", "ablation", "quality", "kernel", "dit", "skipped"]
    assert paper.tables["ablation"].families == ("salad", "ablation") and paper.tables["ablation"].goal == 0.9


@pytest.mark.parametrize("name", list(report.BUILDERS))
def test_each_table_takes_its_columns_and_headers_from_the_config(tmp_path: Path, name: str) -> None:
    spec = report.TABLES.tables[name]
    first, second = spec.columns[1], spec.columns[0]  # the first two swapped, the first renamed
    keys = _keys(spec) | {"columns": [first, second], "optional": [], "headers": {first: "from the config"}}
    paper = report.load_tables(_write(tmp_path, _toml({"one": [name]}, {name: keys})))
    tables = report.build_tables(_headline_rows(), paper)["one"]
    assert tables, name
    for t in tables:
        assert t.headers == ["from the config", report.col(second).header], (name, t.title)


def test_files_group_by_and_order_come_from_the_config(tmp_path: Path) -> None:
    keys = _keys(report.TABLES.tables["main"]) | {"group_by": ["card", "dtype"]}
    paper = report.load_tables(_write(tmp_path, _toml({"all": ["main"]}, {"main": keys})))
    built = report.build_tables(synthetic_rows(), paper)
    assert list(built) == ["all"]
    assert len(built["all"]) == 1 < len(report.main_tables(synthetic_rows()))  # two workloads, one card
    assert built["all"][0].title == f"{CARD} · bf16" and "workload ?" in built["all"][0].caption


def test_ablation_goal_and_families_come_from_the_config(tmp_path: Path) -> None:
    keys = _keys(report.TABLES.tables["ablation"]) | {"goal": 0.5, "families": ["ablation"]}
    paper = report.load_tables(_write(tmp_path, _toml({"ablation": ["ablation"]}, {"ablation": keys})))
    (t,) = report.build_tables(synthetic_rows(), paper)["ablation"]
    assert "nearest 50%" in t.caption
    assert [row[0] for row in t.cells] == ["salad_no_gate", "salad_no_rope"]  # no salad: not of the families
    assert [row[2] for row in t.cells] == ["0.90", "0.50"]  # each at its target nearest 50%


def _main_keys(**over: object) -> dict:
    return _keys(report.TABLES.tables["main"]) | over


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (_toml({"main": ["main"]}, {"main": _main_keys(columns=["method", "speedupp"])}),
         "[tables.main] columns: unknown name 'speedupp' (did you mean 'speedup'?)"),
        (_toml({"main": ["mian"]}, {"mian": _main_keys()}), "tables: unknown name 'mian' (did you mean 'main'?); known: main, ablation"),
        (_toml({"main": ["main"]}, {"main": _main_keys(columns="method")}),
         "[tables.main] columns: must be a list of strings, not 'method'"),
        (_toml({"main": ["main"]}, {"main": _main_keys(goal=90)}), "[tables.main] goal: must be a sparsity in [0, 1]"),
        (_toml({"main": ["main"]}, {"main": _main_keys(kind="video")}), "[tables.main] kind: must be one of attention"),
        (_toml({"main": ["main"]}, {"main": _main_keys(families=["salda"])}), "[tables.main] families: unknown name 'salda' (did you mean 'salad'?)"),
        (_toml({"main": ["main"]}, {"main": _main_keys(optional=["psnr"])}), "[tables.main] optional: unknown name 'psnr'"),
        (_toml({"main": ["main"]}, {"main": _main_keys(group="card")}), "[tables.main]: unknown name 'group'"),
        (_toml({"main": ["main"]}, {"main": _main_keys(), "dit": _keys(report.TABLES.tables["dit"])}),
         "[files]: no file shows dit; add it to a file or remove its section"),
        (_toml({"main": ["dit"]}, {"main": _main_keys()}), "[files] main: unknown name 'dit'"),
        ("[files]\nmain = ['main']\n", "top level: must hold [files] and [tables.<name>]"),
        ("[files\n", "cannot read the paper's tables"),
    ],
)
def test_a_bad_config_names_the_file_the_key_and_the_fix(tmp_path: Path, text: str, says: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(BadInput) as err:
        report.load_tables(path)
    assert str(err.value).startswith(f"{path}: ") and says in str(err.value), str(err.value)


def test_a_bad_config_exits_2_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    synthetic_rows().to_json(run / "rows.jsonl", orient="records", lines=True)
    bad = _write(tmp_path, _toml({"main": ["main"]}, {"main": _main_keys(columns=["method", "rel_l3"])}))
    for call in (report.main, lambda argv: cli.main(["report", *argv])):
        assert call([str(run), "--tables", str(bad), "--no-figures", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"error: {bad}: [tables.main] columns: unknown name 'rel_l3' (did you mean 'rel_l2'?)" in err
    assert not (tmp_path / "out").exists()
    good = _write(tmp_path, _toml({"main": ["main"]}, {"main": _main_keys(columns=["method", "ms"], optional=[])}))
    assert report.main([str(run), "--tables", str(good), "--no-figures", "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "main.md", "main.tex"]
    assert "| method | ms |" in (tmp_path / "out" / "main.md").read_text()
