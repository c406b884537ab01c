"""What `devices probe` measures, on the machine this runs on: with the standard library, numpy, psutil and
onnxruntime only, so that the same file runs on a target device over SSH (`devices probe --on`, targets/) with
nothing of edgeft installed there. Run as a script it prints the measurements as JSON:

    python measure.py MATMUL.onnx N [MATMUL_INT8.onnx]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

INTERESTING_ISA = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "neon", "asimd", "fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme",
)


def cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return info


def arch() -> str:
    m = platform.machine().lower()
    return "aarch64" if m in ("arm64", "aarch64") else "x86_64" if m in ("x86_64", "amd64") else m


def isa(info: dict[str, str]) -> list[str]:
    flags = set((info.get("flags") or info.get("Features") or "").split())
    if arch() == "aarch64":
        flags |= {"neon"}
    return [f for f in INTERESTING_ISA if f in flags]


def freq_ghz(info: dict[str, str]) -> tuple[float, str]:
    import psutil

    f = psutil.cpu_freq()
    if f and f.max:
        return f.max / 1000, "psutil.cpu_freq().max"
    if "cpu MHz" in info:
        return float(info["cpu MHz"]) / 1000, "/proc/cpuinfo 'cpu MHz'"
    return float("nan"), "unknown"


def cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_gflops(model: Path, n: int, repeats: int = 5) -> tuple[float, str]:
    """fp32 MatMul n x n x n in ONNX Runtime (the MLAS kernels training and inference use), best of repeats.
    `model`: the one-node graph (probe.matmul_model builds it)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cores()
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    sess.run(None, feeds)
    best = min(timed(lambda: sess.run(None, feeds)) for _ in range(repeats))
    ref = f"onnxruntime {ort.__version__} fp32 MatMul {n}x{n}x{n}, {opts.intra_op_num_threads} threads, best of {repeats}"
    return 2 * n**3 / best / 1e9, ref


def matmul_int8_gops(model: Path, n: int, repeats: int = 5) -> tuple[float, str]:
    """int8 MatMulInteger n x n x n (u8 x s8 -> s32: MLAS's int8 kernels, VNNI where the CPU has it), best of
    repeats. `model`: the one-node graph (probe.matmul_model(..., int8=True) builds it)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cores()
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    sess.run(None, feeds)
    best = min(timed(lambda: sess.run(None, feeds)) for _ in range(repeats))
    ref = (f"onnxruntime {ort.__version__} MatMulInteger u8 x s8 {n}x{n}x{n}, {opts.intra_op_num_threads} threads, "
           f"best of {repeats}")
    return 2 * n**3 / best / 1e9, ref


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> tuple[float, str]:
    """Copy bandwidth (read + write bytes per second, as STREAM counts it), one thread per core."""
    import numpy as np

    src = np.ones(mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), cores())
    bounds = [(c[0], c[-1] + 1) for c in chunks if c.size]

    def copy_all():
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    copy_all()
    best = min(timed(copy_all) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9, f"numpy copy of {mb} MiB in {len(bounds)} threads, best of {repeats}"


def nvidia_gpus() -> list[tuple[str, float]]:
    """(name, memory in MiB) of each NVIDIA GPU nvidia-smi lists."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [(name.strip(), float(mem)) for name, mem in (line.split(",", 1) for line in out.strip().splitlines())]


def measure(model: Path, n: int, int8_model: Path | None = None) -> dict:
    """Everything a profile records of this machine, as plain values."""
    import onnxruntime as ort
    import psutil

    info = cpuinfo()
    freq, freq_ref = freq_ghz(info)
    return {"arch": arch(), "cpu_model": info.get("model name") or platform.processor() or arch(),
            "cores": cores(), "isa": isa(info), "freq_ghz": freq, "freq_ref": freq_ref,
            "matmul": list(matmul_gflops(model, n)), "bandwidth": list(memory_bandwidth_gbs()),
            "matmul_int8": list(matmul_int8_gops(int8_model, n)) if int8_model else None,
            "memory_total_gb": psutil.virtual_memory().total / 1e9, "ort_providers": ort.get_available_providers(),
            "gpus": nvidia_gpus(), "node": platform.node(), "python": platform.python_version(),
            "modules": sorted({m.split(".")[0] for m in sys.modules})}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)))
