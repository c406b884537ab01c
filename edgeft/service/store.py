"""The service's state in SQLite (state/edgeft.db): files, fine-tuning jobs, their events and checkpoints. It
outlives the server: a restart finds every job where it was, and the worker resumes the unfinished ones.

One connection, shared by the request threads and the worker under a lock (SQLite in WAL mode; every write is
one committed transaction). Rows go out as the OpenAI API's objects (`file_object`, `job_object`, ...).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, status TEXT NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, model TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL,
    metadata TEXT, hyperparameters TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    finished_at INTEGER, fine_tuned_model TEXT, trained_tokens INTEGER, estimated_finish INTEGER,
    error TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT,
    step INTEGER);
CREATE INDEX IF NOT EXISTS events_of_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, step INTEGER NOT NULL, metrics TEXT NOT NULL, model TEXT NOT NULL,
    UNIQUE (job_id, step));
"""

ACTIVE = ("validating_files", "queued", "running")  # a job the worker still owes a result
FINAL = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def uploads(state: Path) -> Path:
    return Path(state) / "files"


def upload_path(state: Path, file_id: str) -> Path:
    """Where an upload's bytes are kept: named by its id (the API matches ids against their pattern first)."""
    return uploads(state) / f"{file_id}.jsonl"


def job_workspace(state: Path, job_id: str) -> Path:
    """A job's edgeft workspace, named by its id."""
    return Path(state) / "jobs" / job_id


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed job survives a power cut, not only a kill
            self.db.executescript(SCHEMA)

    def _all(self, sql: str, *args) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def _one(self, sql: str, *args) -> sqlite3.Row | None:
        rows = self._all(sql, *args)
        return rows[0] if rows else None

    def _write(self, sql: str, *args) -> int:
        with self.lock:
            return self.db.execute(sql, args).rowcount

    # -- files -----------------------------------------------------------------------------------------------
    def add_file(self, file_id: str, filename: str, purpose: str, size: int, sha256: str) -> dict:
        self._write("INSERT INTO files VALUES (?, ?, ?, ?, ?, 'processed', ?)", file_id, filename, purpose, size,
                    int(time.time()), sha256)
        return self.file(file_id)

    def file(self, file_id: str) -> dict | None:
        row = self._one("SELECT * FROM files WHERE id = ?", file_id)
        return file_object(row) if row else None

    def files(self, purpose: str | None = None) -> list[dict]:
        rows = self._all("SELECT * FROM files WHERE ? IS NULL OR purpose = ? ORDER BY created_at DESC, rowid DESC",
                         purpose, purpose)
        return [file_object(r) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        return self._write("DELETE FROM files WHERE id = ?", file_id) > 0

    # -- jobs ------------------------------------------------------------------------------------------------
    def add_job(self, job: dict) -> dict:
        self._write("INSERT INTO jobs (id, model, training_file, validation_file, suffix, seed, metadata, "
                    "hyperparameters, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'validating_files', ?)",
                    job["id"], job["model"], job["training_file"], job["validation_file"], job["suffix"],
                    job["seed"], json.dumps(job["metadata"]) if job["metadata"] is not None else None,
                    json.dumps(job["hyperparameters"]), int(time.time()))
        return self.job(job["id"])

    def job(self, job_id: str) -> dict | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", job_id)
        return job_object(row) if row else None

    def _page(self, table: str, job_id: str | None, after: str | None, limit: int) -> tuple[list, bool]:
        """Rows of `table` (one job's, with `job_id`) newest first, those older than row `after`; and whether more
        follow. `table` is one of this module's, never a request's."""
        of_job, key = ("job_id = ? AND ", (job_id,)) if job_id is not None else ("", ())
        start = self._one(f"SELECT seq FROM {table} WHERE {of_job}id = ?", *key, after) if after else None
        bound = start["seq"] if start else None
        rows = self._all(f"SELECT * FROM {table} WHERE {of_job}(? IS NULL OR seq < ?) ORDER BY seq DESC LIMIT ?",
                         *key, bound, bound, limit + 1)
        return rows[:limit], len(rows) > limit

    def jobs(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        rows, more = self._page("jobs", None, after, limit)
        return [job_object(r) for r in rows], more

    def next_job(self) -> dict | None:
        """The oldest job the worker owes a result (one left running by a killed server first: it resumes)."""
        row = self._one(f"SELECT * FROM jobs WHERE status IN {ACTIVE} ORDER BY status != 'running', seq LIMIT 1")
        return job_object(row) if row else None

    def update_job(self, job_id: str, **fields) -> None:
        encoded = {k: json.dumps(v) if k == "error" and v is not None else v for k, v in fields.items()}
        if fields.get("status") in FINAL:
            encoded["finished_at"] = int(time.time())
        sets = ", ".join(f"{k} = ?" for k in encoded)
        self._write(f"UPDATE jobs SET {sets} WHERE id = ?", *encoded.values(), job_id)

    def request_cancel(self, job_id: str) -> dict | None:
        """Marks the job cancelled (a queued one) or to be cancelled (a running one: the worker stops it)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row and row["status"] in ("validating_files", "queued"):
                self.db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, cancel_requested = 1 "
                                "WHERE id = ?", (int(time.time()), job_id))
            elif row and row["status"] == "running":
                self.db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            self.db.execute("COMMIT")
        return self.job(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        row = self._one("SELECT cancel_requested FROM jobs WHERE id = ?", job_id)
        return bool(row and row["cancel_requested"])

    # -- events and checkpoints ------------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        kind = "metrics" if data is not None else "message"
        self._write("INSERT INTO events (id, job_id, created_at, level, message, type, data, step) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", new_id("ftevent"), job_id, int(time.time()), level, message,
                    kind, json.dumps(data) if data is not None else None, (data or {}).get("step"))

    def last_metrics_step(self, job_id: str) -> int:
        row = self._one("SELECT MAX(step) AS step FROM events WHERE job_id = ? AND type = 'metrics'", job_id)
        return int(row["step"]) if row and row["step"] is not None else 0

    def events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        rows, more = self._page("events", job_id, after, limit)
        return [event_object(r) for r in rows], more

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, model: str) -> None:
        self._write("INSERT OR IGNORE INTO checkpoints (id, job_id, created_at, step, metrics, model) "
                    "VALUES (?, ?, ?, ?, ?, ?)", new_id("ftckpt"), job_id, int(time.time()), step,
                    json.dumps(metrics), model)

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        rows, more = self._page("checkpoints", job_id, after, limit)
        return [checkpoint_object(r) for r in rows], more

    def fine_tuned_models(self) -> list[dict]:
        return [job_object(r) for r in self._all("SELECT * FROM jobs WHERE status = 'succeeded' ORDER BY seq")]

    def close(self) -> None:
        with self.lock:
            self.db.close()


def file_object(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"], "status_details": None}


def job_object(row: sqlite3.Row) -> dict:
    hyper = json.loads(row["hyperparameters"])
    return {
        "id": row["id"], "object": "fine_tuning.job", "model": row["model"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "fine_tuned_model": row["fine_tuned_model"], "organization_id": "edgeft",
        "result_files": [], "status": row["status"], "validation_file": row["validation_file"],
        "training_file": row["training_file"], "hyperparameters": hyper, "trained_tokens": row["trained_tokens"],
        "error": json.loads(row["error"]) if row["error"] else None, "seed": row["seed"],
        "estimated_finish": row["estimated_finish"], "integrations": [], "suffix": row["suffix"],
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
    }


def event_object(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.event", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "type": row["type"],
            "data": json.loads(row["data"]) if row["data"] else {}}


def checkpoint_object(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint", "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": row["model"], "fine_tuning_job_id": row["job_id"],
            "metrics": json.loads(row["metrics"]), "step_number": row["step"]}
