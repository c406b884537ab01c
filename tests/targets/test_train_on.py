"""`train --on`: the ORT training loop run on the device over a real SSH link, with only the training build, onnx,
numpy, protobuf, flatbuffers and packaging there (no torch, no transformers, no edgeft install), its checkpoints
brought back as they are written; a dropped link and a Ctrl-C each leave a run that `--resume` continues."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from edgeft.core import compare
from edgeft.core.fingerprint import sha256_file
from edgeft.runtime import jobs, launcher
from edgeft.stages.train import TrainConfig, train
from edgeft.trainer import checkpoints
from tests.helpers import DATA, FAST, cli, fresh, losses, refused, start, wait_for

OPTIONS = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]


def trained(checkpoint: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """The trainable tensors of an ORT checkpoint (read by the training runtime here)."""
    out = tmp_path / f"{checkpoint.parent.parent.parent.name}-{checkpoint.name}.npz"
    launcher.run(jobs.ReadTrained(checkpoint=str(checkpoint / "ort_checkpoint"), out=str(out)))
    with np.load(out) as arrays:
        return dict(arrays)


def assert_same_adapter(a: Path, b: Path, tmp_path: Path) -> None:
    """The same trained tensors within 1e-6 (max abs): the device runs the same build on the same data order."""
    x, y = trained(a, tmp_path), trained(b, tmp_path)
    assert x.keys() == y.keys() and x
    for name in x:
        assert np.isfinite(x[name]).all() and np.isfinite(y[name]).all(), name
        assert compare.max_abs_diff(x[name], y[name]) <= 1e-6, name


def no_device_training_left(sshd) -> None:
    """No training process of the device's runtime outlives the run (it dies with its SSH session)."""
    deadline = time.time() + 20
    while time.time() < deadline:
        left = [p for p in psutil.process_iter(["cmdline"]) if any(str(sshd.device_dir) in a and "runtime-" in a
                                                                  for a in (p.info["cmdline"] or []))]
        if not left:
            return
        time.sleep(0.2)
    raise AssertionError(f"device training processes left: {[p.pid for p in left]}")


def test_training_on_the_device_is_the_local_run_with_its_checkpoints_brought_back(exported, sshd, tmp_path):
    here, there = fresh(exported, tmp_path, "here"), fresh(exported, tmp_path, "there")
    steps = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3"]
    result = cli("train", there, "--data", DATA, *OPTIONS, *steps, *sshd.flags())
    assert result.code == 0, result.err[-3000:]
    assert "Traceback" not in result.err and "trained 6 steps" in result.out
    train(here, DATA, TrainConfig(**FAST, max_steps=6, save_every=2, eval_every=3))
    # the same losses, eval losses and checkpoints as the same run here (1e-6 relative; finite)
    for key in ("loss", "grad_norm"):
        a, b = losses(here, key), losses(there, key)
        assert len(a) == len(b) == 6 and all(np.isfinite(a + b))
        assert np.allclose(a, b, rtol=1e-6, atol=0), key
    mine, theirs = (checkpoints.complete(ws / "train" / "checkpoints") for ws in (here, there))
    assert [p.name for p in mine] == [p.name for p in theirs] and theirs
    assert checkpoints.best(there / "train" / "checkpoints").name == checkpoints.best(here / "train" / "checkpoints").name
    assert_same_adapter(mine[-1], theirs[-1], tmp_path)
    record = json.loads((there / "manifest.json").read_text())["stages"]["train"]
    assert record["step"] == 6 and Path(record["last"]).parent == there / "train" / "checkpoints"
    assert (there / "train" / "metrics.png").stat().st_size > 0
    assert "train: ONNX Runtime 1.19.2 engine ready" in result.out
    # the device's runtime has no torch, transformers or edgeft; its run folder went once everything was here
    (runtime,) = sshd.device_dir.glob("runtime-*")
    for module in ("torch", "transformers", "edgeft"):
        proc = subprocess.run([str(runtime / "bin" / "python"), "-I", "-c", f"import {module}"], capture_output=True,
                              cwd=sshd.device_dir)
        assert proc.returncode != 0, module
    assert not list((sshd.device_dir / "runs").iterdir())
    no_device_training_left(sshd)


def test_a_dropped_link_leaves_a_run_that_resumes_to_the_same_adapter(exported, sshd, tmp_path):
    ws, reference = fresh(exported, tmp_path, "ws"), fresh(exported, tmp_path, "reference")
    # the tiny model's steps take milliseconds: enough of them that the link is cut mid-run
    steps = ["--max-steps", "400", "--save-every", "10", "--eval-every", "200"]
    proc = start("train", ws, "--data", DATA, *OPTIONS, *steps, *sshd.flags())
    try:
        wait_for(proc, "step 20/400", timeout=300)
        for child in psutil.Process(sshd.pid).children(recursive=True):  # the sessions, as a dropped link ends them
            child.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "training on the device stopped with it" in err, err[-2000:]
    last = checkpoints.latest(ws / "train" / "checkpoints")
    assert last is not None and f"the last checkpoint brought back is {last.name}" in err
    assert 10 <= int(last.name.split("-")[1]) < 400, last.name  # mid-run
    assert "--resume --on" in err and str(sshd.key) in err
    no_device_training_left(sshd)
    assert not [p for p in (ws / "train" / "checkpoints").iterdir() if p.name.startswith(".")]  # nothing half-pulled
    recorded = checkpoints.read_state(last)["files"]  # a complete checkpoint, its files as saved on the device
    assert recorded and all(sha256_file(last / rel) == digest for rel, digest in recorded.items())

    again = cli("train", ws, "--data", DATA, *OPTIONS, *steps, "--resume", *sshd.flags())
    assert again.code == 0, again.err[-3000:]
    assert f"resuming at step {int(last.name.split('-')[1])}" in again.out and "sending step-" in again.err
    train(reference, DATA, TrainConfig(**FAST, max_steps=400, save_every=10, eval_every=200))
    assert_same_adapter(checkpoints.latest(reference / "train" / "checkpoints"),
                        checkpoints.latest(ws / "train" / "checkpoints"), tmp_path)
    assert np.allclose(losses(reference)[-10:], losses(ws)[-10:], rtol=1e-6, atol=0)


def test_ctrl_c_saves_on_the_device_and_brings_the_checkpoint_back(exported, sshd, tmp_path):
    ws = fresh(exported, tmp_path)
    proc = start("train", ws, "--data", DATA, *OPTIONS, "--max-steps", "400", *sshd.flags())
    try:
        wait_for(proc, "step 20/400", timeout=300)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: edgeft's process group, not its ssh session
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, out + err[-3000:]
    step, path = re.search(r"interrupted at step (\d+)/400; checkpoint (\S+)", out).groups()
    assert Path(path).parent == ws / "train" / "checkpoints"
    state = checkpoints.read_state(Path(path))
    assert state["position"]["step"] == int(step) >= 20
    assert "--resume --on" in out
    no_device_training_left(sshd)


def test_what_cannot_train_on_a_device_is_refused(exported, sshd, tmp_path):
    ws = fresh(exported, tmp_path)
    result = cli("train", ws, "--data", DATA, *OPTIONS, "--backend", "torch", "--recompute", "--bf16", *sshd.flags())
    refused(result, "train --on", "drop --recompute", "drop --bf16")
    assert not (ws / "train").exists()
    from edgeft.targets.train import unsupported

    def device(machine, version):
        return SimpleNamespace(machine=machine, version=version, target=SimpleNamespace(name="pi@raspberrypi"))

    assert "x86-64 only; add --backend torch" in unsupported(device("aarch64", (3, 11)))
    assert unsupported(device("aarch64", (3, 13)), "torch") is None
    assert "--device-python" in unsupported(device("x86_64", (3, 13)))
    assert unsupported(device("x86_64", (3, 12))) is None


@pytest.mark.parametrize("flags, phrases", [
    (["--on", "not a host"], ["--on", "[user@]host[:port]"]),
    (["--on", "root@127.0.0.1:1"], ["cannot reach it over SSH"]),
])
def test_an_unreachable_device_is_refused_before_anything_is_written(exported, tmp_path, flags, phrases):
    ws = fresh(exported, tmp_path)
    refused(cli("train", ws, "--data", DATA, *OPTIONS, *flags), *phrases)
    assert not (ws / "train").exists()
