"""`train --on --backend torch` (aarch64 boards, where the ONNX Runtime training build has no wheel): torch, numpy
and safetensors on the device and the workspace's loss module exported here with torch.export; no transformers,
no PEFT, no edgeft install there. Against a real sshd on 127.0.0.1, the int4 base."""

import json
import subprocess

import numpy as np
from safetensors.numpy import load_file

from edgeft.core import compare
from edgeft.stages.merge import merge
from edgeft.stages.train import TrainConfig, train
from edgeft.trainer import checkpoints
from tests.helpers import DATA, FAST, cli, fresh, losses

OPTIONS = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]


def test_the_exported_program_trains_on_the_device_as_the_torch_backend_does_here(built, sshd, tmp_path):
    exported = built("exported", lora_r=8, base_precision="int4", export_options={"recompute": True})
    here, there = fresh(exported, tmp_path, "here"), fresh(exported, tmp_path, "there")
    steps = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3"]
    result = cli("train", there, "--data", DATA, "--backend", "torch", *OPTIONS, *steps, *sshd.flags())
    assert result.code == 0, result.err[-3000:]
    assert "exporting the model for the device's torch" in result.err and "trained 6 steps" in result.out
    assert "keeps every layer's activations" in result.out  # the workspace recomputes; the program cannot
    train(here, DATA, TrainConfig(**FAST, backend="torch", max_steps=6, save_every=2, eval_every=3))
    # the same losses, gradient norms, checkpoints and adapter as the torch backend here (1e-6; finite)
    for key in ("loss", "grad_norm"):
        a, b = losses(here, key), losses(there, key)
        assert len(a) == len(b) == 6 and all(np.isfinite(a + b))
        assert np.allclose(a, b, rtol=1e-6, atol=0), key
    mine, theirs = (checkpoints.complete(ws / "train" / "checkpoints") for ws in (here, there))
    assert [p.name for p in mine] == [p.name for p in theirs] and theirs
    x, y = (load_file(p[-1] / "adapter.safetensors") for p in (mine, theirs))
    assert x.keys() == y.keys() and all(compare.max_abs_diff(x[k], y[k]) <= 1e-6 for k in x)
    merge(there)  # the device's checkpoint is the torch backend's: merge checks it against PEFT
    record = json.loads((there / "manifest.json").read_text())["stages"]["merge"]
    assert record["checkpoint"] == theirs[-1].name and record["backend"] == "torch"
    # the device's runtime: torch, and neither transformers nor PEFT nor edgeft
    (runtime,) = sshd.device_dir.glob("runtime-*")
    for module, present in (("torch", True), ("safetensors", True), ("transformers", False), ("peft", False),
                            ("edgeft", False)):
        proc = subprocess.run([str(runtime / "bin" / "python"), "-I", "-c", f"import {module}"], capture_output=True,
                              cwd=sshd.device_dir)
        assert (proc.returncode == 0) is present, module
    assert len(list((there / "programs").glob("program-*.pt2"))) == 1  # made here once, kept for the next run
