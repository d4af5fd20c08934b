"""Adapter to VBench (Vchitect/VBench, pip ``vbench``), which lives in its own environment.

VBench 0.1.5 pins numpy<2 and transformers 4.33.2, so it cannot share this project's interpreter; it
runs as a subprocess of a separate Python whose path is a setting: the ``python`` argument or the
``SALAD_VBENCH_PYTHON`` environment variable (e.g. ``/work/vbench-venv/bin/python``).

* :func:`write_custom_input` writes videos in VBench's ``custom_input`` layout: one mp4 per video in a
  flat folder, named ``<prompt>-<i>.mp4`` (VBench reads the prompt back from the filename, stripping
  ``-<i>``).
* :func:`run_vbench` runs ``vbench evaluate --videos_path DIR --dimension D1 D2 ... --mode custom_input
  --output_path OUT`` with that interpreter's ``vbench`` entry point and reads the newest
  ``<name>_eval_results.json`` back. VBench's launcher calls ``dist_init()`` (NCCL) and
  ``torch.cuda.set_device``, so the CLI needs a CUDA device; on a machine without one
  (``runner="auto"``) the adapter falls back to VBench's Python API, ``VBench("cpu", full_info,
  out).evaluate(..., mode="custom_input")``, in the same separate interpreter, and says so in the result.
* :func:`vbench_rows` turns the results into flat rows (one per dimension).

Only ``temporal_flickering`` runs without downloaded weights; other dimensions fetch models (DINO,
CLIP, MUSIQ, RAFT, AMT, ...) into ``$VBENCH_CACHE_DIR`` on first use and fail offline.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from salad_bench.harness.errors import Parser

__all__ = ["VBenchResult", "VBenchUnavailable", "resolve_python", "run_vbench", "vbench_rows", "write_custom_input"]

ENV_VAR = "SALAD_VBENCH_PYTHON"
# Dimensions VBench refuses in custom_input mode (they need its own prompt suite's metadata).
NOT_CUSTOM = {"object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship"}


class VBenchUnavailable(RuntimeError):
    """The separate VBench environment is not configured or cannot run; the message says why."""


@dataclass
class VBenchResult:
    """Per-dimension aggregate scores and per-video scores, plus how VBench was run."""

    scores: dict[str, float]
    per_video: dict[str, list[dict[str, Any]]]
    results_file: Path
    runner: str
    notes: list[str] = field(default_factory=list)


def resolve_python(python: str | None = None) -> str:
    """The VBench interpreter: ``python`` or ``$SALAD_VBENCH_PYTHON``; raises :class:`VBenchUnavailable`."""
    py = python or os.environ.get(ENV_VAR)
    if not py:
        raise VBenchUnavailable(
            f"no VBench environment configured: set {ENV_VAR} to its python (e.g. /path/vbench-venv/bin/python)"
        )
    if not (Path(py).is_file() and os.access(py, os.X_OK)):
        raise VBenchUnavailable(f"{ENV_VAR}={py} is not an executable file")
    probe = subprocess.run(
        [py, "-c", "import vbench, sys; print(sys.version.split()[0])"], capture_output=True, text=True, timeout=300
    )
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["?"]
        raise VBenchUnavailable(f"{py} cannot import vbench: {tail[0][:200]}")
    return py


def write_custom_input(
    videos: torch.Tensor, prompts: Sequence[str], out_dir: str | Path, *, fps: int = 8
) -> list[Path]:
    """Write ``videos`` ``(B, 3, T, H, W)`` in [-1, 1] as ``<out_dir>/<prompt>-<i>.mp4`` (i counts per prompt)."""
    import imageio.v2 as imageio

    from salad_bench.harness.quality.metrics import to_uint8

    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos but {len(prompts)} prompts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    paths = []
    for frames, prompt in zip(to_uint8(videos), prompts, strict=True):
        if "/" in prompt or not prompt.strip():
            raise ValueError(f"prompt {prompt!r} cannot be a file name")
        i = counts.get(prompt, 0)
        counts[prompt] = i + 1
        path = out / f"{prompt}-{i}.mp4"
        # near-lossless H.264 so VBench's decoded frames stay close to the generated ones
        writer = imageio.get_writer(
            path, fps=fps, codec="libx264", quality=10, macro_block_size=1, ffmpeg_log_level="error"
        )
        for frame in frames:
            writer.append_data(frame)
        writer.close()
        paths.append(path)
    return paths


_API_SNIPPET = """
import json, sys
from vbench import VBench
videos, out, name, dims = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
import vbench, os
full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
VBench("cpu", full_info, out).evaluate(videos_path=videos, name=name, dimension_list=dims, mode="custom_input")
"""


def _newest_results(out: Path, since: float) -> Path | None:
    files = [Path(p) for p in glob.glob(str(out / "*_eval_results.json"))]
    files = [p for p in files if p.stat().st_mtime >= since - 1]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def run_vbench(
    videos_dir: str | Path,
    dimensions: Sequence[str],
    out_dir: str | Path,
    *,
    python: str | None = None,
    runner: Literal["auto", "cli", "api"] = "auto",
    timeout_s: float = 1800,
) -> VBenchResult:
    """Evaluate the mp4s in ``videos_dir`` on ``dimensions`` with the separate VBench environment."""
    import time

    dims = list(dimensions)
    bad = sorted(set(dims) & NOT_CUSTOM)
    if bad:
        raise ValueError(f"VBench does not support {', '.join(bad)} in custom_input mode")
    py = resolve_python(python)
    bindir = str(Path(py).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}  # its launcher calls `python`
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    videos = str(Path(videos_dir).resolve())
    notes: list[str] = []
    if runner in ("auto", "cli"):
        start = time.time()
        exe = Path(bindir) / "vbench"
        cli = [str(exe)] if exe.exists() else [py, "-c", "from vbench.cli.vbench import main; main()"]
        cmd = cli + [
            "evaluate",
            "--videos_path",
            videos,
            "--dimension",
            *dims,
            "--mode",
            "custom_input",
            "--output_path",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        found = _newest_results(out, start)
        if found is not None:
            return _parse(found, "cli", notes)
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[:400]
        notes.append(f"vbench CLI produced no results (rc={proc.returncode}): {tail}")
        if runner == "cli":
            raise VBenchUnavailable(notes[-1])
    start = time.time()
    name = f"salad_{int(start)}"
    proc = subprocess.run(
        [py, "-c", _API_SNIPPET, videos, str(out), name, ",".join(dims)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    found = out / f"{name}_eval_results.json"
    if proc.returncode != 0 or not found.exists():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[:400]
        raise VBenchUnavailable(f"VBench's Python API failed (rc={proc.returncode}): {tail}; " + "; ".join(notes))
    return _parse(found, "api", notes)


def _parse(path: Path, runner: str, notes: list[str]) -> VBenchResult:
    raw = json.loads(path.read_text())
    scores, per_video = {}, {}
    for dim, val in raw.items():
        # VBench stores [aggregate, [{"video_path": ..., "video_results": ...}, ...]]
        agg, videos = (val[0], val[1]) if isinstance(val, list) and len(val) == 2 else (val, [])
        scores[dim] = float(agg)
        per_video[dim] = list(videos)
    return VBenchResult(scores, per_video, path, runner, notes)


def vbench_rows(result: VBenchResult, **identity: Any) -> list[dict[str, Any]]:
    """One flat row per dimension: ``identity`` fields plus ``dimension``, ``score``, ``n_videos``, runner."""
    return [
        {
            **identity,
            "dimension": dim,
            "score": score,
            "n_videos": len(result.per_video.get(dim, [])),
            "vbench_runner": result.runner,
            "vbench_results_file": str(result.results_file),
            "reason": "; ".join(result.notes),
        }
        for dim, score in result.scores.items()
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m salad_bench.harness.quality.vbench --samples RUN/samples.npz --out DIR``: score a study's saved
    samples with VBench (one mp4 folder and one VBench run per method) and write rows of kind "quality"
    (``pass`` "vbench"), each with our in-process score beside VBench's for ``temporal_flickering``."""

    import numpy as np

    from salad_bench.harness.quality.data import CLASS_NAMES
    from salad_bench.harness.quality.metrics import temporal_flickering_videos
    from salad_bench.harness.results import RowWriter

    p = Parser(prog="python -m salad_bench.harness.quality.vbench", description=main.__doc__.split("\n")[0])
    p.add_argument("--samples", required=True, help="samples.npz written by harness.quality.evaluate --save-samples")
    p.add_argument("--out", required=True, help="run directory for rows.jsonl, the mp4s and VBench's outputs")
    p.add_argument("--methods", default="", help="comma list (default: every method in the file)")
    p.add_argument("--dims", default="temporal_flickering")
    p.add_argument("--python", default=None, help=f"VBench interpreter (default ${ENV_VAR})")
    p.add_argument("--runner", choices=("auto", "cli", "api"), default="auto")
    a = p.parse_args(argv)
    data = np.load(a.samples)
    labels = data["labels"]
    names = [m for m in (a.methods.split(",") if a.methods else data.files) if m != "labels"]
    dims = [d for d in a.dims.split(",") if d]
    writer = RowWriter(a.out)
    for i, name in enumerate(names):
        videos = torch.from_numpy(data[name]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # uint8 back to [-1, 1]
        folder = Path(a.out) / "videos" / name
        write_custom_input(videos, [CLASS_NAMES[int(x)] for x in labels], folder)
        identity = {"kind": "quality", "pass": "vbench", "method": name, "samples": str(a.samples)}
        try:
            # the CLI needs CUDA (see the module docstring): try it once, then go straight to the API
            res = run_vbench(
                folder, dims, Path(a.out) / "vbench" / name, python=a.python, runner=a.runner if i == 0 else "api"
            )
        except (VBenchUnavailable, OSError) as exc:
            writer.append({**identity, "status": "skipped", "reason": str(exc)[:400]})
            continue
        for row in vbench_rows(res, **identity):
            if row["dimension"] == "temporal_flickering":
                row["ours_uint8_frames"] = temporal_flickering_videos(videos)
            writer.append({**row, "status": "ok"})
            print(f"{name:>16} {row['dimension']}: vbench {row['score']:.4f} ({row['vbench_runner']})", flush=True)
    return 0


if __name__ == "__main__":
    import sys

    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
