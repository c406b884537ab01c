"""The torch engine across ranks (torchrun, gloo on this CPU): every strategy trains the adapter one process
trains, with the same global batch; a run with a killed rank resumes to the uninterrupted result; several
machines (launches with their node ranks on loopback) form one job."""

import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgeft.runtime.torchrun import STRATEGIES
from edgeft.stages.train import TrainConfig, train
from tests.helpers import DATA, cli, losses, process, refused, start

# 7 samples a batch: the validation split's last batch has one, so one rank evaluates no rows of it
RUN = {"max_steps": 3, "batch_size": 7, "grad_accum": 2, "seq_len": 256, "lr": 1e-3, "backend": "torch"}
TOLERANCE = 1e-5  # max abs difference of any adapter value (the adapter moves ~0.1 in these runs)


def copy_prepared(built, tmp_path: Path, name: str) -> Path:
    import shutil

    ws = tmp_path / name
    shutil.copytree(built("prepared", lora_r=8), ws)
    return ws


def last_adapter(ws: Path) -> dict[str, np.ndarray]:
    last = sorted((ws / "train" / "checkpoints").glob("step-*"))[-1]
    return load_file(last / "adapter.safetensors")


def assert_same_adapter(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    assert all(np.isfinite(v).all() for v in got.values())
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert worst <= TOLERANCE, f"adapters differ by {worst:.2e}"
    return worst


@pytest.fixture(scope="module")
def one_process(built, tmp_path_factory):
    """The reference: the same run in one process."""
    ws = copy_prepared(built, tmp_path_factory.mktemp("one"), "ws")
    train(ws, DATA, TrainConfig(**RUN))
    return ws


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_train_the_adapter_one_process_trains(strategy, one_process, built, tmp_path):
    ws = copy_prepared(built, tmp_path, "ws")
    result = train(ws, DATA, TrainConfig(**RUN, nproc=2, strategy=strategy))
    assert result.step == 3 and result.best_eval_loss is not None
    assert_same_adapter(last_adapter(ws), last_adapter(one_process))
    assert np.allclose(losses(ws), losses(one_process), rtol=0, atol=1e-5)
    import torch

    want = torch.load(sorted((one_process / "train/checkpoints").glob("step-*"))[-1] / "optimizer.pt")
    got = torch.load(sorted((ws / "train/checkpoints").glob("step-*"))[-1] / "optimizer.pt")
    assert got["state"].keys() == want["state"].keys()
    for i, state in want["state"].items():
        assert float(got["state"][i]["step"]) == float(state["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(got["state"][i][key], state[key], rtol=1e-4, atol=1e-8), (i, key)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("zero2", marks=pytest.mark.slow)])
def test_ranks_train_on_a_quantized_base_as_one_process_does(strategy, built, tmp_path):
    import shutil

    runs = {}
    for name, extra in (("one", {}), ("two", {"nproc": 2, "strategy": strategy})):
        ws = tmp_path / name
        shutil.copytree(built("prepared", lora_r=8, base_precision="int4"), ws)
        train(ws, DATA, TrainConfig(**RUN, **extra))
        runs[name] = last_adapter(ws)
    assert_same_adapter(runs["two"], runs["one"])


def _rank_pid(job_file: Path, rank: int) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(job_file).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.parametrize("strategy", ["zero3", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_a_run_whose_rank_was_killed_resumes_to_the_uninterrupted_adapter(strategy, built, tmp_path):
    options = ["--backend", "torch", "--nproc", "2", "--strategy", strategy, "--batch-size", "4", "--seq-len", "256",
               "--lr", "1e-3", "--max-steps", "12", "--save-every", "2", "--eval-every", "100"]
    whole = copy_prepared(built, tmp_path, "whole")
    assert cli("train", whole, "--data", DATA, *options).code == 0
    ws = copy_prepared(built, tmp_path, "ws")
    proc = start("train", ws, "--data", DATA, *options)
    job_file = ws / "logs" / "train.job.json"
    deadline = time.time() + 300
    while not (ws / "train" / "checkpoints" / "step-000002").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    pid = _rank_pid(job_file, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    assert "rank 1 was killed by signal 9" in err and "--resume" in err and "Traceback" not in err
    kept = sorted(p.name for p in (ws / "train" / "checkpoints").glob("step-*"))
    assert kept and kept[-1] < "step-000012"  # it stopped before the end
    assert cli("train", ws, "--data", DATA, *options, "--resume").code == 0
    assert_same_adapter(last_adapter(ws), last_adapter(whole))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_loopback_form_one_job(one_process, built, tmp_path):
    rdzv = f"127.0.0.1:{_free_port()}"
    options = ["--backend", "torch", "--batch-size", str(RUN["batch_size"]), "--grad-accum", str(RUN["grad_accum"]),
               "--seq-len", str(RUN["seq_len"]), "--lr", str(RUN["lr"]), "--max-steps", str(RUN["max_steps"]),
               "--nproc", "1", "--nnodes", "2", "--rdzv", rdzv]
    nodes = [copy_prepared(built, tmp_path, f"node{rank}") for rank in (0, 1)]
    procs = [start("train", ws, "--data", DATA, *options, "--node-rank", str(rank)) for rank, ws in enumerate(nodes)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "node 1 of 2: trained 3/3 steps" in outputs[1][0]
    assert not list((nodes[1] / "train").glob("checkpoints/step-*"))  # node 0 writes the checkpoints
    assert_same_adapter(last_adapter(nodes[0]), last_adapter(one_process))


def test_a_rendezvous_that_never_forms_times_out_with_the_reason(built, tmp_path):
    ws = copy_prepared(built, tmp_path, "ws")
    started = time.time()
    result = cli("train", ws, "--data", DATA, "--backend", "torch", "--nproc", "1", "--nnodes", "2", "--node-rank",
                 "0", "--rdzv", f"127.0.0.1:{_free_port()}", "--rdzv-timeout", "5", "--max-steps", "1")
    refused(result, "did not meet", "--node-rank", "--rdzv-timeout")
    assert time.time() - started < 120


@pytest.mark.parametrize("flags, phrases", [
    (["--nproc", "2"], ["--backend torch"]),
    (["--backend", "torch", "--nproc", "4", "--batch-size", "2"], ["global batch", "--batch-size >= 4"]),
    (["--backend", "torch", "--nnodes", "2"], ["--rdzv HOST:PORT"]),
    (["--backend", "torch", "--nnodes", "2", "--node-rank", "2", "--rdzv", "127.0.0.1:29500"], ["node_rank", "0 to 1"]),
    (["--backend", "torch", "--nnodes", "2", "--rdzv", "nowhere"], ["HOST:PORT"]),
    (["--backend", "torch", "--nproc", "0"], ["nproc"]),
])
def test_bad_distributed_options_are_refused(flags, phrases, built, tmp_path):
    ws = copy_prepared(built, tmp_path, "ws")
    refused(cli("train", ws, "--data", DATA, *flags), *phrases)


def test_an_unknown_strategy_is_refused_with_the_known_ones(built, tmp_path):
    ws = copy_prepared(built, tmp_path, "ws")
    refused(process("train", ws, "--data", DATA, "--backend", "torch", "--nproc", "2", "--strategy", "zero4"),
            "zero4", "ddp", "zero2", "zero3", "fsdp")


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_a_quantized_base_is_refused_where_the_strategy_shards_the_base(strategy, built, tmp_path):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(built("prepared", lora_r=8, base_precision="int4"), ws)
    refused(cli("train", ws, "--data", DATA, "--backend", "torch", "--nproc", "2", "--strategy", strategy,
                "--max-steps", "1"), "int4", "--strategy ddp or zero2")


@pytest.fixture(scope="module")
def one_process_bf16(built, tmp_path_factory):
    ws = copy_prepared(built, tmp_path_factory.mktemp("one-bf16"), "ws")
    train(ws, DATA, TrainConfig(**RUN, bf16=True))
    return ws


def test_bf16_trains_the_adapter_fp32_trains_within_bf16_rounding(one_process, one_process_bf16):
    """--bf16 on the CPU (autocast, the frozen base held in bf16): the same run as fp32 to bf16's precision, the
    adapter still fp32. Stated tolerances: losses and gradient norms within 1 % (bf16 keeps 8 bits of mantissa,
    0.4 % per rounding); the trained LoRA B matrices point the same way (cosine >= 0.99). Adam's first steps move
    each value by about the learning rate whatever the gradient's size, so values are not compared one by one."""
    ws = one_process_bf16
    got, want = last_adapter(ws), last_adapter(one_process)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in got.values())
    b = [k for k in want if "lora_B" in k]  # LoRA's B starts at zero: its value is how training moved it
    cosine = sum(float(got[k].ravel() @ want[k].ravel()) for k in b) / np.sqrt(
        sum(float(got[k].ravel() @ got[k].ravel()) for k in b) * sum(float(want[k].ravel() @ want[k].ravel()) for k in b))
    assert cosine >= 0.99, cosine  # measured 0.9995
    assert np.allclose(losses(ws, "grad_norm"), losses(one_process, "grad_norm"), rtol=1e-2, atol=0)
    assert any(not np.array_equal(got[k], want[k]) for k in b)  # the run did compute in bf16
    assert np.all(np.isfinite(losses(ws)))
    assert np.allclose(losses(ws), losses(one_process), rtol=1e-2, atol=0)


@pytest.mark.parametrize("strategy", ["zero3", *(pytest.param(s, marks=pytest.mark.slow)
                                                for s in ("ddp", "zero2", "fsdp"))])
def test_two_ranks_in_bf16_train_as_one_process_in_bf16(strategy, one_process_bf16, built, tmp_path):
    """Every strategy computes in bf16 (zero3 and fsdp over their fp32 shards of the base). Stated tolerance: losses
    and gradient norms within 1e-3 relative of one bf16 process (measured <= 4e-4: the ranks' row split changes
    bf16's rounding only in the sums)."""
    ws = copy_prepared(built, tmp_path, "ws")
    train(ws, DATA, TrainConfig(**RUN, nproc=2, strategy=strategy, bf16=True))
    for key in ("loss", "grad_norm"):
        got = losses(ws, key)
        assert len(got) == 3 and np.all(np.isfinite(got))
        assert np.allclose(got, losses(one_process_bf16, key), rtol=1e-3, atol=0), key


def test_bf16_with_the_ort_backend_is_refused(built, tmp_path):
    ws = copy_prepared(built, tmp_path, "ws")
    refused(cli("train", ws, "--data", DATA, "--bf16"), "bf16", "--backend torch")


def test_ep_cuda_with_the_torch_backend_and_no_gpu_is_refused(built, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    ws = copy_prepared(built, tmp_path, "ws")
    refused(process("train", ws, "--data", DATA, "--backend", "torch", "--ep", "cuda", "--max-steps", "1"),
            "--ep cuda", "--ep cpu")
    assert not (ws / "train" / "checkpoints").exists()
