"""Launches a torch-engine training job over several ranks with torchrun, and follows its events.

`python -m torch.distributed.run` starts `--nproc` ranks on this machine (`python -m edgeft.trainer.child
MODULE:JOB JOB.json`); with `--nnodes` > 1 each machine runs this with its `--node-rank`, and node 0 hosts the
rendezvous at `--rdzv HOST:PORT` (torchrun's static rendezvous: no extra service). The ranks inherit no pipe: each
node's first rank appends its events to a file that is followed here, so progress shows as with one process.
A rank that dies makes torchrun stop the others (a run is resumed from its last checkpoint); a rendezvous that
does not form within `timeout_s` ends the launch with the reason.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgeft.core.errors import EdgeftError
from edgeft.runtime import launcher

LOOPBACK = ("127.0.0.1", "localhost", "::1")
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
SHARDS_BASE = ("zero3", "fsdp")  # strategies that shard the frozen base as well
SHARDS_STATE = ("zero2", "zero3", "fsdp")  # strategies that shard the gradients and the optimizer state


@dataclass(frozen=True)
class Launch:
    """Where the ranks run: `nproc` on this machine, of `nnodes` machines meeting at `rdzv` (HOST:PORT)."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv: str | None = None
    timeout_s: int = 300

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    def endpoint(self) -> tuple[str, int]:
        """The rendezvous address: `rdzv`, or a free port on 127.0.0.1 for a single machine (a new one each
        call)."""
        if self.rdzv is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return "127.0.0.1", s.getsockname()[1]
        host, _, port = self.rdzv.rpartition(":")
        return host.strip("[]"), int(port)


def parse_rdzv(text: str) -> tuple[str, int]:
    """HOST:PORT, checked (a clear message naming the form otherwise)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgeftError(f"--rdzv {text!r}: give the rendezvous address as HOST:PORT (node 0's address and a free "
                          "port, e.g. 10.0.0.5:29500, or 127.0.0.1:29500 on one machine)")
    return host.strip("[]"), int(port)


def command(launch: Launch, host: str, port: int, job: launcher.Call, job_file: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}",
            f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}", "--rdzv-backend=static",
            f"--master-addr={host}", f"--master-port={port}", f"--rdzv-conf=timeout={launch.timeout_s}",
            "--max-restarts=0", "-m", "edgeft.trainer.child", job.name, str(job_file)]


def run(job: launcher.Call, launch: Launch, *, on_event: launcher.EventHandler | None = None,
        log_path: Path) -> dict:
    """Run `job` (a main-environment job) on the ranks of `launch`; rank 0's result (on another node's launch,
    that node's first rank's, marked `follower`). Raises as launcher.run does; a rank that stopped the run, or a
    rendezvous that did not form, as TrainingRuntimeError with torchrun's report."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    job_file, events_path = log_path.with_suffix(".job.json"), log_path.with_suffix(".events.jsonl")
    job_file.write_text(job.to_json(), encoding="utf-8")
    events_path.write_text("")
    env = launcher.child_env(None) | {"EDGEFT_EVENT_PATH": str(events_path)}
    host, port = launch.endpoint()
    if host in LOOPBACK:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on the loopback interface, as the rendezvous
    outcome = launcher.Outcome(on_event)
    with open(log_path, "w", encoding="utf-8") as log, open(events_path, encoding="utf-8") as events:
        proc = subprocess.Popen(command(launch, host, port, job, job_file), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        launcher.listen(lambda: _follow(proc, events, outcome), outcome, launcher.passes_on(proc))
        code = proc.wait()
    if code != 0 and outcome.interrupted is None:
        if outcome.result is None and outcome.error is None and _never_met(log_path):
            raise EdgeftError(f"the {launch.nnodes} nodes did not meet at {host}:{port} within {launch.timeout_s} s: "
                              f"start every node (--node-rank 0 to {launch.nnodes - 1}) with the same --nnodes and "
                              "--rdzv (node 0's address and a port it can open), or raise --rdzv-timeout")
        if outcome.error is not None and outcome.error.get("kind") == "user":
            raise EdgeftError(outcome.error["message"])
        raise launcher.TrainingRuntimeError(_stopped(outcome, log_path), log_path=log_path)
    return outcome.result_of(job.name, code, log_path)


def _follow(proc: subprocess.Popen, events, outcome) -> None:
    """Hand the events file's lines to `outcome` until torchrun exits."""
    pending = ""
    while True:
        done = proc.poll() is not None
        chunk = events.read()
        if chunk:
            pending += chunk
            *lines, pending = pending.split("\n")
            outcome.read(lines)
        elif done:
            return
        else:
            time.sleep(0.1)


def _never_met(log_path: Path) -> bool:
    text = log_path.read_text(errors="replace")
    return any(sign in text for sign in ("RendezvousTimeoutError", "DistStoreError", "Timed out", "timed out"))


def _stopped(outcome, log_path: Path) -> str:
    """Why the ranks stopped: the rank torchrun names as the root cause (a death by signal), else a rank's
    error."""
    text = log_path.read_text(errors="replace")
    tail = "\n".join(text.strip().splitlines()[-12:])
    cause = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", text, re.S)
    error = outcome.error if outcome.error and outcome.error.get("kind") != "interrupted" else None
    if cause and int(cause[2]) < 0:
        what = f"rank {cause[1]} was killed by signal {-int(cause[2])}, and torchrun ended the others"
    elif error is not None:
        what = f"rank {error.get('rank', '?')} failed: {error.get('type')}: {error.get('message')}"
    else:
        what = "a rank stopped, and torchrun ended the others"
    return f"the distributed run stopped: {what}\n  torchrun's last output:\n{tail}\n  full output: {log_path}"
