import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeft.graph.detach import SUFFIX, detach_norms


def dora_like_graph():
    """loss = sum(x @ (W + B@A)^T * m / ||W + B@A||): the norm must not pass gradient to A and B."""
    inits = [numpy_helper.from_array(np.ones((4, 3), np.float32), n) for n in ("W",)]
    inits += [numpy_helper.from_array(np.ones((2, 3), np.float32), "A"),
              numpy_helper.from_array(np.ones((4, 2), np.float32), "B"),
              numpy_helper.from_array(np.ones((4,), np.float32), "m")]
    nodes = [
        helper.make_node("MatMul", ["B", "A"], ["BA"]),
        helper.make_node("Add", ["W", "BA"], ["WBA"]),
        helper.make_node("ReduceL2", ["WBA"], ["norm"], axes=[1], keepdims=0),
        helper.make_node("Div", ["m", "norm"], ["scale"]),
        helper.make_node("Transpose", ["WBA"], ["WBA_t"]),
        helper.make_node("MatMul", ["x", "WBA_t"], ["y"]),
        helper.make_node("Mul", ["y", "scale"], ["ys"]),
        helper.make_node("ReduceSum", ["ys"], ["loss"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 3])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_norm_reads_detached_aliases_and_values_are_unchanged():
    import onnxruntime as ort

    model = dora_like_graph()
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    aliases = detach_norms(model, {"A", "B", "m"})
    assert aliases == {"A" + SUFFIX: "A", "B" + SUFFIX: "B"}
    assert {i.name for i in model.graph.input} == {"x", "A" + SUFFIX, "B" + SUFFIX}
    norm = next(n for n in model.graph.node if n.op_type == "ReduceL2")
    assert norm.input[0] == "WBA" + SUFFIX
    # the trainable path still reads A and B; the norm's cone reads only the aliases
    cone = [n for n in model.graph.node if n.name.endswith(SUFFIX) or any(o.endswith(SUFFIX) for o in n.output)]
    assert cone and all(i not in ("A", "B") for n in cone for i in n.input)
    assert any("A" in n.input or "BA" in n.input for n in model.graph.node if not n.output[0].endswith(SUFFIX))
    onnx.checker.check_model(model)
    feeds = {"x": x, "A" + SUFFIX: np.ones((2, 3), np.float32), "B" + SUFFIX: np.ones((4, 2), np.float32)}
    after = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)


def test_graph_without_norms_is_untouched():
    model = dora_like_graph()
    for n in model.graph.node:
        if n.op_type == "ReduceL2":
            n.op_type = "ReduceMax"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert detach_norms(model, {"A", "B"}) == {}
    assert model == copy
