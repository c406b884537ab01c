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


TORCH_GPUS = __import__("torch").cuda.device_count()
needs_torch_gpu = pytest.mark.skipif(not TORCH_GPUS, reason="needs an NVIDIA GPU that torch can use")


def _torch_run(built, tmp_path, name: str, **options):
    from edgeft.stages.train import TrainConfig, train
    from tests.distributed.test_strategies import RUN, copy_prepared

    ws = copy_prepared(built, tmp_path, name)
    train(ws, DATA, TrainConfig(**{**RUN, "max_steps": 1, **options}))
    return ws


@needs_torch_gpu
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_one_torch_step_per_strategy_on_nccl_follows_the_cpu_run(strategy, built, tmp_path):
    """The torch engine on CUDA under torchrun, its ranks on NCCL (one GPU: a world of one). Stated tolerance:
    the loss and gradient norm within 1e-4 relative of the CPU's, the adapter after one AdamW step within 1e-4
    absolute (torch keeps TF32 off for fp32 matmuls by default)."""
    from tests.distributed.test_strategies import last_adapter

    cpu = _torch_run(built, tmp_path, "cpu")
    gpu = _torch_run(built, tmp_path, "gpu", ep="cuda", nproc=min(2, TORCH_GPUS), strategy=strategy)
    for key in ("loss", "grad_norm"):
        assert np.all(np.isfinite(losses(gpu, key))) and np.allclose(losses(gpu, key), losses(cpu, key), rtol=1e-4)
    got, want = last_adapter(gpu), last_adapter(cpu)
    assert all(np.isfinite(v).all() for v in got.values())
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= 1e-4
    assert losses(gpu, "gpu_peak_mb")[0] > 0
    assert f"{strategy} over" in _events_text(gpu) and "(nccl)" in _events_text(gpu)


@needs_torch_gpu
def test_bf16_on_cuda_follows_the_fp32_cpu_run(built, tmp_path):
    """Stated tolerance: as test_strategies' bf16 test on the CPU, loss and gradient norm within 1 %."""
    cpu = _torch_run(built, tmp_path, "cpu")
    gpu = _torch_run(built, tmp_path, "gpu", ep="cuda", bf16=True)
    for key in ("loss", "grad_norm"):
        assert np.all(np.isfinite(losses(gpu, key))) and np.allclose(losses(gpu, key), losses(cpu, key), rtol=1e-2)


def _events_text(ws) -> str:
    """Every log the run left in its workspace (the launch's output and events)."""
    return "\n".join(p.read_text(errors="replace") for p in ws.rglob("*") if p.is_file() and p.suffix in (".log", ".jsonl"))
