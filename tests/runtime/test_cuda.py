"""`--ep cuda`: the CUDA training build with the CUDA 11.8 libraries it links, and a clear refusal without a GPU.

The build is optional and large (about 3 GB with its libraries), so CI does not install it: the test of its
links runs where `edgeft runtime install --cuda` was run, and the training test where there is a GPU too.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from edgeft.runtime import launcher, training_build
from tests.helpers import DATA, FAST, fresh, losses, stages

CUDA_BUILD = training_build.is_complete("cuda")


def test_the_child_finds_the_cuda_libraries_installed_with_the_build(tmp_path):
    build = tmp_path / "ort-training-cuda"
    for name in ("cublas", "cudnn"):
        (build / "nvidia" / name / "lib").mkdir(parents=True)
    env = launcher.child_env(build)
    assert env["LD_LIBRARY_PATH"].split(":")[:2] == [str(build / "nvidia" / n / "lib") for n in ("cublas", "cudnn")]
    assert env["PYTHONPATH"].split(":")[0] == str(build)
    assert launcher.child_env(tmp_path / "cpu-build").get("LD_LIBRARY_PATH") == os.environ.get("LD_LIBRARY_PATH")


@pytest.mark.skipif(not CUDA_BUILD, reason="the CUDA training build is not installed (`edgeft runtime install --cuda`)")
def test_the_cuda_provider_library_resolves_every_library_it_links():
    provider = training_build.runtime_dir("cuda") / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so"
    env = launcher.child_env(training_build.runtime_dir("cuda"))
    out = subprocess.run(["ldd", str(provider)], capture_output=True, text=True, env=env).stdout
    assert "not found" not in out, out
    for lib in ("libcudart.so.11.0", "libcublasLt.so.11", "libcudnn.so.8", "libcurand.so.10", "libcufft.so.10"):
        assert f"{lib} => {training_build.runtime_dir('cuda')}/nvidia/" in out, lib


def test_ep_cuda_without_a_usable_gpu_is_a_user_error(exported, tmp_path):
    if CUDA_BUILD and training_build.cuda_problem() is None:
        pytest.skip("this machine can train on CUDA")
    ws = fresh(exported, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "edgeft", "train", str(ws), "--data", str(DATA), "--max-steps", "1",
                           "--ep", "cuda"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    if not training_build.is_installed("cuda"):
        assert "--ep cuda needs the CUDA training build; run `edgeft runtime install --cuda`" in proc.stderr
    elif CUDA_BUILD:
        assert f"--ep cuda: {training_build.cuda_problem()}. Train on the CPU with --ep cpu" in proc.stderr
    assert not (ws / "train" / "checkpoints").exists()


@pytest.mark.skipif(not CUDA_BUILD or training_build.cuda_problem() is not None,
                    reason="needs the CUDA training build and an NVIDIA GPU")
def test_cuda_training_follows_the_cpu_run(exported, tmp_path):
    cfg = ["--max-steps", "10", "--batch-size", str(FAST["batch_size"]), "--seq-len", str(FAST["seq_len"]),
           "--lr", str(FAST["lr"])]
    runs = {}
    for ep in ("cpu", "cuda"):
        ws = fresh(exported, tmp_path, ep)
        proc = subprocess.run([sys.executable, "-m", "edgeft", "train", str(ws), "--data", str(DATA), *cfg, "--ep", ep],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        runs[ep] = np.array(losses(ws))
        assert stages(ws)["train"]["config"]["ep"] == ep
    # Stated tolerance: 1e-3 absolute per step (GPU kernels sum in another order, TF32 is off in ORT's CUDA EP).
    assert np.max(np.abs(runs["cpu"] - runs["cuda"])) < 1e-3, runs
