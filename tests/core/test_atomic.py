import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.core import atomic


def test_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "manifest.json"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_failed_dir_keeps_the_previous_one(tmp_path):
    final = tmp_path / "bundle"
    with atomic.atomic_dir(final) as tmp:
        (tmp / "model.onnx").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "model.onnx").write_text("v2 partial")
            raise RuntimeError("interrupted")
    assert (final / "model.onnx").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


WRITER = """
import sys, time
from pathlib import Path
from edgeft.core import atomic
with atomic.{how}(Path(sys.argv[1]){name}) as tmp:
    (tmp / "part").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(60)
"""


def _writer(how: str, folder, name: str | None = None):
    """A process stopped inside an atomic block, at the moment it has written part of its output."""
    code = WRITER.format(how=how, name=f", {name!r}" if name else "")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


@pytest.mark.parametrize("how", ["atomic_dir", "scratch_dir"])
def test_the_next_writer_sweeps_what_a_killed_one_left_and_spares_a_running_one(tmp_path, how):
    final = tmp_path / "bundle"
    target = (final,) if how == "atomic_dir" else (tmp_path, "bundle")
    killed, killed_tmp = _writer(how, *target)
    running, running_tmp = _writer(how, *target)
    try:
        killed.kill()
        killed.wait()
        assert killed_tmp.is_dir() and running_tmp.is_dir()
        with getattr(atomic, how)(*target) as tmp:
            (tmp / "model.onnx").write_text("v1")
        assert not killed_tmp.exists()
        assert running_tmp.is_dir() and (running_tmp / "part").is_file()
    finally:
        running.kill()
        running.wait()
    assert (final / "model.onnx").read_text() == "v1" if how == "atomic_dir" else not final.exists()


def test_a_kill_between_the_two_renames_gives_back_the_previous_version(tmp_path):
    final = tmp_path / "merged"
    with atomic.atomic_dir(final) as tmp:
        (tmp / "w").write_text("v1")
    os.replace(final, tmp_path / ".merged.old")  # atomic_dir's first rename, then SIGKILL
    assert atomic.sweep(tmp_path, "merged") == []
    assert (final / "w").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    shutil.copytree(final, tmp_path / ".merged.old")  # killed after the second: the old one is garbage
    assert atomic.sweep(tmp_path, "merged") == [".merged.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_sweeping_one_name_leaves_the_temporaries_of_others(tmp_path):
    for name in ("merged", "merged.v2", "step-1", "step-10"):
        (tmp_path / f".{name}.999999999.abc.tmp").mkdir()
    assert atomic.sweep(tmp_path, "step-1") == [".step-1.999999999.abc.tmp"]
    assert atomic.sweep(tmp_path, "merged") == [".merged.999999999.abc.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.v2.999999999.abc.tmp", ".step-10.999999999.abc.tmp"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_and_folders_get_the_umask_modes_not_private_temporary_ones(tmp_path, mask):
    old = os.umask(mask)
    try:
        text = atomic.write_text(tmp_path / "a.json", "{}")
        with atomic.atomic_dir(tmp_path / "bundle") as tmp:
            (tmp / "model.onnx").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(text.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o777 & ~mask
