"""Runs edgeft code inside the training runtime as a subprocess and streams its events back.

The child is `python -m edgeft.trainer.child MODULE:JOB` (a trainer/jobs.py dataclass, its fields as JSON on
stdin) with the training build's directory first
on PYTHONPATH. It talks over a pipe of its own (one JSON object per line); its stdout and stderr go to a
log file, so library chatter never corrupts the protocol and a failure can point at the full log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgeft.core.errors import EdgeftError, Terminated
from edgeft.runtime import training_build

EventHandler = Callable[[dict], None]


class TrainingRuntimeError(EdgeftError):
    """The child failed on a bug (not on user input); the message says where its traceback is."""

    def __init__(self, message: str, traceback: str | None = None, log_path: Path | None = None):
        super().__init__(message)
        self.traceback = traceback
        self.log_path = log_path


def child_env(runtime_path: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    parts = ([str(runtime_path)] if runtime_path else []) + [str(Path(__file__).resolve().parents[2])]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("EDGEFT_RUNTIME_PATH", None)
    if runtime_path:
        env["EDGEFT_RUNTIME_PATH"] = str(runtime_path)
        if libraries := [str(d) for d in training_build.library_dirs(runtime_path)]:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Call(Protocol):
    """A job for a subprocess (trainer/jobs.py): its class as `module:Class`, where it runs, its JSON."""

    @property
    def name(self) -> str: ...

    @property
    def side(self) -> str: ...

    def to_json(self) -> str: ...


def run(job: Call, *, ep: str = "cpu", on_event: EventHandler | None = None, log_path: Path | None = None,
        cwd: Path | None = None) -> dict:
    """Run `job` in a subprocess (the training runtime, or the main environment for a job of that side); return
    its result.

    `on_event` sees every progress and log event as it arrives. `cwd` is the child's working folder (onnxblock
    writes temp files into it). A user error in the child is raised here as EdgeftError with the child's message;
    a bug as TrainingRuntimeError naming the log; an interruption as KeyboardInterrupt."""
    log_path = log_path or _temporary_log()
    with _Child(job.side, ep, [job.name], log_path, cwd) as child:
        child.proc.stdin.write(job.to_json().encode())
        child.proc.stdin.close()
        outcome = child.outcome(on_event)
        code = child.proc.wait()
    return outcome.result_of(job.name, code, log_path)


class Worker:
    """A child that stays up and runs jobs one after another (`python -m edgeft.trainer.child --serve`), for a
    caller that runs many short jobs of one side: a fleet device pays the training runtime's start-up (Python and
    ONNX Runtime's import, 3-4 s here) once, not every round. Each job's output goes to its own log; a job's user
    error leaves the worker serving, a bug or a death ends it, and the next job starts a new one. The child exits
    when its stdin closes (`close`) and when this process dies."""

    def __init__(self, side: str, ep: str = "cpu"):
        self.side, self.ep = side, ep
        self.child: _Child | None = None

    def run(self, job: Call, *, on_event: EventHandler | None = None, log_path: Path | None = None) -> dict:
        if job.side != self.side:
            raise ValueError(f"a {self.side} worker cannot run {job.name} ({job.side} side)")
        log_path = log_path or _temporary_log()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.child is None or self.child.proc.poll() is not None:
            self.close()
            self.child = _Child(self.side, self.ep, ["--serve"], log_path.with_name(log_path.name + ".worker"))
        child = self.child
        try:
            child.proc.stdin.write((json.dumps({"name": job.name, "job": json.loads(job.to_json()),
                                                "log": str(log_path.resolve())}) + "\n").encode())
            child.proc.stdin.flush()
        except OSError:
            pass  # it died: its exit is reported below
        outcome = child.outcome(on_event, one_job=True)
        served = outcome.result is not None or (outcome.error or {}).get("kind") == "user"
        if not served:
            self.close()
        return outcome.result_of(job.name, 0 if served else child.proc.wait(),
                                 log_path if log_path.exists() else child.log_path)

    def close(self) -> None:
        if self.child is not None:
            self.child.__exit__(None, None, None)
            self.child = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Child:
    """A child process of `side` talking over a pipe of its own; its output goes to `log_path`."""

    def __init__(self, side: str, ep: str, args: list[str], log_path: Path, cwd: Path | None = None):
        runtime_path = training_build.runtime_dir(training_build.active_variant(ep)) if side == "training" else None
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        with open(log_path, "w", encoding="utf-8") as log:
            env = child_env(runtime_path) | {"EDGEFT_EVENT_FD": str(write_fd)}
            self.proc = subprocess.Popen([sys.executable, "-m", "edgeft.trainer.child", *args], stdin=subprocess.PIPE,
                                         stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(write_fd,), cwd=cwd)
        os.close(write_fd)
        self.events = os.fdopen(read_fd, "r", encoding="utf-8")

    def outcome(self, on_event: EventHandler | None, one_job: bool = False) -> Outcome:
        outcome = Outcome(on_event, one_job)
        listen(lambda: outcome.read(self.events), outcome, passes_on(self.proc))
        return outcome

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # a serving child exits at the end of its input
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.events.close()


def listen(read: Callable[[], None], outcome: Outcome, stop: Callable[[KeyboardInterrupt], None]) -> None:
    """`read()` the child's events into `outcome`. On Ctrl-C or SIGTERM, `stop(e)` asks the child to stop where it
    can save, and the events are read on until it reports, so that its final report (where it saved) reaches the
    user."""
    try:
        read()
    except KeyboardInterrupt as e:
        outcome.interrupted = e
        stop(e)
        read()


def passes_on(proc: subprocess.Popen) -> Callable[[KeyboardInterrupt], None]:
    """The stop of a child in this process group: Ctrl-C reached it too; SIGTERM reached this process only, and
    is passed on."""
    def stop(e: KeyboardInterrupt) -> None:
        if isinstance(e, Terminated):
            proc.send_signal(signal.SIGTERM)
    return stop


def _temporary_log() -> Path:
    fd, name = tempfile.mkstemp(prefix="edgeft-runtime-", suffix=".log")
    os.close(fd)
    return Path(name)


class Outcome:
    """The child's events: progress and logs go to `on_event`; the result or the error is kept."""

    def __init__(self, on_event: EventHandler | None, one_job: bool = False):
        self.on_event, self.result, self.error, self.one_job = on_event, None, None, one_job
        self.interrupted: KeyboardInterrupt | None = None

    def read(self, lines) -> None:
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "result":
                self.result = event.get("data")
            elif kind == "error" and (self.error is None or self.error.get("kind") == "interrupted"):
                self.error = event  # the first error that is not the interruption it caused
            elif self.on_event is not None:
                self.on_event(event)
            if self.one_job and kind in ("result", "error"):
                return

    def result_of(self, name: str, code: int, log_path: Path) -> dict:
        """The result, or the error the child reported (or its death) raised here."""
        stopped = isinstance(self.result, dict) and self.result.get("interrupted")  # the child saved where it was
        if self.interrupted is not None and not stopped:
            # whatever the child made of the signal (libraries turn it into other errors, or finish anyway): the
            # user asked to stop, and this side stops before it records anything
            raise self.interrupted
        if (error := self.error) is not None:
            if error.get("kind") == "user":
                raise EdgeftError(error["message"])
            if error.get("kind") == "interrupted":
                raise KeyboardInterrupt
            raise TrainingRuntimeError(
                f"the training runtime failed in {name}: {error.get('type')}: {error.get('message')}\n"
                f"  full traceback and runtime output: {log_path}", traceback=error.get("traceback"), log_path=log_path)
        if code != 0 or self.result is None:
            tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-10:])
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise TrainingRuntimeError(
                f"the training runtime {how} in {name} before reporting a result; last output:\n{tail}\n"
                f"  full output: {log_path}", log_path=log_path)
        return self.result
