"""The sweep engine: resume hands back done rows, each failure kind becomes its row, rows are appended as
measured, speedups are attached to timed rows."""

from __future__ import annotations

import pytest
import torch

from salad_bench.harness.engine import Cell, Engine
from salad_bench.harness.results import RowWriter, cell_identity, read_jsonl
from salad_bench.kernels.errors import Unsupported


def _cell(method: str, sparsity: float = 0.5, **kw) -> Cell:
    ident = cell_identity("kernel", method, {"s": sparsity}, "w", "fp32", "fwd", sparsity)
    return Cell(ident, {"N": 64}, **kw)


def _timed(ms: float = 2.0):
    calls = []

    def measure(cell: Cell) -> dict:
        calls.append(cell.ident["method"])
        return {"status": "ok", "reason": "", "ms": ms}

    return measure, calls


class Bar:
    def __init__(self) -> None:
        self.n, self.notes = 0, []

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        self.notes.append(text)


def test_resume_skips_done_cells_and_hands_back_their_rows(tmp_path):
    measure, calls = _timed()
    first = Engine(RowWriter(tmp_path / "run")).run([_cell("a"), _cell("b")], measure)
    assert calls == ["a", "b"]
    bar = Bar()
    again = Engine(RowWriter(tmp_path / "run", resume=True), bar)
    rows = again.run([_cell("a"), _cell("b"), _cell("c")], measure)
    assert calls == ["a", "b", "c"]  # a and b not measured again
    assert rows[:2] == first and rows[2]["method"] == "c" and bar.n == 3
    assert [r["method"] for r in read_jsonl(tmp_path / "run" / "rows.jsonl")] == ["a", "b", "c"]


def test_pending_drops_done_cells_and_counts_them_as_progress(tmp_path):
    measure, _ = _timed()
    Engine(RowWriter(tmp_path / "run")).run([_cell("a")], measure)
    bar = Bar()
    todo = Engine(RowWriter(tmp_path / "run", resume=True), bar).pending([_cell("a"), _cell("b")])
    assert [c.ident["method"] for c in todo] == ["b"] and bar.n == 1


def test_without_resume_every_cell_is_measured(tmp_path):
    measure, calls = _timed()
    engine = Engine(RowWriter(tmp_path / "run"), resume=False)
    engine.run([_cell("a"), _cell("a")], measure)
    assert calls == ["a", "a"] and len(read_jsonl(tmp_path / "run" / "rows.jsonl")) == 2


def _raises(exc: BaseException):
    def measure(cell: Cell) -> dict:
        raise exc

    return measure


def test_unsupported_is_a_skipped_row_and_done(tmp_path):
    writer = RowWriter(tmp_path / "run")
    row = Engine(writer).cell(_cell("a"), _raises(Unsupported("needs a CUDA device")))
    assert (row["status"], row["reason"], row["N"]) == ("skipped", "needs a CUDA device", 64)
    assert writer.is_done(_cell("a").ident)  # a skip is not retried


def test_out_of_memory_is_an_error_row_after_emptying_the_cache(tmp_path, monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    writer = RowWriter(tmp_path / "run")
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB\nmore detail")
    row = Engine(writer).cell(_cell("a"), _raises(oom))
    assert row["status"] == "error" and emptied == [1]
    assert row["reason"] == ("out of memory: CUDA out of memory. Tried to allocate 26.00 GiB; "
                             "try a smaller workload or batch")
    assert not writer.is_done(_cell("a").ident)  # an error is retried on resume


def test_any_other_exception_is_an_error_row_with_its_last_traceback_line(tmp_path):
    def measure(cell: Cell) -> dict:
        raise ValueError("block_q must divide 128")

    row = Engine(RowWriter(tmp_path / "run")).cell(_cell("a"), measure)
    assert row["status"] == "error"
    assert row["reason"].startswith("ValueError: block_q must divide 128 [")
    assert row["reason"].endswith("ValueError: block_q must divide 128]")
    long = Engine(RowWriter(tmp_path / "run2")).cell(_cell("a"), _raises(RuntimeError("x" * 2000)))
    assert len(long["reason"]) == 500


def test_rows_are_appended_as_measured_so_an_interrupt_loses_nothing(tmp_path):
    def measure(cell: Cell) -> dict:
        if cell.ident["method"] == "c":
            raise KeyboardInterrupt
        if cell.ident["method"] == "b":
            raise RuntimeError("broken cell")
        return {"status": "ok", "reason": "", "ms": 1.0}

    with pytest.raises(KeyboardInterrupt):
        Engine(RowWriter(tmp_path / "run")).run([_cell(m) for m in "abcd"], measure)
    rows = read_jsonl(tmp_path / "run" / "rows.jsonl")
    assert [(r["method"], r["status"]) for r in rows] == [("a", "ok"), ("b", "error")]


def test_speedups_are_attached_to_rows_with_a_time(tmp_path):
    engine = Engine(RowWriter(tmp_path / "run"))
    base = {"speedup": 8.0, "speedup_vs_fa2": None}
    row = engine.cell(_cell("a", base=base), _timed(2.0)[0])
    assert row["speedup"] == 4.0 and row["speedup_vs_fa2"] is None
    failed = engine.cell(_cell("b", base=base), _raises(RuntimeError("no")))
    assert "speedup" not in failed
    assert "speedup" not in engine.cell(_cell("c"), _timed(2.0)[0])


def test_fail_gives_every_cell_its_row_and_progress(tmp_path):
    seen = []
    rows = Engine(RowWriter(tmp_path / "run"), seen.append).fail([_cell("a"), _cell("b")], "skipped", "too big")
    assert [(r["method"], r["status"], r["reason"], r["N"]) for r in rows] == [
        ("a", "skipped", "too big", 64), ("b", "skipped", "too big", 64)]
    assert seen == rows


def test_progress_shows_the_cell_and_counts_every_cell(tmp_path):
    bar = Bar()
    Engine(RowWriter(tmp_path / "run"), bar).run([_cell("a", label="w a"), _cell("b", label="w b")], _timed()[0])
    assert bar.notes == ["w a", "w b"] and bar.n == 2


def test_fail_hands_back_done_cells_on_resume(tmp_path):
    Engine(RowWriter(tmp_path / "run")).fail([_cell("a")], "skipped", "needs a CUDA device")
    again = Engine(RowWriter(tmp_path / "run", resume=True))
    rows = again.fail([_cell("a"), _cell("b")], "skipped", "needs a CUDA device")
    assert [r["method"] for r in rows] == ["a", "b"]
    assert [r["method"] for r in read_jsonl(tmp_path / "run" / "rows.jsonl")] == ["a", "b"]


def test_an_attention_workload_without_memory_for_qkv_gives_each_cell_an_error_row(tmp_path, monkeypatch):
    import json

    from salad_bench.harness import runner

    def no_memory(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runner, "make_qkv", no_memory)
    spec = runner.make_spec("topk", sparsities=[0.9], workloads="cpu-tiny", device="cpu", out=tmp_path / "r",
                            quick=True, baselines=False, backward=True)
    runner.run(spec, quiet=True)
    rows = read_jsonl(tmp_path / "r" / "rows.jsonl")
    assert [(r["method"], r["pass"], r["status"]) for r in rows] == [("topk", "fwd", "error"), ("topk", "fwd+bwd", "error")]
    assert all("out of memory creating q/k/v for cpu-tiny" in r["reason"] for r in rows)
    assert json.loads(rows[0]["config"])["sparsity"] == 0.9 and rows[0]["N"] > 0
