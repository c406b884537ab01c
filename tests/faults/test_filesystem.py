"""The file system refuses: a full disk, a read-only mount. A user error that leaves nothing half-written."""

import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.tasks.home import DATA_DIR
from tests.helpers import cli, refused, stages, tree


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "edgeft", *argv], capture_output=True, text=True)


def test_a_full_disk_is_a_user_error_that_leaves_nothing_behind(tiny_model, tmp_path):
    """In this process (prepare) and in the training runtime (export): `error: no space left ...`, exit 2, no
    traceback, and neither the output nor a temporary left on the disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    # a tiny-model workspace is ~80 kB prepared and ~940 kB exported: room for the first, not the second
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        ws = disk / "ws"
        proc = run_cli("prepare", str(tiny_model("phi3-mini-4k")), "--out", str(ws), "--lora-r", "8")
        assert proc.returncode == 0, proc.stderr
        before = sorted(p.name for p in ws.iterdir())
        used = subprocess.run(["df", "--output=used", str(disk)], capture_output=True, text=True).stdout

        proc = run_cli("export", str(ws))
        assert proc.returncode == 2, proc.stderr
        assert "error: no space left on the device" in proc.stderr and "Free some space" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in ws.iterdir()) == before  # no artifacts/, no hidden temporary
        assert "export" not in stages(ws)
        assert subprocess.run(["df", "--output=used", str(disk)], capture_output=True, text=True).stdout == used

        with open(disk / "filler", "wb", buffering=0) as f:  # fill what is left, then prepare a second workspace
            with pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
        proc = run_cli("prepare", str(tiny_model("phi3-mini-4k")), "--out", str(disk / "ws2"), "--lora-r", "8")
        assert proc.returncode == 2 and "error: no space left on the device" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (disk / "ws2" / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.fixture
def read_only(tmp_path):
    """Mount a folder's copy read-only (a bind mount); yields (writable original, read-only view)."""
    mounted = []

    def mount(folder: Path) -> Path:
        view = tmp_path / f"ro-{folder.name}"
        view.mkdir()
        if subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True).returncode:
            pytest.skip("needs permission to bind-mount a folder")
        mounted.append(view)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        return view

    yield mount
    for view in mounted:
        subprocess.run(["umount", str(view)], check=False)


def test_a_read_only_file_system_is_named_in_every_stage(model, workspace, read_only, tmp_path):
    fix = "the file system is read-only"
    empty = tmp_path / "empty"
    empty.mkdir()
    parent = read_only(empty)
    refused(cli("prepare", model, "--out", parent / "ws"), fix, "Put the workspace on a writable disk")
    trained = read_only(workspace("trained"))
    before = tree(trained)
    refused(cli("train", trained, "--data", DATA_DIR / "train.jsonl", "--max-steps", "1"), fix)
    refused(cli("merge", trained), fix)
    packaged = read_only(workspace("packaged"))
    refused(cli("package", packaged, "--force"), fix)
    refused(cli("eval", packaged, "--data", DATA_DIR / "test.jsonl"), fix)
    assert tree(trained) == before
    assert stages(trained)["train"]
