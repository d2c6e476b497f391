"""The weight bytes read from an ONNX file's protobuf fields without onnx: equal to what onnx itself loads for every
graph of an export, packed 4-bit MatMulNBits and INT4 DequantizeLinear weights counted as stored (and run by ONNX
Runtime, so the layout counted is the one it computes with), an embedding table counted one row per token."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from flamingo_edge.errors import ExportError
from flamingo_edge.graphs import GRAPH_NAMES
from flamingo_edge.runtime.onnx_weights import read_graph, weight_bytes_per_token

K, N, BLOCK = 256, 192, 32  # a [K, N] weight in blocks of 32 along K


def matmul_fp32(path, weight: np.ndarray) -> None:
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "fp32",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def matmul_nbits(path, weight: np.ndarray) -> np.ndarray:
    """MatMulNBits (com.microsoft) with symmetric 4-bit blocks: B uint8 [N, K/BLOCK, BLOCK/2] (two weights a byte,
    the lower index in the low nibble), scales float [N * K/BLOCK], the default zero point 8. Returns the weight the
    graph computes with (dequantized)."""
    blocks = weight.T.reshape(N, K // BLOCK, BLOCK)  # [N, k_blocks, BLOCK]
    scales = np.abs(blocks).max(-1) / 7  # [N, k_blocks]
    codes = (np.clip(np.round(blocks / scales[..., None]), -8, 7) + 8).astype(np.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [N, k_blocks, BLOCK/2]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=K, N=N, bits=4,
                            block_size=BLOCK, accuracy_level=4)
    graph = helper.make_graph([node], "int4", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(packed, "B"),
                               numpy_helper.from_array(scales.reshape(-1).astype(np.float32), "scales")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(path))
    return ((codes.astype(np.float32) - 8) * scales[..., None]).reshape(N, K).T


def test_an_int4_matmul_reads_about_a_sixth_of_the_fp32_bytes(tmp_path, seed):
    weight = np.random.default_rng(seed).normal(size=(K, N)).astype(np.float32)
    matmul_fp32(tmp_path / "fp32.onnx", weight)
    dequantized = matmul_nbits(tmp_path / "int4.onnx", weight)
    fp32, int4 = weight_bytes_per_token(tmp_path / "fp32.onnx"), weight_bytes_per_token(tmp_path / "int4.onnx")
    assert fp32 == K * N * 4
    assert int4 == K * N // 2 + K * N // BLOCK * 4  # 4 bits a weight + one fp32 scale a block: 5 bits
    assert fp32 / int4 == pytest.approx(32 / 5)
    # The graph counted is one ONNX Runtime runs, with the layout counted: it computes with the dequantized weight.
    session = onnxruntime.InferenceSession(str(tmp_path / "int4.onnx"), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(seed + 1).normal(size=(1, K)).astype(np.float32)
    y = session.run(None, {"A": a})[0]
    np.testing.assert_allclose(y, a @ dequantized, rtol=0, atol=0.05 * np.abs(a @ dequantized).max())


def test_int4_dequantize_linear_weights_count_half_a_byte(tmp_path):
    """INT4 initializers (TensorRT's block-quantized DequantizeLinear form, opset 21) are stored two to a byte."""
    codes = helper.make_tensor("W", TensorProto.INT4, [K, N], np.zeros(K * N, np.int8).tolist())
    scales = numpy_helper.from_array(np.ones((K // BLOCK, N), np.float16), "scale")
    dq = helper.make_node("DequantizeLinear", ["W", "scale"], ["W_f"], axis=0, block_size=BLOCK)
    matmul = helper.make_node("MatMul", ["A", "W_f"], ["Y"])
    graph = helper.make_graph([dq, matmul], "dq", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [1, N])], [codes, scales])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "dq.onnx"))
    assert weight_bytes_per_token(tmp_path / "dq.onnx") == K * N // 2 + K // BLOCK * N * 2


def test_a_block_quantized_embedding_counts_one_row(tmp_path, seed):
    """ONNX Runtime's GatherBlockQuantized (`quantize --embeddings`): a token reads one row of the INT4 table and of
    its scales; the graph runs, and returns that row dequantized."""
    vocab, width = 50, 64
    codes = np.random.default_rng(seed).integers(-8, 8, (vocab, width))
    packed = ((codes[:, 0::2] & 0xF) | ((codes[:, 1::2] & 0xF) << 4)).astype(np.uint8)  # low nibble first
    scales = np.full((vocab, width // BLOCK), 0.5, np.float32)
    table = helper.make_tensor("table", TensorProto.INT4, [vocab, width], packed.tobytes(), raw=True)
    node = helper.make_node("GatherBlockQuantized", ["table", "ids", "scales"], ["rows"], domain="com.microsoft",
                            bits=4, block_size=BLOCK, gather_axis=0, quantize_axis=1)
    graph = helper.make_graph([node], "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, 1, width])],
                              [table, numpy_helper.from_array(scales, "scales")])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(tmp_path / "e.onnx"))
    assert weight_bytes_per_token(tmp_path / "e.onnx") == width // 2 + width // BLOCK * 4
    session = onnxruntime.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"ids": np.array([[7]])})[0][0, 0], codes[7] * 0.5)


def test_every_export_graph_counts_what_onnx_loads(demo_export):
    """Every initializer's name, shape and size as onnx reads them; in the decoder the embedding table, only read
    by Gather, counts one row."""
    for name in GRAPH_NAMES:
        path = demo_export / f"{name}.onnx"
        model = onnx.load(str(path))
        expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        initializers, nodes = read_graph(path)
        assert {t.name: (t.dims, t.nbytes) for t in initializers} == {
            n: (a.shape, a.nbytes) for n, a in expected.items()}, name
        assert len(nodes) == len(model.graph.node)
        gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
        other = {i for n in model.graph.node if n.op_type != "Gather" for i in n.input}
        tables = [n for n in expected if n in gathered - other and expected[n].ndim > 1]
        assert (name == "decoder") == bool(tables), (name, tables)  # the decoder's embedding, nowhere else
        whole = sum(a.nbytes for n, a in expected.items() if n not in tables)
        assert weight_bytes_per_token(path) == whole + sum(expected[n].nbytes // expected[n].shape[0] for n in tables)


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    path = tmp_path / "decoder.onnx"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        weight_bytes_per_token(path)
