"""The device-call scripts (scripts/gpu_session.sh, pack_cache.sh, device_env.sh) on this machine: what a call
brings back fits the device's limits, and Triton's compile cache goes out and comes back whole or not at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _tree(tmp: Path, name: str) -> Path:
    """A checkout holding only the scripts (no wheels, no git): the scripts' paths are relative to it."""
    root = tmp / name
    shutil.copytree(ROOT / "scripts", root / "scripts")
    return root


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SALAD_DEVICE_ENV"}
    return {**env, "TRITON_CACHE_DIR": str(cache), "SHA": "0" * 40, **extra}


def _fake_cache(cache: Path) -> None:
    entry = cache / "ABCDEF"
    entry.mkdir(parents=True)
    (entry / "k.cubin").write_bytes(os.urandom(4096))
    (entry / "__grp__k.json").write_text('{"child_paths": {"k.cubin": "%s"}}' % (entry / "k.cubin"))


def _restore(root: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", ". scripts/device_env.sh"], cwd=root, env=_env(cache),
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_session_returns_run_and_cache_which_a_cold_machine_restores(tmp_path):
    first, cache = _tree(tmp_path, "first"), tmp_path / "cache1"
    _fake_cache(cache)
    ret = tmp_path / "ret"
    ret.mkdir()
    env = _env(cache, OUT=str(tmp_path / "work"), RETURN=str(ret), STEPS="probe", BUDGET="60",
               PROBE='echo measured > "$OUT/probe.txt"')  # fmt: skip
    res = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=first, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "compile cache: 1 kernels in 1 part(s)" in res.stdout
    back = sorted(p.name for p in ret.iterdir())
    assert back == ["run.tgz", "triton.tgz.aa"]  # no checkpoint: neither train nor cooldown ran
    with tarfile.open(ret / "run.tgz") as t:
        assert {"./probe.txt", "./probe.log"} <= set(t.getnames())

    second, cold = _tree(tmp_path, "second"), tmp_path / "cache2"
    (second / ".compile-cache").mkdir()
    shutil.copy(ret / "triton.tgz.aa", second / ".compile-cache")
    res = _restore(second, cold)
    assert res.returncode == 0 and "1 kernels restored" in res.stdout, res.stderr
    assert (cold / "ABCDEF" / "k.cubin").read_bytes() == (cache / "ABCDEF" / "k.cubin").read_bytes()


def test_damaged_cache_parts_leave_an_empty_cache(tmp_path):
    cache, ret = tmp_path / "cache", tmp_path / "ret"
    _fake_cache(cache)
    subprocess.run(["bash", str(ROOT / "scripts/pack_cache.sh"), str(ret)], env=_env(cache), check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    root, cold = _tree(tmp_path, "tree"), tmp_path / "cold"
    (root / ".compile-cache").mkdir()
    part = (ret / "triton.tgz.aa").read_bytes()
    (root / ".compile-cache" / "triton.tgz.aa").write_bytes(part[: len(part) // 2])  # a part cut short
    res = _restore(root, cold)
    assert "not restored" in res.stderr
    assert cold.is_dir() and not any(cold.iterdir())  # nothing half-written for Triton to load


def test_a_cache_over_the_part_limit_does_not_come_back(tmp_path):
    cache, ret = tmp_path / "cache", tmp_path / "ret"
    _fake_cache(cache)
    res = subprocess.run(["bash", str(ROOT / "scripts/pack_cache.sh"), str(ret), "0"], env=_env(cache),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and "not brought back" in res.stdout
    assert not list(ret.glob("triton.tgz.*"))
