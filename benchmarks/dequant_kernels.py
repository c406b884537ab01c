"""One frozen int4 weight in the training runtime: every way a training step can use it, timed side by side.

    python benchmarks/dequant_kernels.py [--m 256] [--k 3072] [--n 16384] [--runs 9] [--out benchmarks/results]

The largest weight of a Phi-3-mini layer (gate_up, 3072 -> 16384) in the int4 blocks the bundle ships (block
32: uint8 codes [N, blocks, 16], a scale and a zero point per block) against 1 x 256 tokens. Each variant is an
ONNX Runtime session of the training build (1.19.2, the runtime that trains). A training Module never prepacks
(module.cc sets `session.disable_prepacking`; any other value is refused, "Prepacking is not supported for
training scenarios"), so the "as in training" rows run that way; the "prepacked" rows show what it forbids.
Median of `--runs` after one warm-up. Writes dequant_kernels.json and dequant_kernels.md.

What a step needs of a frozen weight W [N, K]: the forward X W^T, the backward dY W (the input's gradient; a
frozen weight has none), and with --recompute a second forward. MatMulNBits (the only kernel reading the blocks)
reduces along K, the axis the blocks run along; dY W reduces along N, so the backward needs W in fp32 whatever
the forward uses. The best an int4 step can do per weight is then: the fastest forward from the blocks + the
fastest dequantizing op + the fp32 backward, against fp32's forward + backward.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402


def runtime():
    """The training build, in place of the onnxruntime this environment imported (for the quantizer)."""
    from edgeft.runtime import training_build

    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        del sys.modules[name]
    sys.modules.setdefault("deepspeed", None)  # onnxruntime.training would import it
    sys.path.insert(0, str(training_build.runtime_dir("cpu")))
    import onnxruntime as ort

    return ort


def model(nodes, inputs, outputs, initializers=(), opset=17):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8 if opset < 21 else 10
    return m.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=256, help="tokens")
    parser.add_argument("--k", type=int, default=3072, help="the weight's inputs")
    parser.add_argument("--n", type=int, default=16384, help="the weight's outputs")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from edgeft.quant import quantize

    m, k, n, block = args.m, args.k, args.n, 32
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
    packed, scales, zero = quantize.nbits_blocks(w, block, True)
    blocks = packed.shape[1]
    scales, zero = scales.reshape(-1).astype(np.float32), zero.reshape(-1)
    ort = runtime()
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.graph.frozen_base import dequantize_nodes

    x = rng.standard_normal((m, k), dtype=np.float32)
    dy = rng.standard_normal((m, n), dtype=np.float32)
    F, U8 = TensorProto.FLOAT, TensorProto.UINT8
    rows: list[dict] = []

    def time_it(key, label, proto, feeds, prepack=False):
        options = ort.SessionOptions()
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        out = session.run(None, feeds)[0]
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - started)
        rows.append({"key": key, "variant": label, "ms": statistics.median(times) * 1e3})
        print(f"{label:66s} {rows[-1]['ms']:7.1f} ms", flush=True)
        return out

    # dequantization: the weight [N, K] in fp32 from the blocks. The result feeds an Add, as it feeds a GEMM in
    # training (a graph output would cost one more copy)
    zero_add = [numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    spec = {"precision": "int4", "out": n, "in": k, "blocks": blocks, "block_size": block,
            "q": "q", "scale": "scale", "zero_point": "zp"}
    one = helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64)))
    add = helper.make_node("Add", ["w", "zero"], ["out"])
    graph_inputs = [("q", U8, [n, blocks, block // 2]), ("scale", F, [n * blocks]), ("zp", U8, [n * blocks])]
    wdq = time_it("dequantize", "dequantize: edgeft's nodes (BitShift, Concat, DequantizeLinear)",
                  model([one, *dequantize_nodes(spec, "w", "one"), add], graph_inputs, ["out"], zero_add),
                  {"q": packed, "scale": scales, "zp": zero})
    zp_packed = quantize.pack_nibbles(zero.reshape(n, blocks))  # [n, blocks / 2]: MatMulNBits' layout and uint4's
    uint4 = [helper.make_tensor("q4", TensorProto.UINT4, [n, k], packed.tobytes(), raw=True),
             numpy_helper.from_array(scales.reshape(n, blocks), "s2"),
             helper.make_tensor("zp4", TensorProto.UINT4, [n, blocks], zp_packed.tobytes(), raw=True)]
    got = time_it("dequantize_uint4", "dequantize: DequantizeLinear (opset 21) on uint4 blocks",
                  model([helper.make_node("DequantizeLinear", ["q4", "s2", "zp4"], ["w"], axis=1, block_size=block),
                         add], [], ["out"], uint4 + zero_add, opset=21), {})
    assert np.array_equal(got, wdq), "the two dequantizations differ"

    # GEMMs on the dequantized weight, as in training and prepacked
    w_init = numpy_helper.from_array(wdq, "w")
    fwd = model([helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", transB=1)],
                [("x", F, [m, k])], ["y"], [w_init])
    bwd = model([helper.make_node("MatMul", ["dy", "w"], ["dx"])], [("dy", F, [m, n])], ["dx"], [w_init])
    for prepack in (False, True):
        how = "prepacked" if prepack else "as in training"
        time_it(f"forward_fp32{'_prepacked' * prepack}", f"forward fp32 X W^T (FusedMatMul transB), {how}", fwd,
                {"x": x}, prepack)
        time_it(f"backward_fp32{'_prepacked' * prepack}", f"backward fp32 dY W (MatMul), {how}", bwd, {"dy": dy},
                prepack)

    # the forward read from the blocks: MatMulNBits (without prepacking it dequantizes with MLAS, then an fp32 GEMM)
    nbits_inputs = [numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales, "scale"),
                    numpy_helper.from_array(zp_packed, "zp")]
    reference = x @ wdq.T
    errors = {}
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["x", "q", "scale", "zp"], ["y"], domain="com.microsoft", K=k, N=n,
                                bits=4, block_size=block, accuracy_level=level)
        proto = model([node], [("x", F, [m, k])], ["y"], nbits_inputs)
        for prepack in (False, True):
            how = "prepacked" if prepack else "as in training"
            key = f"forward_nbits{level}{'_prepacked' * prepack}"
            y = time_it(key, f"forward MatMulNBits accuracy level {level}, {how}", proto, {"x": x}, prepack)
            errors[key] = float(np.abs(y - reference).max())
    ms = {r["key"]: r["ms"] for r in rows}
    dequant = min(ms["dequantize"], ms["dequantize_uint4"])  # MatMulNBits' own (MLAS) is not an op of its own
    forward = min(ms["dequantize"] + ms["forward_fp32"], ms["forward_nbits0"])
    floors = {"dequantize_ms": dequant, "int4_forward_ms": forward,
              "step": (forward + dequant + ms["backward_fp32"]) / (ms["forward_fp32"] + ms["backward_fp32"]),
              "recomputed_step": (2 * forward + dequant + ms["backward_fp32"])
              / (ms["forward_fp32"] + ms["backward_fp32"]),
              "today_step": (2 * ms["dequantize"] + ms["forward_fp32"] + ms["backward_fp32"])
              / (ms["forward_fp32"] + ms["backward_fp32"]),
              "today_recomputed_step": (3 * ms["dequantize"] + 2 * ms["forward_fp32"] + ms["backward_fp32"])
              / (ms["forward_fp32"] + ms["backward_fp32"])}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or ''}".strip(", "),
              "onnxruntime": ort.__version__, "m": m, "k": k, "n": n, "block_size": block, "runs": args.runs,
              "rows": rows, "max_abs_error_vs_fp32": errors, "floors": floors}
    report.save(args.out, "dequant_kernels", result, markdown)


def markdown(result: dict) -> str:
    floors = result["floors"]
    lines = [f"# One int4 weight in the training runtime ({result['k']} -> {result['n']}, {result['m']} tokens)", "",
             f"Measured {result['date']} on {result['machine']}, ONNX Runtime {result['onnxruntime']} (training build), "
             f"median of {result['runs']}; `python benchmarks/dequant_kernels.py`.", "",
             "| variant | ms |", "|---|---|"]
    lines += [f"| {r['variant']} | {r['ms']:.1f} |" for r in result["rows"]]
    errors = result["max_abs_error_vs_fp32"]
    lines += ["", "MatMulNBits against the fp32 GEMM on the same dequantized weight, max |difference|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + " (accuracy level 4 quantizes the "
              "activations to int8).", "",
              "## What this leaves for an int4 training step, per weight (ratio to the fp32 base's step, not recomputed)",
              "",
              "A training Module never prepacks, so only the \"as in training\" rows are open to it. The backward "
              "(dY W, reducing along N) needs W in fp32: no kernel reads blocks that run along K for it.", "",
              "| | int4 / fp32 | issue #27 asks |", "|---|---|---|",
              f"| today (dequantize before each use) | {floors['today_step']:.2f}x | |",
              f"| best on these kernels: fastest forward from the blocks + fastest dequantizing op + fp32 backward | "
              f"{floors['step']:.2f}x | 1.00x |",
              f"| today, recomputed (two forwards) | {floors['today_recomputed_step']:.2f}x | |",
              f"| best on these kernels, recomputed | {floors['recomputed_step']:.2f}x | 1.50x |", "",
              f"Fastest dequantizing op {floors['dequantize_ms']:.1f} ms, fastest forward from the blocks "
              f"{floors['int4_forward_ms']:.1f} ms. With any dequantization in the backward an int4 step is slower than "
              "the fp32 step on these kernels; a faster one needs a kernel ONNX Runtime 1.19.2 (the last training "
              "build) does not have, or prepacking, which its training API refuses.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
