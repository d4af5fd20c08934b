"""The install a user gets: one namespace that shadows nothing, the README's commands as CI runs them,
the console script, the notebook API and methods registered from outside the project."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _readme_commands() -> list[str]:
    """The commands of the first ```bash block under the README's ``## Quick start`` heading."""
    import re

    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\s*$(.*?)^## ", text, flags=re.M | re.S)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"```bash\n(.*?)```", section.group(1), flags=re.S)
    assert block, "README.md's quick start has no ```bash block"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]


# -- README and CI -------------------------------------------------------------------------------
def test_readme_quick_start_is_two_commands_install_and_run_then_test():
    install, test = _readme_commands()
    assert 'pip install -e ".[dev]"' in install and "run_all.py --methods salad,full" in install
    assert test.split()[0] == "pytest"


def test_ci_runs_the_readme_commands_verbatim():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = _readme_commands()
    assert len(commands) == 2
    positions = [ci_lines.index(cmd) for cmd in commands]  # each README command is a line of .ci/run
    assert positions == sorted(positions)  # in the README's order


def test_dev_extra_holds_what_the_tests_import():
    import tomllib

    dev = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"])
    for pkg in ("pytest", "diffusers", "transformers", "kernels", "safetensors", "torchmetrics", "imageio"):
        assert pkg in dev, f"{pkg} is imported by the tests but not in the dev extra"


# -- one namespace -------------------------------------------------------------------------------
def test_nothing_top_level_is_named_kernels_methods_or_harness():
    for name in ("kernels", "methods", "harness"):
        assert not (ROOT / name).exists(), f"a top-level {name}/ would shadow or be shadowed on sys.path"
    assert (ROOT / "salad_bench" / "kernels").is_dir() and (ROOT / "salad_bench" / "methods").is_dir()


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_hugging_face_kernels_and_diffusers_import_beside_ours(where, tmp_path):
    pytest.importorskip("diffusers")
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's kernels package is not installed (the dev extra installs it)")
    cwd = ROOT if where == "root" else tmp_path
    res = _py(
        "import kernels, salad_bench.kernels as ours\n"
        "from diffusers import WanTransformer3DModel\n"
        "import diffusers.loaders.peft\n"
        "from salad_bench.harness.integrations.wan import install_attention\n"
        "print(kernels.__file__, hasattr(kernels, 'get_kernel'))\n",
        cwd,
    )
    assert res.returncode == 0, res.stderr
    path, is_hf = res.stdout.split()
    assert is_hf == "True" and "site-packages" in path, f"`import kernels` found {path}, not Hugging Face's package"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_dit_tiny_runs_from_the_root_and_from_elsewhere(where, tmp_path):
    pytest.importorskip("diffusers")
    cwd = ROOT if where == "root" else tmp_path
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "run_all.py"), "--workloads", "dit:tiny", "--methods", "full,topk",
         "--sparsity", "0.9", "--quick", "--out", str(out)],
        cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["method"]: r["status"] for r in rows} == {"full": "ok", "topk": "ok"}


# -- console script, notebook API, plugins --------------------------------------------------------
def _console() -> list[str]:
    exe = Path(sys.executable).parent / "salad-bench"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "salad_bench"]


def test_console_script_runs_a_sweep_from_another_directory(tmp_path):
    out = tmp_path / "r"
    res = subprocess.run(
        [*_console(), "run", "--methods", "topk", "--sparsity", "0.9", "--quick", "--no-baselines", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert (out / "rows.jsonl").exists()
    bad = subprocess.run([*_console(), "rnu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'run'" in bad.stderr.lower()
    rep = subprocess.run([*_console(), "report", str(out), "--no-figures"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and (out / "report" / "README.md").exists()


def test_notebook_api_returns_a_dataframe(tmp_path):
    import pandas as pd

    import salad_bench

    df = salad_bench.sweep("topk", sparsity=0.9, baselines=False, quick=True, out=tmp_path / "r")
    assert isinstance(df, pd.DataFrame)
    assert list(df["method"]) == ["topk"] and df["status"].iloc[0] == "ok" and df["density"].iloc[0] < 0.3
    with pytest.raises(ValueError, match="not a boolean"):
        salad_bench.sweep("salad", sparsity=0.9, knobs={"salad": {"rope": "maybe"}}, out=tmp_path / "bad")


PLUGIN = '''
from dataclasses import dataclass
from salad_bench.methods.base import METHODS, MethodConfig
from salad_bench.methods.full import Full


@METHODS.register("{name}", family="training_free")
class Mine(Full):
    """A user's own method, registered from outside the project."""
'''


def test_method_from_an_include_path(tmp_path):
    (tmp_path / "mine.py").write_text(PLUGIN.format(name="mine_included"))
    res = subprocess.run(
        [sys.executable, str(ROOT / "run_all.py"), "--include", str(tmp_path / "mine.py"), "--methods", "mine_included",
         "--quick", "--no-baselines", "--sparsity", "0.9", "--out", str(tmp_path / "r")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert '"method": "mine_included"' in (tmp_path / "r" / "rows.jsonl").read_text()


def test_method_from_an_installed_package_entry_point(tmp_path):
    """A package that declares ``[project.entry-points."salad_bench.methods"]`` is registered at import."""
    site = tmp_path / "site"
    (site / "my_methods").mkdir(parents=True)
    (site / "my_methods" / "__init__.py").write_text(PLUGIN.format(name="mine_entry_point"))
    dist = site / "my_methods-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[salad_bench.methods]\nmine = my_methods\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run(
        [sys.executable, "-c", "from salad_bench.methods import METHODS; print(METHODS.get('mine_entry_point').family)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "training_free"
