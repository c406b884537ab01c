"""`train --report-to tensorboard,wandb,mlflow`: each tracker, offline, gets the metrics metrics.jsonl has, the
options, and eval's table in the same run; read back with each tracker's own reader (TensorBoard's event
accumulator, W&B's transaction log, the MLflow client on its SQLite store)."""

import json
import struct

import numpy as np
import pytest

from edgeft.stages.evaluate import EvalConfig, evaluate
from edgeft.stages.train import TrainConfig, train
from edgeft.tasks.home import DATA_DIR
from tests.helpers import DATA, FAST, cli, fresh, losses, refused


def wandb_records(path):
    """The records of a W&B transaction log (run-ID.wandb): a 7-byte header (':W&B', 0xBEE1, version), then
    LevelDB's log format (32 KiB blocks of records with a 7-byte header: crc32c, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, pending, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4: pos + 7])
        pending += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
        elif kind == 0:
            break
    return out


@pytest.fixture(scope="module")
def tracked(exported, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        ws = fresh(exported, tmp_path_factory.mktemp("tracked"))
        train(ws, DATA, TrainConfig(**FAST, max_steps=4, eval_every=2, report_to="tensorboard,wandb,mlflow"))
        report = evaluate(ws, DATA_DIR / "test.jsonl", EvalConfig(limit=2, max_new_tokens=4, variants=["base"]),
                          log=lambda _: None)
    finally:
        mp.undo()
    rows = [json.loads(x) for x in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
    return ws, rows, report


def test_tensorboard_gets_the_metrics_the_options_and_the_eval_table(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws, rows, report = tracked
    acc = EventAccumulator(str(ws / "train" / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert np.allclose([e.value for e in loss], losses(ws), rtol=1e-6) and np.all(np.isfinite([e.value for e in loss]))
    evals = [r for r in rows if r["event"] == "eval"]
    assert [e.step for e in acc.Scalars("eval/eval_loss")] == [r["step"] for r in evals] == [2, 4]
    assert [e.value for e in acc.Scalars("eval/eval_loss")] == pytest.approx([r["eval_loss"] for r in evals], rel=1e-6)
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_rss_mb"} <= set(acc.Tags()["scalars"])
    texts = {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    config = json.loads(texts["config/text_summary"].split("```json\n")[1].split("\n```")[0])
    assert config["lr"] == FAST["lr"] and config["max_steps"] == 4
    assert "| base |" in texts["eval/text_summary"] and "exact_match" in texts["eval/text_summary"]
    assert report["results"][0]["variant"] == "base"


def test_wandb_offline_gets_the_metrics_the_options_and_the_eval_table(tracked):
    ws, rows, _ = tracked
    # offline, the evaluation's resumption of the run is a second log of the same run id (`wandb sync` joins them)
    run_id = json.loads((ws / "train" / "trackers.json").read_text())["wandb"]
    logs = sorted((ws / "train" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(log.name == f"run-{run_id}.wandb" for log in logs)
    (table,) = (ws / "train" / "wandb").glob("offline-run-*/files/media/table/eval_*.table.json")
    history, config = [], {}
    for record in (r for log in logs for r in wandb_records(log)):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind in ("run", "config"):  # the options given to wandb.init come with the run record
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    train_rows = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in train_rows] == [1, 2, 3, 4]
    assert np.allclose([h["train/loss"] for h in train_rows], losses(ws), rtol=1e-9)
    assert [h["eval/eval_loss"] for h in history if "eval/eval_loss" in h] == pytest.approx(
        [r["eval_loss"] for r in rows if r["event"] == "eval"], rel=1e-9)
    assert config["lr"] == FAST["lr"] and config["max_steps"] == 4
    saved = json.loads(table.read_text())
    assert "variant" in saved["columns"] and saved["data"][0][saved["columns"].index("variant")] == "base"


def test_mlflow_gets_the_metrics_the_options_and_the_eval_table(tracked):
    import mlflow

    ws, rows, _ = tracked
    run_id = json.loads((ws / "train" / "trackers.json").read_text())["mlflow"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'train' / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert np.allclose([m.value for m in history], losses(ws), rtol=1e-9)
    assert [m.value for m in client.get_metric_history(run_id, "eval/eval_loss")] == pytest.approx(
        [r["eval_loss"] for r in rows if r["event"] == "eval"], rel=1e-9)
    params = client.get_run(run_id).data.params
    assert json.loads(params["lr"]) == FAST["lr"] and json.loads(params["max_steps"]) == 4
    table = json.loads((ws / "train" / "mlartifacts").rglob("eval.json").__next__().read_text())
    assert "base" in json.dumps(table)


def test_no_tracker_by_default_and_unknown_ones_are_refused(exported, tmp_path):
    ws = fresh(exported, tmp_path)
    refused(cli("train", ws, "--data", DATA, "--report-to", "tensorboard,comet"), "report_to", "comet",
            "tensorboard, wandb, mlflow")
    train(ws, DATA, TrainConfig(**FAST, max_steps=1))
    assert not (ws / "train" / "trackers.json").exists() and not (ws / "train" / "tensorboard").exists()
