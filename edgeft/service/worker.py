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

from edgeft.service.store import Store

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
        code = self.pipeline(job)
        if self.store.cancel_requested(job_id):
            self.store.update_job(job_id, status="cancelled")
            self.store.add_event(job_id, "Fine-tuning job cancelled")
        elif code == 0:
            self.succeed(job)
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
            path = self.state / "files" / f"{file_id}.jsonl"
            if not path.is_file():
                return f"invalid_{param}", f"{param} {file_id} was deleted before the job started", param
            try:
                report = check.check(path, model_dir, seq_len=self.models.seq_len(job["model"]))
            except Exception as e:  # noqa: BLE001 - data check raises EdgeftError on an unreadable file
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
        files = self.state / "files"
        recipe = {
            "name": job["id"], "workspace": str(self.state / "jobs" / job["id"]),
            "model": {"path": str(self.models.base_dir(job["model"]))},
            "lora": self.models.lora(job["model"]),
            "data": {"train": str(files / f"{job['training_file']}.jsonl"),
                     "eval": str(files / f"{job['validation_file']}.jsonl") if job["validation_file"] else None},
            "train": {"epochs": int(hyper["n_epochs"]), "batch_size": int(hyper["batch_size"]),
                      "lr": DEFAULT_LR * float(hyper["learning_rate_multiplier"]), "seed": int(job["seed"]),
                      "warmup_steps": 10, "seq_len": self.models.seq_len(job["model"]), "truncation": "right"},
            "package": {"precision": "int4", "adapters": True},
            "stages": ["prepare", "export", "train", "merge", "package"],
        }
        if self.device:
            recipe["device"] = self.device
        path = self.state / "recipes" / f"{job['id']}.yaml"
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(recipe, sort_keys=False))
        os.replace(tmp, path)
        return path

    def pipeline(self, job: dict) -> int:
        """Runs the job's recipe to its end (or its cancellation); the exit code."""
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
                self.sync_metrics(job_id)
                if cancelled_at is None and (self.store.cancel_requested(job_id) or self.stopping.is_set()):
                    cancelled_at = time.time()
                    os.killpg(proc.pid, signal.SIGINT)
                elif cancelled_at is not None and time.time() - cancelled_at > CANCEL_GRACE_S:
                    os.killpg(proc.pid, signal.SIGKILL)
            reader.join(timeout=10)
            self.sync_metrics(job_id, final=True)
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

    def sync_metrics(self, job_id: str, final: bool = False) -> None:
        """Metrics events for the training steps the metrics log has and the events do not (a resumed run's log
        repeats none: its steps go on from the checkpoint). The newest step waits for the next line unless the run
        has ended: its evaluation, if any, comes right after it."""
        path = self.state / "jobs" / job_id / "train" / "metrics.jsonl"
        if not path.is_file():
            return
        done = self.store.last_metrics_step(job_id)
        valid: dict[int, float] = {}
        rows = []
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line being written
            if not final and i >= len(lines) - 1:
                break
            if row.get("event") == "eval":
                valid[int(row["step"])] = float(row["eval_loss"])
            elif row.get("event") == "progress" and int(row["step"]) > done:
                rows.append(row)
        for row in rows:
            step = int(row["step"])
            data = {"step": step, "train_loss": row["loss"], "total_steps": row["total"],
                    "train_mean_token_accuracy": None}
            if step in valid:
                data["valid_loss"] = valid[step]
            self.store.add_event(job_id, f"Step {step}/{row['total']}: training loss={row['loss']:.4f}"
                                 + (f", validation loss={valid[step]:.4f}" if step in valid else ""), data=data)
            if row.get("eta_s") is not None:
                self.store.update_job(job_id, estimated_finish=int(time.time() + row["eta_s"]))

    def last_error(self, job_id: str) -> str | None:
        events, _ = self.store.events(job_id, None, 20)
        errors = [e["message"] for e in events if e["message"].startswith("error")]
        return errors[0].removeprefix("error:").strip() if errors else None

    def succeed(self, job: dict) -> None:
        from edgeft.core.workspace import Workspace
        from edgeft.stages.train import Trained

        job_id = job["id"]
        ws = Workspace(self.state / "jobs" / job_id)
        trained = ws.read(Trained)
        model = fine_tuned_name(job)
        self.record_checkpoints(job_id, ws, model)
        self.store.update_job(job_id, status="succeeded", fine_tuned_model=model, estimated_finish=None,
                              trained_tokens=trained.tokens_seen if trained else None)
        self.store.add_event(job_id, f"New fine-tuned model created: {model}")
        self.store.add_event(job_id, "The job has successfully completed")

    def record_checkpoints(self, job_id: str, ws, model: str) -> None:
        """The run's kept checkpoints (its last ones and its best), with the metrics at their steps."""
        metrics = {}
        for line in (ws.training / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row.get("event") == "progress":
                metrics.setdefault(int(row["step"]), {})["train_loss"] = row["loss"]
            elif row.get("event") == "eval":
                metrics.setdefault(int(row["step"]), {})["valid_loss"] = row["eval_loss"]
        steps = sorted(int(p.name.removeprefix("step-")) for p in ws.checkpoints.glob("step-*") if p.is_dir())
        for step in steps:
            self.store.add_checkpoint(job_id, step, {"step": step, **metrics.get(step, {})},
                                      f"{model}:ckpt-step-{step}")


def fine_tuned_name(job: dict) -> str:
    """`ft:{base}:{org}:{suffix}:{id}`, as the hosted API names a fine-tuned model."""
    return f"ft:{job['model']}:edgeft:{job['suffix'] or ''}:{job['id'].removeprefix('ftjob-')}"
