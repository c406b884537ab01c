"""Experiment trackers (`train --report-to tensorboard,wandb,mlflow`, the Hugging Face Trainer's convention).

Each tracker gets what `WS/train/metrics.jsonl` gets (every progress event's numbers as train/..., every
evaluation's as eval/..., at their step), the run's options once, and later `edgeft eval`'s table, logged to
the same run: the runs' ids are kept in `WS/train/trackers.json`, so a resumed training run and the evaluation
continue them. Where each writes, unless its own environment says otherwise:
    tensorboard   WS/train/tensorboard/ (event files: `tensorboard --logdir WS/train/tensorboard`)
    wandb         project "edgeft", files under WS/train/wandb/ (WANDB_MODE=offline keeps them local;
                  WANDB_PROJECT, WANDB_ENTITY and a login as W&B reads them)
    mlflow        MLFLOW_TRACKING_URI, else an SQLite store WS/train/mlflow.db with artifacts in
                  WS/train/mlartifacts/ (`mlflow ui --backend-store-uri sqlite:///WS/train/mlflow.db`)
Each is optional: a tracker asked for and not installed is refused before training starts, with the package
to install.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from edgeft.core import atomic
from edgeft.core.errors import EdgeftError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name: the module it needs
STATE = "trackers.json"


def parse(text: str | None) -> list[str]:
    """'tensorboard,wandb' as names, checked ("none" or nothing: no tracker)."""
    names = [n.strip() for n in (text or "").split(",") if n.strip() and n.strip() != "none"]
    if unknown := [n for n in names if n not in TRACKERS]:
        raise EdgeftError(f"--report-to {text!r}: unknown tracker {', '.join(unknown)}; use any of "
                          f"{', '.join(TRACKERS)} separated by commas (or none)")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    if missing := [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]:
        raise EdgeftError(f"--report-to {','.join(names)}: {', '.join(missing)} is not installed; "
                          f"pip install 'edgeft[trackers]' (or {' '.join(missing)}), or leave it out")


def _numbers(event: dict, skip: tuple[str, ...] = ("step", "total", "event")) -> dict[str, float]:
    return {k: float(v) for k, v in event.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool) and v == v}


class Trackers:
    """The run's trackers, opened (or reopened, by the ids in `folder`/trackers.json) under `name`."""

    def __init__(self, names: list[str], folder: Path, name: str, config: dict | None = None):
        self.folder, self.names = Path(folder), names
        self.folder.mkdir(parents=True, exist_ok=True)
        state_path = self.folder / STATE
        ids = json.loads(state_path.read_text()) if state_path.is_file() else {}
        self.runs = {n: getattr(self, f"_open_{n}")(name, ids.get(n), config or {}) for n in names}
        atomic.write_json(state_path, {**ids, **{n: run_id for n, (_, run_id) in self.runs.items()}})

    @classmethod
    def of_run(cls, folder: Path, name: str) -> Trackers | None:
        """The trackers a finished training run in `folder` reported to (None: it reported to none)."""
        state_path = Path(folder) / STATE
        if not state_path.is_file():
            return None
        names = [n for n in json.loads(state_path.read_text()) if n in TRACKERS]
        check_installed(names)
        return cls(names, folder, name) if names else None

    # -- opening ------------------------------------------------------------------------------------------------
    def _open_tensorboard(self, name: str, run_id: str | None, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.folder / "tensorboard"))
        if config:
            writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")
        return writer, "tensorboard"

    def _open_wandb(self, name: str, run_id: str | None, config: dict):
        import os

        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "edgeft"), name=name, id=run_id,
                         resume="allow" if run_id else None, dir=str(self.folder), config=config or None,
                         reinit="create_new")
        return run, run.id

    def _open_mlflow(self, name: str, run_id: str | None, config: dict):
        import os

        import mlflow
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.folder / 'mlflow.db').resolve()}"
        client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = client.get_experiment_by_name("edgeft")
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                "edgeft", artifact_location=(self.folder / "mlartifacts").resolve().as_uri())
            run_id = client.create_run(experiment_id, run_name=name).info.run_id
            client.log_batch(run_id, params=[Param(key, json.dumps(value, default=str)[:6000])
                                             for key, value in sorted(config.items())])
        return client, run_id

    # -- logging ------------------------------------------------------------------------------------------------
    def event(self, event: dict) -> None:
        """A training event as metrics.jsonl has it: progress as train/..., evaluations as eval/..."""
        prefix = {"progress": "train", "eval": "eval"}.get(event.get("event"))
        if prefix is None:
            return
        self.log({f"{prefix}/{k}": v for k, v in _numbers(event).items()}, int(event["step"]))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, (run, run_id) in self.runs.items():
            if name == "tensorboard":
                for key, value in metrics.items():
                    run.add_scalar(key, value, step)
            elif name == "wandb":
                run.log(metrics, step=step)
            else:
                import time

                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                run.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def table(self, name: str, rows: list[dict]) -> None:
        """A table of results (eval's: one row per variant)."""
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for tracker, (run, run_id) in self.runs.items():
            if tracker == "tensorboard":
                lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
                run.add_text(name, "\n".join(lines))
            elif tracker == "wandb":
                import wandb

                run.log({name: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})
            else:
                run.log_table(run_id, {c: [row.get(c) for row in rows] for c in columns}, f"{name}.json")

    def close(self) -> None:
        for name, (run, _) in self.runs.items():
            if name == "tensorboard":
                run.close()
            elif name == "wandb":
                run.finish()
