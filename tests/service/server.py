"""A live `edgeft serve` on 127.0.0.1 for the tests: started as a process, waited for, ended by its pid."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

DATA = Path(__file__).resolve().parents[2] / "edgeft" / "tasks" / "home_data"
KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, state: Path, *extra: str, max_upload_mb: float = 1.0):
        self.state, self.extra, self.max_upload_mb = Path(state), extra, max_upload_mb
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.port = free_port()
        if getattr(self, "log", None) is None or self.log.closed:
            self.log = open(self.state.parent / f"{self.state.name}-serve.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeft", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--state", str(self.state), "--api-key", KEY, "--max-upload-mb", str(self.max_upload_mb), *self.extra],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.proc.poll() is None, f"edgeft serve exited: {self.output()}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"edgeft serve did not answer within 90 s: {self.output()}")

    def output(self) -> str:
        return (self.state.parent / f"{self.state.name}-serve.log").read_text()[-3000:]

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=600)

    def wait(self, job_id: str, statuses: tuple[str, ...], timeout: float):
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.client().fine_tuning.jobs.retrieve(job_id)
            if job.status in statuses:
                return job
            assert job.status not in ("succeeded", "failed", "cancelled"), (job, self.output())
            time.sleep(1)
        raise AssertionError(f"job {job_id} not {statuses} within {timeout} s: {job}\n{self.output()}")

    def client_state(self, job_id: str) -> str:
        """A job's status as the database holds it (the server may be down)."""
        import sqlite3

        with sqlite3.connect(self.state / "edgeft.db") as db:
            return db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Ends the server (and, with it, the job it runs) by pid."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill(signal.SIGTERM)
        self.log.close()
