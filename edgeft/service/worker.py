"""The fine-tuning worker: one job at a time (the box trains one model at once), oldest first.

A job is the edgeft pipeline, run as `edgeft run` on a recipe the worker writes: prepare (with the service's
device profile), export, train, merge, package with --adapters (the int4 base plus the job's .onnx_adapter, which
chat completions load into the base's model). Its status goes validating_files (`data check` on the uploads) ->
queued -> running -> succeeded | failed | cancelled, and every line the pipeline prints is a message event;
training's metrics log is read as it grows into metrics events (step, train_loss, valid_loss).

The pipeline runs in a child process of its own session, which dies with the server (PR_SET_PDEATHSIG, as the
training runtime's child does). A server killed mid-job finds the job `running` in the database on restart
and runs the recipe again: `edgeft run` skips the finished stages and train resumes from its last checkpoint,
so the job ends with the adapter an uninterrupted one ends with. Cancel sends the run SIGINT (train stops at a
step boundary and keeps a checkpoint), then SIGKILL if it has not stopped within a minute.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from edgeft.core import atomic
from edgeft.core.errors import EdgeftError
from edgeft.service.store import Store, job_workspace, upload_path

DEFAULT_LR = 1e-3  # learning_rate_multiplier 1: a LoRA rate (the demo recipe's)
DEFAULT_EPOCHS = 3
DEFAULT_BATCH = 8
CANCEL_GRACE_S = 60


def _die_with_parent() -> None:  # in the child, before exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def hyperparameters(given: dict | None) -> dict:
    """The API's hyperparameters with "auto" (or absent) resolved to what the job runs with."""
    given = given or {}
    resolved = {"n_epochs": DEFAULT_EPOCHS, "batch_size": DEFAULT_BATCH, "learning_rate_multiplier": 1.0}
    for key in resolved:
        value = given.get(key, "auto")
        if value != "auto":
            resolved[key] = value
    return resolved


class Worker(threading.Thread):
    def __init__(self, store: Store, state: Path, models, device: str | None):
        super().__init__(name="edgeft-worker", daemon=True)
        self.store, self.state, self.models, self.device = store, Path(state), models, device
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.proc: subprocess.Popen | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            job = self.store.next_job()
            if job is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                self.run_job(job)
            except Exception as e:  # noqa: BLE001 - a bug in one job must not stop the worker for the others
                self.fail(job["id"], "server_error", f"the service failed running this job: {type(e).__name__}: {e}")

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)

    # -- one job ---------------------------------------------------------------------------------------------
    def fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        self.store.update_job(job_id, status="failed", error={"code": code, "message": message, "param": param})
        self.store.add_event(job_id, f"Job failed: {message}", level="error")

    def run_job(self, job: dict) -> None:
        job_id = job["id"]
        if job["status"] == "validating_files":
            self.store.add_event(job_id, "Validating training file: " + job["training_file"])
            problem = self.validate(job)
            if problem:
                self.fail(job_id, *problem)
                return
            self.store.update_job(job_id, status="queued")
            self.store.add_event(job_id, "Files validated, moving job to queued state")
        if self.store.cancel_requested(job_id):
            return
        resumed = job["status"] == "running"
        self.store.update_job(job_id, status="running")
        self.store.add_event(job_id, "Fine-tuning job resumed after a restart" if resumed else "Fine-tuning job started")
        metrics = MetricsLog(job_workspace(self.state, job_id) / "train" / "metrics.jsonl",
                             self.store.last_metrics_step(job_id))
        code = self.pipeline(job, metrics)
        if self.store.cancel_requested(job_id):
            self.store.update_job(job_id, status="cancelled")
            self.store.add_event(job_id, "Fine-tuning job cancelled")
        elif code == 0:
            self.succeed(job, metrics)
        elif not self.stopping.is_set():  # a server stopping leaves the job running: it resumes on restart
            self.fail(job_id, "job_failed", self.last_error(job_id) or f"the pipeline exited with code {code}")

    def validate(self, job: dict) -> tuple[str, str, str] | None:
        """`data check` on the job's files: (code, message, param) of the first that is not clean."""
        from edgeft.data import check

        model_dir = self.models.base_dir(job["model"])
        for param in ("training_file", "validation_file"):
            file_id = job[param]
            if file_id is None:
                continue
            path = upload_path(self.state, file_id)
            if not path.is_file():
                return f"invalid_{param}", f"{param} {file_id} was deleted before the job started", param
            try:
                report = check.check(path, model_dir, seq_len=self.models.seq_len(job["model"]))
            except EdgeftError as e:  # an unreadable file (a bug is the worker's: run() reports it)
                return f"invalid_{param}", f"{param} {file_id}: {e}", param
            problems = [f"line {m['line']}: {m['kind']}: {m['message']}" for m in report["problem_messages"][:20]]
            if problems or not report["valid_records"]:
                more = len(report["problem_messages"]) - len(problems)
                return (f"invalid_{param}", f"{param} {file_id} has {len(report['problem_messages'])} invalid "
                        f"record(s): " + "; ".join(problems) + (f"; and {more} more" if more > 0 else "")
                        if problems else f"{param} {file_id} has no usable records", param)
        return None

    def recipe(self, job: dict) -> Path:
        hyper = job["hyperparameters"]
        recipe = {
            "name": job["id"], "workspace": str(job_workspace(self.state, job["id"])),
            "model": {"path": str(self.models.base_dir(job["model"]))},
            "lora": self.models.lora(job["model"]),
            "data": {"train": str(upload_path(self.state, job["training_file"])),
                     "eval": str(upload_path(self.state, job["validation_file"])) if job["validation_file"] else None},
            "train": {"epochs": int(hyper["n_epochs"]), "batch_size": int(hyper["batch_size"]),
                      "lr": DEFAULT_LR * float(hyper["learning_rate_multiplier"]), "seed": int(job["seed"]),
                      "warmup_steps": 10, "seq_len": self.models.seq_len(job["model"]), "truncation": "right"},
            "package": {"precision": "int4", "adapters": True},
            "stages": ["prepare", "export", "train", "merge", "package"],
        }
        if self.device:
            recipe["device"] = self.device
        return atomic.write_text(self.state / "recipes" / f"{job['id']}.yaml", yaml.safe_dump(recipe, sort_keys=False))

    def pipeline(self, job: dict, metrics: MetricsLog) -> int:
        """Runs the job's recipe to its end (or its cancellation), its metrics log followed; the exit code."""
        job_id = job["id"]
        log_path = self.state / "logs" / f"{job_id}.log"
        log_path.parent.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "a", encoding="utf-8") as log:
            self.proc = proc = subprocess.Popen(
                [sys.executable, "-m", "edgeft", "run", str(self.recipe(job))], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace", env=env,
                start_new_session=True, preexec_fn=_die_with_parent)
            reader = threading.Thread(target=self._messages, args=(job_id, proc, log), daemon=True)
            reader.start()
            cancelled_at = None
            while proc.poll() is None:
                time.sleep(0.5)
                self.sync_metrics(job_id, metrics)
                if cancelled_at is None and (self.store.cancel_requested(job_id) or self.stopping.is_set()):
                    cancelled_at = time.time()
                    os.killpg(proc.pid, signal.SIGINT)
                elif cancelled_at is not None and time.time() - cancelled_at > CANCEL_GRACE_S:
                    os.killpg(proc.pid, signal.SIGKILL)
            reader.join(timeout=10)
            self.sync_metrics(job_id, metrics, final=True)
            self.proc = None
            return proc.returncode

    def _messages(self, job_id: str, proc: subprocess.Popen, log) -> None:
        """Each line the pipeline prints: to the job's log, and (but training's per-step lines, which are metrics
        events) to its events."""
        for line in proc.stdout:
            log.write(line)
            log.flush()
            text = line.strip()
            if text and not text.startswith("step ") and "it/s]" not in text:  # nor progress bars
                self.store.add_event(job_id, text[:2000], level="error" if text.startswith("error") else "info")

    def sync_metrics(self, job_id: str, metrics: MetricsLog, final: bool = False) -> None:
        """A metrics event for each training step the log has completed since the last call."""
        steps = metrics.new_steps(final)
        for step in steps:
            row = metrics.steps[step]
            data = {"step": step, "train_loss": row["train_loss"], "total_steps": row["total"],
                    "train_mean_token_accuracy": None}
            if "valid_loss" in row:
                data["valid_loss"] = row["valid_loss"]
            self.store.add_event(job_id, f"Step {step}/{row['total']}: training loss={row['train_loss']:.4f}"
                                 + (f", validation loss={row['valid_loss']:.4f}" if "valid_loss" in row else ""),
                                 data=data)
        if steps and metrics.steps[steps[-1]].get("eta_s") is not None:
            self.store.update_job(job_id, estimated_finish=int(time.time() + metrics.steps[steps[-1]]["eta_s"]))

    def last_error(self, job_id: str) -> str | None:
        events, _ = self.store.events(job_id, None, 20)
        errors = [e["message"] for e in events if e["message"].startswith("error")]
        return errors[0].removeprefix("error:").strip() if errors else None

    def succeed(self, job: dict, metrics: MetricsLog) -> None:
        from edgeft.core.workspace import Workspace
        from edgeft.stages.train import Trained

        job_id = job["id"]
        ws = Workspace(job_workspace(self.state, job_id))
        trained = ws.read(Trained)
        model = fine_tuned_name(job)
        self.record_checkpoints(job_id, ws, model, metrics)
        self.store.update_job(job_id, status="succeeded", fine_tuned_model=model, estimated_finish=None,
                              trained_tokens=trained.tokens_seen if trained else None)
        self.store.add_event(job_id, f"New fine-tuned model created: {model}")
        self.store.add_event(job_id, "The job has successfully completed")

    def record_checkpoints(self, job_id: str, ws, model: str, metrics: MetricsLog) -> None:
        """The run's kept checkpoints (its last ones and its best), with the metrics at their steps."""
        steps = sorted(int(p.name.removeprefix("step-")) for p in ws.checkpoints.glob("step-*") if p.is_dir())
        for step in steps:
            losses = {k: v for k, v in metrics.steps.get(step, {}).items() if k in ("train_loss", "valid_loss")}
            self.store.add_checkpoint(job_id, step, {"step": step, **losses}, f"{model}:ckpt-step-{step}")


class MetricsLog:
    """A job's training metrics log (WS/train/metrics.jsonl), read as it grows from where the last read stopped:
    each step's training loss (and total, ETA), and its validation loss where it was evaluated."""

    def __init__(self, path: Path, emitted: int = 0):
        self.path, self.offset, self.emitted = Path(path), 0, emitted  # emitted: the last step already an event
        self.steps: dict[int, dict] = {}
        self.newest: int | None = None  # a step's row with nothing after it yet: its evaluation may follow

    def new_steps(self, final: bool = False) -> list[int]:
        """Steps past `emitted` whose rows are complete: the newest waits for the next line unless the run has
        ended (a resumed run's log repeats none of them: its steps go on from the checkpoint)."""
        if self.path.is_file():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            whole = chunk[:chunk.rfind(b"\n") + 1]  # a line being written waits for its end
            self.offset += len(whole)
            for line in whole.decode(errors="replace").splitlines():
                self._take(line)
        ready = sorted(s for s, row in self.steps.items()
                       if s > self.emitted and "train_loss" in row and (final or s != self.newest))
        if ready:
            self.emitted = ready[-1]
        return ready

    def _take(self, line: str) -> None:
        try:
            row = json.loads(line)
        except ValueError:
            return
        self.newest = None
        if row.get("event") == "progress":
            step = int(row["step"])
            self.steps.setdefault(step, {}).update(train_loss=row["loss"], total=row["total"], eta_s=row.get("eta_s"))
            self.newest = step
        elif row.get("event") == "eval":
            self.steps.setdefault(int(row["step"]), {})["valid_loss"] = float(row["eval_loss"])


def fine_tuned_name(job: dict) -> str:
    """`ft:{base}:{org}:{suffix}:{id}`, as the hosted API names a fine-tuned model."""
    return f"ft:{job['model']}:edgeft:{job['suffix'] or ''}:{job['id'].removeprefix('ftjob-')}"
