"""Signals a user or a service manager sends: Ctrl-C and SIGTERM stop a stage where it can stop cleanly."""

import json
import os
import signal
import time

from edgeft.tasks.home import DATA_DIR
from tests.helpers import cli, stages, start, wait_for

DATA = DATA_DIR / "train.jsonl"
LONG = ["--data", DATA, "--max-steps", "300", "--batch-size", "4", "--seq-len", "128", "--eval-every", "150"]


def test_sigterm_during_training_saves_a_checkpoint_and_resume_finishes(workspace):
    ws = workspace("exported")
    proc = start("train", ws, *LONG)
    try:
        wait_for(proc, "step 15/300")
        proc.send_signal(signal.SIGTERM)  # the parent only, as `kill` or a service manager sends it
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err + out
    assert "interrupted at step" in out and "--resume" in out
    [ckpt] = (ws / "train" / "checkpoints").glob("step-*")
    step = json.loads((ckpt / "trainer_state.json").read_text())["position"]["step"]
    assert 15 <= step < 300 and f"interrupted at step {step}/300" in out
    assert "train" not in stages(ws)
    result = cli("train", ws, *LONG, "--resume")
    assert result.code == 0, result.err
    assert stages(ws)["train"]["step"] == 300


def test_ctrl_c_during_export_is_an_interruption_that_leaves_nothing(workspace):
    ws = workspace("prepared")
    before = json.loads((ws / "manifest.json").read_text())
    proc = start("export", ws)
    try:
        wait_for(proc, "export 4/5")  # generate_artifacts, in the training runtime's process
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert "runtime failed" not in err
    assert not (ws / "artifacts").exists() and not list(ws.glob(".artifacts*"))
    assert json.loads((ws / "manifest.json").read_text()) == before
