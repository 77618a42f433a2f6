"""Writes matmul.onnx: Y[M, N] = X[M, K] @ W[K, N] with W a random initializer, the shape of
the whole-human projections, for `tract-matmul` (tract's own kernel on the probe's shape).
Needs `onnx` (tools/export-scgpt/requirements.txt pins it).
Usage: python make_matmul_onnx.py [M K N] (default 4092 512 512); writes ./matmul.onnx."""

import sys

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save

m, k, n = (int(v) for v in sys.argv[1:4]) if len(sys.argv) == 4 else (4092, 512, 512)
weights = np.random.default_rng(0).random((k, n), dtype=np.float32) - 0.5
w = numpy_helper.from_array(weights, name="W")
x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])
y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "matmul", [x], [y], [w])
save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "matmul.onnx")
