"""`edgeft devices probe`: measure the machine it runs on and write a profile that loads like the others."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from edgeft.core import atomic
from edgeft.devices import profiles
from edgeft.runtime import training_build

INTERESTING_ISA = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "neon", "asimd", "fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme",
)
ORT_EP_NAMES = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml", "WebGpuExecutionProvider": "webgpu",
                "QNNExecutionProvider": "qnn", "CoreMLExecutionProvider": "coreml",
                "TensorrtExecutionProvider": "tensorrt", "CPUExecutionProvider": "cpu"}


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return info


def _arch() -> str:
    m = platform.machine().lower()
    return "aarch64" if m in ("arm64", "aarch64") else "x86_64" if m in ("x86_64", "amd64") else m


def _isa(info: dict[str, str]) -> list[str]:
    flags = set((info.get("flags") or info.get("Features") or "").split())
    if _arch() == "aarch64":
        flags |= {"neon"}
    return [f for f in INTERESTING_ISA if f in flags]


def _freq_ghz(info: dict[str, str]) -> tuple[float, str]:
    f = psutil.cpu_freq()
    if f and f.max:
        return f.max / 1000, "psutil.cpu_freq().max"
    if "cpu MHz" in info:
        return float(info["cpu MHz"]) / 1000, "/proc/cpuinfo 'cpu MHz'"
    return float("nan"), "unknown"


def matmul_gflops(n: int = 2048, repeats: int = 5) -> tuple[float, str]:
    """fp32 MatMul n x n x n in ONNX Runtime (the MLAS kernels training and inference use), best of repeats."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    sess.run(None, feeds)
    best = min(_timed(lambda: sess.run(None, feeds)) for _ in range(repeats))
    ref = f"onnxruntime {ort.__version__} fp32 MatMul {n}x{n}x{n}, {opts.intra_op_num_threads} threads, best of {repeats}"
    return 2 * n**3 / best / 1e9, ref


def torch_matmul_gflops(n: int = 4096, repeats: int = 5) -> tuple[float, str] | None:
    """The same measurement with torch's sgemm (MKL/oneDNN), which on some CPUs outruns MLAS."""
    try:
        import torch
    except ImportError:
        return None
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9, f"torch {torch.__version__} fp32 matmul {n}^3, {torch.get_num_threads()} threads, best of {repeats}"


def peak_matmul_gflops() -> tuple[float, str]:
    """The best fp32 matmul rate any runtime here reaches, with every rate in the reference."""
    ort_rate, ort_ref = matmul_gflops()
    measured = [(ort_rate, ort_ref)]
    if (t := torch_matmul_gflops()) is not None:
        measured.append(t)
    best = max(measured)
    return best[0], "best of: " + "; ".join(f"{ref}: {rate:.0f} GFLOP/s" for rate, ref in measured)


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> tuple[float, str]:
    """Copy bandwidth (read + write bytes per second, as STREAM counts it), one thread per core."""
    threads = psutil.cpu_count(logical=False) or 1
    src = np.ones(mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(c[0], c[-1] + 1) for c in chunks if c.size]

    def copy_all():
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    copy_all()
    best = min(_timed(copy_all) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9, f"numpy copy of {mb} MiB in {len(bounds)} threads, best of {repeats}"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _nvidia_gpus() -> list[profiles.Accelerator]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    today = datetime.date.today().isoformat()
    gpus = []
    for line in out.strip().splitlines():
        name, mem = (s.strip() for s in line.split(",", 1))
        gpus.append(profiles.Accelerator(name=name, kind="gpu", memory_gb=profiles.Figure(
            round(float(mem) * 2**20 / 1e9, 1), "measured", "nvidia-smi memory.total", today)))
    return gpus


def probe(name: str, budget_fraction: float = 0.75) -> profiles.Profile:
    """Measure this machine into a Profile (no budgets: those are targets a person sets)."""
    import onnxruntime as ort

    today = datetime.date.today().isoformat()
    info = _cpuinfo()
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    freq, freq_ref = _freq_ghz(info)
    gflops, gflops_ref = peak_matmul_gflops()
    bw, bw_ref = memory_bandwidth_gbs()
    total = psutil.virtual_memory().total / 1e9
    gpus = _nvidia_gpus()
    inference_eps = [ORT_EP_NAMES[p] for p in ort.get_available_providers() if p in ORT_EP_NAMES]
    inference_eps = [ep for ep in inference_eps if ep == "cpu" or gpus or ep in ("qnn", "coreml")]
    training_eps = (["cuda"] if gpus and training_build.is_installed("cuda") else []) + ["cpu"]
    model = info.get("model name") or platform.processor() or _arch()
    m = lambda value, ref: profiles.Figure(round(value, 2), "measured", ref, today)  # noqa: E731
    return profiles.Profile(
        name=name,
        description=f"measured by `edgeft devices probe` on {platform.node() or 'this machine'}, {today}",
        cpu=profiles.CPU(arch=_arch(), model=re.sub(r"\s+", " ", model), cores=cores, isa=_isa(info),
                        max_freq_ghz=m(freq, freq_ref) if freq == freq else m(1.0, "unknown: no frequency reported"),
                        peak_fp32_gflops=m(gflops, gflops_ref)),
        memory=profiles.Memory(total_gb=m(total, "psutil.virtual_memory().total"),
                              budget_gb=profiles.Figure(round(total * budget_fraction, 2), "derived",
                                                       f"{budget_fraction:.0%} of memory.total_gb"),
                              bandwidth_gbs=m(bw, bw_ref)),
        accelerators=gpus,
        execution_providers=profiles.ExecutionProviders(
            training=training_eps, inference=inference_eps,
            training_backend="torch" if training_build.unsupported_reason() else "ort"),
        notes=["No budgets: add a `budgets:` section with your targets so that plan and bench can judge."],
    )


def write(profile: profiles.Profile, out: Path) -> Path:
    atomic.write_text(out, profiles.to_yaml(profile))
    profiles.load_file(out)
    return out

