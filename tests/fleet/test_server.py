"""The server's guard around Flower's strategies: a device's bad update is refused and logged, and the average is
Flower's over the good ones alone."""

import json

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the fleet extra (Python 3.11+): pip install -e .[fleet]")
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from flwr.supercore.task_identity import TaskIdentity

from edgeft.core import compare
from edgeft.fleet.client import to_record
from edgeft.fleet.config import FleetConfig
from edgeft.fleet.server import Guard, Recorder, build_strategy

START = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


@pytest.fixture(autouse=True)
def in_a_task(monkeypatch):
    """Messages carry the run and node of the task that makes them, as inside a running Flower app."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def reply(arrays: dict, examples=10, loss=1.0) -> Message:
    metrics = MetricRecord({"num-examples": examples, "train_loss": loss, "peak_rss_mb": 1.0})
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": metrics}), dst_node_id=1, message_type="train")


def test_bad_updates_are_refused_and_the_average_is_of_the_good_ones(tmp_path):
    said = []
    recorder = Recorder(tmp_path, "k", 3, log=said.append)
    guard = Guard(flower.FedAvg(), START, recorder, FleetConfig(min_clients=1), offset=0)
    good = [{"a": np.full((2, 3), 1.0, np.float32), "b": np.ones(4, np.float32)},
            {"a": np.full((2, 3), 4.0, np.float32), "b": np.full(4, 4.0, np.float32)}]
    nan = {"a": np.full((2, 3), np.nan, np.float32), "b": np.ones(4, np.float32)}
    misshapen = {"a": np.ones((3, 3), np.float32), "b": np.ones(4, np.float32)}
    missing = {"a": np.ones((2, 3), np.float32)}
    replies = [reply(good[0], 10), reply(good[1], 30), reply(nan), reply(misshapen), reply(missing),
               reply(good[0], examples=0), reply(good[0], loss=float("inf"))]
    arrays, _ = guard.aggregate_train(1, replies)
    mean = {k: np.average([g[k] for g in good], axis=0, weights=[10, 30]) for k in START}
    got = {k: v.numpy() for k, v in arrays.items()}
    assert all(compare.max_abs_diff(got[k], mean[k]) <= 1e-6 for k in START)
    refusals = [line for line in said if "refused the update" in line]
    assert len(refusals) == 5, said
    assert any("NaN or infinite values in a" in line for line in refusals)
    assert any("shaped (3, 3), not (2, 3)" in line for line in refusals)
    assert any("lacks 1 tensor(s) (b)" in line for line in refusals)
    assert any("0 training examples" in line for line in refusals)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["updates"] == 2 and row["refused"] == 5 and row["kept_previous"] is False
    assert recorder.completed() == 1


def test_a_round_with_fewer_good_updates_than_the_minimum_keeps_the_previous_adapter(tmp_path):
    recorder = Recorder(tmp_path, "k", 3, log=lambda _: None)
    guard = Guard(flower.FedAvg(), START, recorder, FleetConfig(min_clients=2), offset=4)
    guard.kept = START
    arrays, _ = guard.aggregate_train(1, [reply({"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)})])
    assert arrays is None
    assert recorder.completed() == 5
    kept = recorder.global_adapter(5)
    assert all(np.array_equal(kept[k], START[k]) for k in START)


def test_strategies_and_privacy_are_flowers_own():
    assert isinstance(build_strategy(FleetConfig(strategy="fedadam"), 4), flower.FedAdam)
    assert isinstance(build_strategy(FleetConfig(strategy="fedprox"), 4), flower.FedProx)
    dp = build_strategy(FleetConfig(privacy="fixed", noise=0.5, clip=2.0), 4)
    assert isinstance(dp, flower.DifferentialPrivacyServerSideFixedClipping)
