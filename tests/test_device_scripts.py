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


def test_session_refuses_return_equal_to_out(tmp_path):
    """``OUT=/tmp/s RETURN=$OUT`` expands RETURN to /tmp/s: nothing would come back, so the script refuses."""
    root, work = _tree(tmp_path, "tree"), tmp_path / "work"
    env = _env(tmp_path / "cache", OUT=str(work), RETURN=str(work), STEPS="probe", BUDGET="60", PROBE="true")
    res = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 2 and "RETURN is OUT" in res.stderr, res.stderr
    assert not (work / "probe.log").exists()


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


def _returned(tmp: Path, with_ckpt_files: bool = True) -> Path:
    """What a cooldown call brings back: run.tgz (its ckpt/ with the card), a shard, a cache part."""
    work, ret = tmp / "work", tmp / "ret"
    (work / "ckpt").mkdir(parents=True)
    (work / "cooldown.log").write_text("done: cooled down\n")
    if with_ckpt_files:
        (work / "ckpt" / "card.json").write_text('{"steps_done": 15594}')
    ret.mkdir()
    with tarfile.open(ret / "run.tgz", "w:gz") as t:
        t.add(work, arcname=".")
    (ret / "model-00001-of-00001.safetensors").write_bytes(b"new weights")
    (ret / "triton.tgz.aa").write_bytes(b"part")
    return ret


def _take_back(root: Path, ret: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/take_back.sh", str(ret), "back"], cwd=root, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_take_back_puts_the_checkpoint_run_and_cache_in_place(tmp_path):
    root = _tree(tmp_path, "here")
    ckpt = root / "checkpoints" / "mini-wan-v2"
    ckpt.mkdir(parents=True)
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"old")  # the old sharding goes
    (root / ".compile-cache").mkdir()
    (root / ".compile-cache" / "triton.tgz.ab").write_bytes(b"stale")
    res = _take_back(root, _returned(tmp_path))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["card.json", "model-00001-of-00001.safetensors"]
    assert (ckpt / "model-00001-of-00001.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in (root / ".compile-cache").iterdir()) == ["triton.tgz.aa"]
    assert (root / "back" / "cooldown.log").read_text() == "done: cooled down\n"


def test_take_back_refuses_shards_without_their_card(tmp_path):
    root = _tree(tmp_path, "here")
    ckpt = root / "checkpoints" / "mini-wan-v2"
    ckpt.mkdir(parents=True)
    (ckpt / "model-00001-of-00001.safetensors").write_bytes(b"old")
    ret = _returned(tmp_path, with_ckpt_files=False)
    shutil.rmtree(tmp_path / "work" / "ckpt")
    with tarfile.open(ret / "run.tgz", "w:gz") as t:
        t.add(tmp_path / "work", arcname=".")
    res = _take_back(root, ret)
    assert res.returncode == 2 and "left as it was" in res.stderr
    assert (ckpt / "model-00001-of-00001.safetensors").read_bytes() == b"old"
