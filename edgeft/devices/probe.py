"""`edgeft devices probe`: measure the machine it runs on and write a profile that loads like the others."""

from __future__ import annotations

import datetime
import re
import tempfile
from pathlib import Path

from edgeft.core import atomic
from edgeft.devices import measure, profiles
from edgeft.runtime import training_build

ORT_EP_NAMES = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml", "WebGpuExecutionProvider": "webgpu",
                "QNNExecutionProvider": "qnn", "CoreMLExecutionProvider": "coreml",
                "TensorrtExecutionProvider": "tensorrt", "CPUExecutionProvider": "cpu"}
MATMUL_N = 2048


def matmul_model(path: Path, n: int = MATMUL_N, int8: bool = False) -> Path:
    """The one-node MatMul graph measure.py times, fp32 (or int8: MatMulInteger, u8 x s8 -> s32); built here, so
    the device needs no onnx package."""
    from onnx import TensorProto, helper, save

    a, b, c = ((TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if int8 else (TensorProto.FLOAT,) * 3)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger" if int8 else "MatMul", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", a, [n, n]), helper.make_tensor_value_info("b", b, [n, n])],
        [helper.make_tensor_value_info("c", c, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def torch_matmul_gflops(n: int = 4096, repeats: int = 5) -> tuple[float, str] | None:
    """The same measurement with torch's sgemm (MKL/oneDNN), which on some CPUs outruns MLAS."""
    try:
        import torch
    except ImportError:
        return None
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(measure.timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9, f"torch {torch.__version__} fp32 matmul {n}^3, {torch.get_num_threads()} threads, best of {repeats}"


def probe(name: str, budget_fraction: float = 0.75) -> profiles.Profile:
    """Measure this machine into a Profile (no budgets: those are targets a person sets)."""
    with tempfile.TemporaryDirectory(prefix="edgeft-probe-") as tmp:
        measured = measure.measure(matmul_model(Path(tmp) / "matmul.onnx"), MATMUL_N,
                                   matmul_model(Path(tmp) / "matmul_int8.onnx", int8=True))
    if (t := torch_matmul_gflops()) is not None:
        measured["matmul_torch"] = list(t)
    return profile_of(measured, name, budget_fraction, training_eps=(["cuda"] if training_build.is_installed("cuda")
                                                                     else []) + ["cpu"],
                      training_backend="torch" if training_build.unsupported_reason() else "ort")


def profile_of(m: dict, name: str, budget_fraction: float = 0.75, training_eps: list[str] | None = None,
               training_backend: str | None = None, where: str = "") -> profiles.Profile:
    """A Profile from measure.measure's values (taken here or on a device)."""
    today = datetime.date.today().isoformat()
    rates = [tuple(m["matmul"])] + ([tuple(m["matmul_torch"])] if m.get("matmul_torch") else [])
    gflops = max(rate for rate, _ in rates)
    gflops_ref = "best of: " + "; ".join(f"{ref}: {rate:.0f} GFLOP/s" for rate, ref in rates)
    total, freq = m["memory_total_gb"], m["freq_ghz"]
    gpus = [profiles.Accelerator(name=gpu, kind="gpu", memory_gb=profiles.Figure(
        round(mem * 2**20 / 1e9, 1), "measured", "nvidia-smi memory.total", today)) for gpu, mem in m["gpus"]]
    inference_eps = [ORT_EP_NAMES[p] for p in m["ort_providers"] if p in ORT_EP_NAMES]
    inference_eps = [ep for ep in inference_eps if ep == "cpu" or gpus or ep in ("qnn", "coreml")]
    training_eps = [ep for ep in (training_eps or ["cpu"]) if ep == "cpu" or gpus]
    if training_backend is None:  # a device: the training build has Linux wheels for x86-64 only
        training_backend = "ort" if m["arch"] == "x86_64" else "torch"
    f = lambda value, ref: profiles.Figure(round(value, 2), "measured", ref, today)  # noqa: E731
    return profiles.Profile(
        name=name,
        description=f"measured by `edgeft devices probe{where}` on {m['node'] or 'this machine'}, {today}",
        cpu=profiles.CPU(arch=m["arch"], model=re.sub(r"\s+", " ", m["cpu_model"]), cores=m["cores"], isa=m["isa"],
                        max_freq_ghz=f(freq, m["freq_ref"]) if freq == freq else f(1.0, "unknown: no frequency reported"),
                        peak_fp32_gflops=f(gflops, gflops_ref),
                        peak_int8_gops=f(*m["matmul_int8"]) if m.get("matmul_int8") else None),
        memory=profiles.Memory(total_gb=f(total, "psutil.virtual_memory().total"),
                              budget_gb=profiles.Figure(round(total * budget_fraction, 2), "derived",
                                                       f"{budget_fraction:.0%} of memory.total_gb"),
                              bandwidth_gbs=f(*m["bandwidth"])),
        accelerators=gpus,
        execution_providers=profiles.ExecutionProviders(
            training=training_eps, inference=inference_eps, training_backend=training_backend),
        notes=["No budgets: add a `budgets:` section with your targets so that plan and bench can judge."],
    )


def write(profile: profiles.Profile, out: Path) -> Path:
    atomic.write_text(out, profiles.to_yaml(profile))
    profiles.load_file(out)
    return out

