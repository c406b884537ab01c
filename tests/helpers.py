"""Running the `edgeft` command in tests, and what every refusal must look like."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(*argv, stdin: bytes = b"") -> Result:
    """`edgeft ARGV` in this process (fast: the libraries are imported once), reading `stdin`. A bug escapes as the
    exception, so a case that would print a traceback fails the test."""
    from edgeft.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        sys.stdin = saved
    return Result(code, out.getvalue(), err.getvalue())


def process(*argv, stdin: bytes | None = None, cwd: Path | None = None, timeout: float = 600) -> Result:
    """`edgeft ARGV` as its own process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "edgeft", *map(str, argv)], input=stdin, capture_output=True,
                          cwd=cwd, timeout=timeout)
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def refused(result: Result, *phrases: str) -> None:
    """A user error as edgeft promises it: exit 2, `error: ...` naming the problem (every phrase, in any case), no
    traceback."""
    assert result.code == 2, f"exit {result.code}\nstdout: {result.out[-2000:]}\nstderr: {result.err[-2000:]}"
    assert "Traceback" not in result.err + result.out, result.err
    assert "error: " in result.err, result.err
    message = " ".join(result.err.split()).lower()
    for phrase in phrases:
        assert " ".join(phrase.split()).lower() in message, f"{phrase!r} not in: {result.err}"


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with its sha256: to show that a refused command wrote nothing.
    The workspace's hash cache is left out: a cache of what was read, not an output."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".hashes.json"}


def start(*argv, **kwargs):
    """`edgeft ARGV` in a session of its own (a terminal's Ctrl-C reaches the whole process group), as a terminal's
    foreground command: SIGINT at its default. A test run started in the background (`cmd &` without job control,
    nohup) ignores SIGINT, every process it starts inherits that, and Python then installs no Ctrl-C handler."""
    return subprocess.Popen([sys.executable, "-m", "edgeft", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint, **kwargs)


def default_sigint() -> None:  # in the child, before exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(proc, text, timeout=120):
    """Read the process's output until a line holds `text`; the lines read."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"{text!r} never came; output:\n{''.join(seen)}\n{proc.stderr.read()}")


def stages(ws: Path) -> dict:
    """A workspace's stage records as they are written (read through the workspace, which owns the format)."""
    from edgeft.core.workspace import Workspace

    return Workspace(ws).manifest()["stages"]


DATA_DIR = Path(__file__).resolve().parent.parent / "edgeft" / "tasks" / "home_data"
DATA = DATA_DIR / "train.jsonl"  # the sample task's training split
FAST = {"batch_size": 4, "seq_len": 256, "lr": 1e-3}  # training options that run in seconds on a tiny model


def fresh(exported: Path, tmp_path: Path, name: str = "ws") -> Path:
    """A copy of an exported workspace, without its training run and tokenized data."""
    ws = tmp_path / name
    shutil.copytree(exported, ws, ignore=shutil.ignore_patterns("train", "data"))
    return ws


def losses(ws: Path, key: str = "loss") -> list[float]:
    """The training losses (or another progress value) a workspace's run logged, step by step."""
    rows = [json.loads(x) for x in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["event"] == "progress"]


def assert_backends_agree(ws: Path, tmp_path: Path, steps: int) -> None:
    """Train copies of `ws` with ORT (in tmp_path/ort) and PyTorch (tmp_path/torch): the same losses."""
    import numpy as np
    import pytest

    from edgeft.stages.train import TrainConfig, train

    found = {}
    for backend in ("ort", "torch"):
        copy = tmp_path / backend
        shutil.copytree(ws, copy)
        train(copy, DATA, TrainConfig(max_steps=steps, batch_size=4, seq_len=256, lr=1e-2, backend=backend,
                                      val_fraction=0.05, eval_every=100))
        found[backend] = losses(copy)
    assert found["ort"][0] == pytest.approx(found["torch"][0], rel=1e-5)
    assert np.allclose(found["ort"], found["torch"], rtol=1e-4)
