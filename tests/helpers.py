"""Running the `edgeft` command in tests, and what every refusal must look like."""

from __future__ import annotations

import contextlib
import hashlib
import io
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
    """`edgeft ARGV` in a session of its own (a terminal's Ctrl-C reaches the whole process group)."""
    return subprocess.Popen([sys.executable, "-m", "edgeft", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


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
