"""The server killed mid-run: the fleet resumes after the last completed round and ends with the adapter an
uninterrupted fleet ends with (FedAvg keeps no state between rounds; every round's batches are seeded)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

pytest.importorskip("flwr", reason="the fleet extra (Python 3.11+): pip install -e .[fleet]")

from edgeft.core import compare
from tests.helpers import DATA, cli, fresh


def _recipe(path, ws, model):
    path.write_text(f"name: r\nworkspace: {ws}\nmodel: {{path: {model}}}\nlora: {{r: 8}}\ndata: {{train: {DATA}}}\n"
                    "train: {batch_size: 4, seq_len: 256, lr: 0.001}\nstages: [train]\n"
                    "fleet: {clients: 2, rounds: 3, local_steps: 1, evaluate: false}\n")
    return path


def _rounds_done(ws) -> int:
    metrics = ws / "fleet" / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


@pytest.mark.slow  # two three-round fleets, one killed and resumed: about 2 minutes
def test_a_killed_fleet_resumes_after_its_last_round_and_ends_as_an_uninterrupted_one(exported, tiny_model, tmp_path):
    model = tiny_model("phi3-mini-4k")
    whole, killed = fresh(exported, tmp_path, "whole"), fresh(exported, tmp_path, "killed")
    assert cli("fleet", "sim", _recipe(tmp_path / "whole.yaml", whole, model)).code == 0

    proc = subprocess.Popen([sys.executable, "-m", "edgeft", "fleet", "sim", _recipe(tmp_path / "k.yaml", killed, model)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while _rounds_done(killed) < 1 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _rounds_done(killed) >= 1, "the fleet never completed a round"
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    finally:
        for pid in tree if "tree" in locals() else [proc.pid]:  # the server and everything it started, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
    done = json.loads((killed / "fleet" / "state.json").read_text())["round"]
    assert 1 <= done < 3, "killed too late to test a resume"

    resumed = cli("fleet", "sim", tmp_path / "k.yaml")
    assert resumed.code == 0, resumed.err[-2000:]
    assert f"resuming after round {done} of 3" in resumed.out
    rows = [json.loads(x) for x in (killed / "fleet" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    with np.load(whole / "fleet" / "rounds" / "round-0003.npz") as a, \
            np.load(killed / "fleet" / "rounds" / "round-0003.npz") as b:
        assert all(compare.max_abs_diff(a[k], b[k]) <= 1e-6 for k in a.files)
