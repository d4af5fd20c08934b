"""``python -m salad_bench.harness.quality.study``: the quality study of issue #25, from its experiment config.

    python -m salad_bench.harness.quality.study --config salad_bench/harness/experiments/quality_study.toml \\
        --out results/quality/<run>
    torchrun --standalone --nproc_per_node=N -m salad_bench.harness.quality.study ...   # cells dealt over ranks

What it runs (:mod:`harness.quality.study_config` reads the config; :mod:`harness.quality.evaluate` runs
each cell):

1. **Sweep**: for every (trainable method, arm) of the config's cell groups, and for the control (the
   registry's ``reference`` method in the control arm), one cell per candidate learning rate at the sweep's
   seed, steps and sparsity; beside them every training-free method at each of its sparsities, and the
   reference as it is (the base model, the teacher).
2. **Pick**: per (method, arm) the rate with the lowest val loss among its sweep cells
   (:func:`harness.quality.stats.pick_lrs`; every rank reads the same rows).
3. **Final**: every (method, arm) at each of its sparsities and each seed of the budget at its picked rate,
   with the budget's steps (a final cell identical to a sweep cell, when the sweep runs the full budget,
   is not run twice).
4. **Intervals and verdicts** (rank 0): :func:`harness.quality.stats.summary_rows` and
   :func:`~harness.quality.stats.hypothesis_rows` are appended to the run as rows (kinds
   ``quality_summary`` and ``hypothesis``), ``intervals.md`` is written beside them, and ``--reports DIR``
   (default ``reports``) regenerates that directory's tables and figures from the sources its
   ``README.md`` lists plus this run, so ``reports/quality.*`` and ``reports/ablation.*`` carry the
   intervals. ``--commit`` then commits the run's rows, config and intervals and the reports with git.

Resume: the same command continues a stopped study. Cells already ``ok`` in the run are skipped (a cell's
identity covers its method, target and recipe), a killed fine-tuning continues from its state in
``<out>/finetuned/<cell>.resume.pt``, and the picks are recomputed from the rows. Every row carries the
provenance (git SHA and dirty flag, card, versions, command) and the study's stamps (its name, the sweep,
the budget's steps and seeds), so the rows alone say which were sweeps and which were final. The config
used is copied to ``<out>/study.toml``. A base model that misses the base-model bar is refused (exit 2;
``--no-base-bar`` measures anyway and the rows say so); a malformed config exits 2 naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from salad_bench.harness.errors import Parser
from salad_bench.harness.quality.study_config import StudyConfig, StudyConfigError, load_config

__all__ = ["Plan", "commit_run", "main", "plan", "regenerate_reports"]


def _traits(name: str) -> frozenset[str]:
    from salad_bench.methods import METHODS

    return METHODS.get(name).traits


@dataclasses.dataclass
class Plan:
    """The study's cells: ``pairs`` (method, arm) -> its sparsities; ``as_is`` cells; sweeps and finals."""

    config: StudyConfig
    pairs: dict[tuple[str, str], tuple[float, ...]]
    as_is: list[Any]  # Cell
    sweep: list[Any]  # Cell
    stamps: dict[Any, dict[str, Any]]  # Cell -> row fields

    def sweep_sparsity(self, method: str, sparsities: tuple[float, ...]) -> float:
        if "dense" in _traits(method):
            return 0.0
        goal = self.config.sweep_sparsity
        return min(sparsities, key=lambda s: (abs(s - goal), -s))

    def final(self, picks: dict[tuple[str, str], float]) -> tuple[list[Any], list[tuple[str, str]]]:
        """The final cells at the picked rates, and the pairs that have no pick yet."""
        cells, missing = [], []
        for (method, arm), sparsities in self.pairs.items():
            lr = picks.get((method, arm))
            if lr is None:
                missing.append((method, arm))
                continue
            for s in sparsities:
                for seed in self.config.seeds:
                    cells.append(self._cell(method, arm, s, lr, seed, self.config.steps, "final"))
        return cells, missing

    def _cell(self, method: str, arm: str, s: float, lr: float, seed: int, steps: int, phase: str):
        from salad_bench.harness.quality.evaluate import Recipe, make_cell

        c = self.config
        a = c.arms[arm]
        recipe = Recipe(arm, a.train_params, a.objective, lr, seed, steps)
        cell = make_cell(method, s, recipe, control="reference" in _traits(method), default_arm=c.default_arm)
        stamp = {"study": c.name, "study_phase": phase, "sweep_steps": c.sweep_steps, "sweep_seed": c.sweep_seed,
                 "sweep_sparsity": self.sweep_sparsity(method, self.pairs[(method, arm)]), "budget_steps": c.steps,
                 "study_seeds": list(c.seeds), "lr_candidates": list(a.lrs)}  # fmt: skip
        self.stamps.setdefault(cell, stamp)  # a final cell that is also a sweep cell keeps its sweep stamp
        return cell


def _needed(config: StudyConfig) -> set[tuple[str, str, float]]:
    """(method, arm, target) of every cell some hypothesis compares (training-free methods under any arm)."""
    out = set()
    for h in config.hypotheses:
        for s in h.sparsities:
            out.add((h.method, h.arm, s))
            if not h.versus.startswith("@"):
                out.add((h.versus, h.versus_arm, s))
    return out


def plan(config: StudyConfig, *, only_hypotheses: bool = False) -> Plan:
    """Expand the config into its (method, arm) pairs, untrained cells and sweep cells. ``only_hypotheses``:
    only the cells the hypotheses compare, and the control (the same cells, so a later full run skips them)."""
    from salad_bench.harness.quality.evaluate import make_cell, reference_method

    needed = _needed(config) if only_hypotheses else None
    pairs: dict[tuple[str, str], tuple[float, ...]] = {}
    as_is: list[Any] = []
    for g in config.groups:
        for m in g.methods:
            trainable = "trainable" in _traits(m)
            for s in g.sparsities:
                if trainable:
                    for arm in g.arms:
                        if needed is None or (m, arm, s) in needed:
                            pairs[(m, arm)] = tuple(sorted({*pairs.get((m, arm), ()), s}))
                elif needed is None or any(n[0] == m and n[2] == s for n in needed):
                    cell = make_cell(m, s, None)
                    if cell not in as_is:
                        as_is.append(cell)
    ref = reference_method()
    pairs[(ref, config.control_arm)] = (0.0,)
    base = make_cell(ref, 0.0, None)
    if base not in as_is:
        as_is.insert(0, base)
    p = Plan(config, pairs, as_is, [], {c: {"study": config.name, "study_phase": "as_is", "budget_steps": config.steps,
                                            "study_seeds": list(config.seeds)} for c in as_is})  # fmt: skip
    for (method, arm), sparsities in pairs.items():
        s = p.sweep_sparsity(method, sparsities)
        for lr in config.arms[arm].lrs:
            p.sweep.append(p._cell(method, arm, s, lr, config.sweep_seed, config.sweep_steps, "sweep"))
    return p


# -- reports and commits ---------------------------------------------------------------------------
def _report_sources(reports: Path) -> list[str]:
    """The run directories the committed ``reports/README.md`` says it was generated from."""
    readme = reports / "README.md"
    if not readme.exists():
        return []
    for line in readme.read_text().splitlines():
        if line.startswith("Sources:"):
            return re.findall(r"`([^`]+)`", line)
    return []


def regenerate_reports(run: Path, reports: Path, *, figures: bool = True) -> list[Path]:
    """Rewrite ``reports`` from the sources its README lists plus ``run`` (the latest row of each cell wins)."""
    from salad_bench.harness.report import write_reports
    from salad_bench.harness.results import latest_per_cell, load_rows

    sources = [s for s in _report_sources(reports) if Path(s).exists() and Path(s).resolve() != run.resolve()]
    sources.append(str(run))
    df = latest_per_cell(load_rows(sources))
    return write_reports(df, reports, sources=sources, figures=figures)


def commit_run(paths: list[Path], message: str, cwd: Path | None = None) -> str:
    """``git add`` then ``git commit -m message -- paths`` (only these paths); returns what happened."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)

    if git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        return "not committed: not inside a git work tree (a device copy; commit the returned run where it lands)"
    files = [str(p) for p in paths if p.exists()]
    add = git("add", "--", *files)
    if add.returncode:
        return f"not committed: git add failed: {add.stderr.strip()[:300]}"
    done = git("commit", "-m", message, "--", *files)
    if done.returncode:
        out = (done.stdout + done.stderr).strip()
        return "nothing to commit" if "nothing" in out else f"not committed: {out[:300]}"
    return "committed " + git("rev-parse", "--short", "HEAD").stdout.strip()


# -- the CLI ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m salad_bench.harness.quality.study", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="the study's TOML (default: salad_bench/harness/experiments/quality_study.toml)")
    p.add_argument("--out", help="the run directory (rows, curves, study.toml, intervals.md)")
    p.add_argument("--checkpoint", default=None, help="the base model (default: the config's)")
    p.add_argument("--classifier", default=None, help="video classifier for sample quality (default: the config's, else the bar's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--time-budget", type=float, default=None, help="start no new cell after this many seconds")
    p.add_argument("--method-time-cap", type=float, default=None, help="stop one fine-tuning after this many seconds")
    p.add_argument("--trainable-weight", type=float, default=20.0, help="a fine-tuned cell weighs this many evaluated ones")
    p.add_argument("--reports", default="reports", help="regenerate this reports directory at the end ('none': do not)")
    p.add_argument("--no-figures", action="store_true", help="tables only when regenerating the reports")
    p.add_argument("--commit", action="store_true", help="git-commit the run's rows, config, intervals and the reports")
    p.add_argument("--report-only", action="store_true", help="run nothing: intervals, verdicts and reports from the rows")
    p.add_argument("--dry-run", action="store_true", help="print the plan (sweep, untrained and final cell counts) and exit")
    p.add_argument("--only-hypotheses", action="store_true",
                   help="only the cells the hypotheses compare, and the control: the same cells (a later full run skips them)")
    p.add_argument("--no-base-bar", action="store_true", help="do not ask the base-model bar; the rows say so")
    p.add_argument("--echo", action="store_true", help="print training curves as they come")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        config = load_config(a.config)
    except StudyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    p = plan(config, only_hypotheses=a.only_hypotheses)
    if a.dry_run:
        finals = sum(len(s) * len(config.seeds) for s in p.pairs.values())
        print(f"study {config.name}: {len(p.pairs)} (method, arm) pairs, {len(p.sweep)} sweep cells, {len(p.as_is)} "
              f"untrained cells, {finals} final cells (some may equal sweep cells)")  # fmt: skip
        for (m, arm), sp in p.pairs.items():
            print(f"  {m:>20} {arm:<8} sparsities {', '.join(f'{s:g}' for s in sp)}")
        return 0
    if not a.out:
        print("error: --out is required", file=sys.stderr)
        return 2
    out = Path(a.out)
    if a.report_only:
        return _finish(config, out, a)
    checkpoint = a.checkpoint or config.checkpoint
    from salad_bench.harness.quality.evaluate import check_base_bar

    try:
        bar = check_base_bar(checkpoint, skip=a.no_base_bar or not config.require_base_bar)
    except Exception as exc:  # noqa: BLE001 - the bar's verdict, whatever its type
        print(f"error: {checkpoint} does not pass the base-model bar: {type(exc).__name__}: {exc} "
              "(or pass --no-base-bar to measure anyway)", file=sys.stderr)  # fmt: skip
        return 2
    _run(config, p, out, checkpoint, bar, a)
    from salad_bench.harness.distributed import Dist

    return _finish(config, out, a) if Dist.from_env().main else 0


def _run(config: StudyConfig, p: Plan, out: Path, checkpoint: str, bar: str, a: argparse.Namespace) -> None:
    import torch

    from salad_bench.harness.distributed import barrier
    from salad_bench.harness.quality import evaluate as ev
    from salad_bench.harness.quality.model import load_checkpoint
    from salad_bench.harness.quality.stats import Cells
    from salad_bench.harness.quality.train import FINETUNE_DEFAULTS, CurveLogger, Dist
    from salad_bench.harness.results import RowWriter

    # every rank its own study (no DDP); ranks meet only at gloo barriers, so several may share a GPU
    dist, device = ev.rank_and_device(a.device, ddp=False, exclusive=config.latency,
                                      hint=" ([eval] latency = false lets ranks share GPUs)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if dist.main:
        saved = out / "study.toml"
        if saved.exists() and saved.read_text() != config.text:
            print(f"note: {saved} differs from {config.path}: the run continues under the new config "
                  f"(the old one is kept as study.toml.prev)", flush=True)  # fmt: skip
            saved.replace(out / "study.toml.prev")
        saved.write_text(config.text)
    base, card = load_checkpoint(checkpoint, device)
    budget = dataclasses.replace(FINETUNE_DEFAULTS, steps=config.steps, batch_size=config.batch, warmup_steps=config.warmup,
                                 dataset_size=config.train_videos, time_budget_s=a.method_time_cap,
                                 ckpt_every=config.checkpoint_every)  # fmt: skip
    settings = ev.EvalSettings(n_val=config.n_val, n_eval=config.n_eval, sample_steps=config.sample_steps,
                               latency=config.latency, save_samples=config.save_samples, keep_videos=config.keep_videos,
                               t_bands=config.t_bands, t_per_band=config.t_per_band)  # fmt: skip
    writer = RowWriter(out, resume=True, device=str(device), **({"rank": dist.rank, "world_size": dist.world}
                                                               if dist.world > 1 else {}))  # fmt: skip
    curve = CurveLogger(out / "curves.jsonl", echo=a.echo)
    study = ev.QualityStudy(base, card, device=device, settings=settings, ft_cfg=budget, checkpoint=checkpoint,
                            dist=Dist(), curve=curve, base_bar=bar)  # fmt: skip
    study.vbench_dir = str(out / "vbench")
    study.finetuned_dir = str(out / "finetuned")
    study.classifier_dir = a.classifier or config.classifier or ev.default_classifier(checkpoint)
    tag = f"[rank {dist.rank}] " if dist.world > 1 else ""

    def phase(name: str, cells: list) -> None:
        barrier(dist)
        done = ev.done_hashes(ev.existing_rows(out))
        todo = [c for c in dict.fromkeys(cells) if c.config_hash(budget) not in done]
        mine = ev.deal_cells(todo, dist.rank, dist.world, a.trainable_weight)
        print(f"{tag}{name}: {len(todo)} of {len(cells)} cells to run, {len(mine)} here", flush=True)
        ev.run_cells(study, mine, writer, out=out, time_budget=a.time_budget, t_start=t_start, tag=tag, extras=p.stamps)
        barrier(dist)

    phase("sweep and untrained cells", p.as_is + p.sweep)
    picks = Cells([r for r in ev.existing_rows(out) if r.get("kind") == "quality" and r.get("status") == "ok"]).picks
    finals, missing = p.final(picks)
    for m, arm in missing:
        print(f"{tag}no rate picked for {m} ({arm}): none of its sweep cells is ok; its final cells wait", flush=True)
    phase("final cells", finals)


def _finish(config: StudyConfig, out: Path, a: argparse.Namespace) -> int:
    """Intervals and verdicts appended as rows, intervals.md, the reports and the commit."""
    from salad_bench.harness.quality import stats
    from salad_bench.harness.quality.evaluate import existing_rows
    from salad_bench.harness.results import RowWriter

    rows = [r for r in existing_rows(out) if r.get("kind") == "quality" and r.get("status") == "ok"
            and r.get("study") == config.name]  # fmt: skip
    if not rows:
        print(f"error: no ok rows of study {config.name} in {out}", file=sys.stderr)
        return 2
    cells = stats.Cells(rows)
    summ = stats.summary_rows(cells, control_arm=config.control_arm, study=config.name, draws=config.bootstrap_draws,
                              confidence=config.confidence)  # fmt: skip
    hyp = stats.hypothesis_rows(cells, config)
    writer = RowWriter(out, resume=True)
    for r in summ + hyp:
        writer.append(r)
    (out / "intervals.md").write_text(stats.markdown(summ, hyp))
    for h in hyp:
        print(f"{h['hypothesis']}: {h['verdict']} - {h['claim']}", flush=True)
    written: list[Path] = []
    if a.reports != "none":
        written = regenerate_reports(out, Path(a.reports), figures=not a.no_figures)
        print(f"reports: {len(written)} files in {a.reports}/", flush=True)
    if a.commit:
        paths = sorted(out.glob("rows*.jsonl")) + [out / "curves.jsonl", out / "study.toml", out / "intervals.md", *written]
        trained = sum(1 for r in rows if r.get("arm") != "as_is")
        msg = (f"quality study {config.name}: {len(rows)} cells ({trained} fine-tuned) in {out}, "
               f"{sum(h['verdict'] == 'held' for h in hyp)} of {len(hyp)} hypotheses held; rows carry git_sha "
               f"{rows[0].get('git_sha')}, card {rows[0].get('card')}")  # fmt: skip
        print(commit_run(paths, msg), flush=True)
    return 0


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
