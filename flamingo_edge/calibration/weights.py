"""Weight-only block quantization of the language model: 4- or 8-bit weights, float activations.

What is quantized: every `MatMul` whose second input is a 2-D float initializer `W` [K, N] (`y = x @ W`: the
attention and MLP projections, the gated blocks' projections, the cross-attention K/V projections in `xattn_kv`, and
the LM head unless it is kept), and on request the token embedding tables (`Gather` of the token ids). Norms,
softmax and gates stay float.

How: symmetric, per block of `block_size` consecutive input rows of one output column. A block's scale is
max|W| / qmax and its weights are round(W / scale), clipped to [-qmax, qmax] (qmax = 7 for 4 bits, 127 for 8).
Symmetric because TensorRT's block-quantized weights take no zero point; both encodings below then hold exactly the
same integers and scales.

- `rtn`: round to nearest, no data.
- `gptq` (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers"): quantizes the input rows one at a time and spreads each row's rounding error over the rows not yet
  quantized, weighted by the inverse Hessian H = Xᵀ X of the layer's inputs X. X comes from the feeds
  `flamingo-edge calibrate` recorded for this export, run through the fp32 graph.

Encodings (recorded in export.json as `encoding`):
- `MatMulNBits` (ONNX Runtime, com.microsoft; CPU and CUDA): B packed [N, K/block, block·bits/8] uint8 (two 4-bit
  values per byte, the lower index in the low nibble), scales [N·K/block] float32, no zero points (the operator's
  default zero point, 2^(bits-1), is the symmetric one). `accuracy_level` 4 lets the CPU kernels quantize the
  activations to int8 per block and use the VNNI dot products; 0 computes in float32.
- `DequantizeLinear` (TensorRT whose ONNX parser imports opset 21): int4 as an INT4 initializer [K, N] with scales
  [K/block, N] and `DequantizeLinear(axis=0, block_size)` feeding the MatMul, the weight-only form TensorRT
  recognises (and NVIDIA ModelOpt writes); int8 as an INT8 initializer with one scale per output column
  (`axis=1`, no blocks: TensorRT's block quantization is for 4-bit weights). ONNX Runtime runs both, so their
  accuracy is measured here.
- `TRT_INT4DequantizeLinear` (TensorRT 10.0-10.15, JetPack 6: parsers that stop at opset 20): the same int4 weights
  through TensorRT's own operator in the `trt` domain, which its ONNX parser has imported since 10.0; the graph keeps
  its opset. Only TensorRT runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flamingo_edge.errors import CalibrationError, UsageError

logger = logging.getLogger(__name__)

BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes powers of two from 16
WEIGHT_METHODS = ("rtn", "gptq")
ENCODINGS = ("MatMulNBits", "DequantizeLinear", "TRT_INT4DequantizeLinear")
DQ_OPSET = 21  # INT4 and block-wise DequantizeLinear
TRT_DOMAIN = "trt"
# The first TensorRT releases whose ONNX parser imports opset 21 that flamingo-edge knows of (engines/operators.py
# lists 10.3 at opset 20 and 10.16 at 24); older 10.x get TRT_INT4DequantizeLinear.
TRT_OPSET_21 = (10, 16)


def encoding_for(target: str, bits: int, tensorrt_version: str) -> str:
    """The encoding of weight-only graphs for `target` ("onnxruntime" or "tensorrt").

    Raises:
        UsageError: TensorRT before 10 (JetPack 5), which has no weight-only quantization.
    """
    from flamingo_edge.trt_compat import has_weight_only, version_tuple

    if target == "onnxruntime":
        return "MatMulNBits"
    if not has_weight_only(tensorrt_version):
        raise UsageError(f"TensorRT {tensorrt_version} (JetPack 5) has no INT4 and no weight-only quantization (both "
                         "came with TensorRT 10): quantize --precision int8 (Q/DQ) or fp16 for it, and plan with int8")
    if bits == 4 and version_tuple(tensorrt_version) < TRT_OPSET_21:
        return "TRT_INT4DequantizeLinear"
    return "DequantizeLinear"
GPTQ_DAMPING = 0.01  # of the Hessian's mean diagonal, added to its diagonal (the paper's default)
HESSIAN_BUDGET_BYTES = 2 << 30  # Hessians accumulated at once; more MatMul inputs take more passes over the samples


@dataclass(frozen=True)
class BlockQuantized:
    """One weight [K, N] as integers and per-block scales."""

    q: np.ndarray  # int8 [K, N], in [-qmax, qmax]
    scales: np.ndarray  # float32 [ceil(K / block_size), N]
    bits: int
    block_size: int

    def dequantize(self) -> np.ndarray:
        per_row = np.repeat(self.scales, self.block_size, axis=0)[: self.q.shape[0]]
        return self.q.astype(np.float32) * per_row


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _scales(blocks_amax: np.ndarray, bits: int) -> np.ndarray:
    scales = (blocks_amax / qmax(bits)).astype(np.float32)
    scales[scales == 0] = 1.0  # an all-zero block: any scale holds it exactly
    return scales


def rtn(weight: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """Round to nearest, symmetric, per block of `block_size` input rows."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight
    grouped = padded.reshape(blocks, block_size, n)
    scales = _scales(np.abs(grouped).max(axis=1), bits)
    q = np.clip(np.rint(grouped / scales[:, None, :]), -qmax(bits), qmax(bits)).astype(np.int8)
    return BlockQuantized(q.reshape(-1, n)[:k], scales, bits, block_size)


def gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, *,
         damping: float = GPTQ_DAMPING) -> BlockQuantized:
    """GPTQ with block-wise symmetric scales, each block's scale taken from its error-updated weights.

    Args:
        weight: [K, N], `y = x @ weight`.
        hessian: [K, K], Xᵀ X over the calibration inputs (any positive scale).
    """
    k, n = weight.shape
    w = weight.astype(np.float32).T.copy()  # [N, K]: the rows GPTQ walks are our input rows (its columns)
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damping * np.mean(np.diag(h))
    try:
        h_inv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)  # upper Cholesky factor of H⁻¹
    except np.linalg.LinAlgError:
        raise CalibrationError("GPTQ: the calibration inputs give a singular Hessian; record more calibration "
                               "data or use --method rtn") from None
    top = qmax(bits)
    blocks = -(-k // block_size)
    scales = np.ones((blocks, n), np.float32)
    q = np.zeros((n, k), np.int8)
    # Columns whose error updates wait for one matrix product at the end of the block (the paper's lazy batch
    # updates, exact): one quantization block, so the per-column work is N x block and the rest is BLAS.
    lazy = block_size
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        chunk = w[:, start:stop].copy()
        errors = np.zeros_like(chunk)
        inverse = h_inv[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % block_size == 0:
                group = chunk[:, i: i + block_size]
                scales[column // block_size] = _scales(np.abs(group).max(axis=1), bits)
            scale = scales[column // block_size]
            values = np.clip(np.rint(chunk[:, i] / scale), -top, top)
            q[:, column] = values
            error = (chunk[:, i] - values * scale) / inverse[i, i]
            chunk[:, i:] -= np.outer(error, inverse[i, i:])
            errors[:, i] = error
        w[:, stop:] -= errors @ h_inv[start:stop, stop:]
    return BlockQuantized(q.T.copy(), scales, bits, block_size)


@dataclass(frozen=True)
class Target:
    """A MatMul to quantize: its node, the weight initializer's name and the name of its activation input."""

    node_index: int
    weight: str
    activation: str
    lm_head: bool


def _float_matrices(model) -> set[str]:
    """The names of the 2-D float32 initializers: the weights quantize may take."""
    from onnx import TensorProto

    return {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2}


def find_matmuls(model, *, lm_head: bool = True) -> list[Target]:
    """The MatMuls with a 2-D float initializer as second input; the LM head (a MatMul writing a graph output)
    only if `lm_head`."""
    floats = _float_matrices(model)
    outputs = {o.name for o in model.graph.output}
    found = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in floats:
            continue
        head = node.output[0] in outputs
        if head and not lm_head:
            continue
        found.append(Target(index, node.input[1], node.input[0], head))
    return found


def fuse_shared_inputs(model, targets: list[Target]) -> int:
    """Merge the MatMuls that read the same activation (q/k/v, an MLP's gate/up) into one MatMul on the weights
    side by side, followed by a Split (in place). A decode step then runs one kernel where it ran two or three; the
    products are the same, column for column (blocks run along the input, so a column's integers and scales do not
    depend on its neighbours). Returns how many MatMuls were merged away."""
    from onnx import helper, numpy_helper

    groups: dict[str, list[Target]] = {}
    for target in targets:
        if not target.lm_head:
            groups.setdefault(target.activation, []).append(target)
    initializers = {i.name: i for i in model.graph.initializer}
    merged, replacements, dropped = 0, {}, set()
    for activation, group in groups.items():
        if len(group) < 2:
            continue
        weights = [numpy_helper.to_array(initializers[t.weight]) for t in group]
        if len({w.shape[0] for w in weights}) != 1:
            continue
        nodes = [model.graph.node[t.node_index] for t in group]
        name = f"{nodes[0].name}_merged"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.concatenate(weights, axis=1), f"{group[0].weight}_merged"),
            numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{name}_sizes")])
        replacements[min(t.node_index for t in group)] = [
            helper.make_node("MatMul", [activation, f"{group[0].weight}_merged"], [f"{name}_out"], name=name),
            helper.make_node("Split", [f"{name}_out", f"{name}_sizes"], [n.output[0] for n in nodes],
                             name=f"{name}_split", axis=-1)]
        dropped |= {t.node_index for t in group}
        merged += len(group) - 1
    if not merged:
        return 0
    kept = []
    for index, node in enumerate(model.graph.node):
        kept += replacements.get(index, [])
        if index not in dropped:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    return merged


def find_embeddings(model, *, token_input: str = "input_ids", depth: int = 4) -> list[tuple[int, str]]:
    """(node index, table name) of the Gathers that look token ids up in a 2-D float initializer: the indices come
    from `token_input` through at most `depth` index-arithmetic nodes (IDEFICS' decoupled embedding subtracts and
    clamps the ids for its second table). Position tables and shape arithmetic are not reached."""
    tables = _float_matrices(model)
    reached, frontier = {token_input}, {token_input}
    for _ in range(depth):
        frontier = {out for node in model.graph.node if node.op_type != "Gather"
                    and any(name in frontier for name in node.input) for out in node.output} - reached
        reached |= frontier
    return [(index, node.input[0]) for index, node in enumerate(model.graph.node)
            if node.op_type == "Gather" and node.input[0] in tables and node.input[1] in reached]


def encode_embedding(model, node_index: int, table: str, rows: BlockQuantized, encoding: str, *,
                     per_row: bool = False) -> None:
    """Replace the Gather at `node_index` (in place) by a lookup in the quantized table; `rows` holds the table
    transposed ([D, V]: blocks run along each row's D values)."""
    from onnx import helper, numpy_helper

    node = model.graph.node[node_index]
    q, scales = rows.q.T, np.ascontiguousarray(rows.scales.T)  # [V, D], [V, D / block]
    name = f"{table}_Q{rows.bits}"
    if encoding == "MatMulNBits":  # ONNX Runtime: GatherBlockQuantized (com.microsoft)
        if rows.bits == 4:
            data = _int_initializer(name, q, 4)
        else:  # uint8 with the operator's default zero point, 128
            data = numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), name)
        model.graph.initializer.extend([data, numpy_helper.from_array(scales, f"{table}_scales")])
        model.graph.node.insert(node_index, helper.make_node(
            "GatherBlockQuantized", [name, node.input[1], f"{table}_scales"], list(node.output),
            name=f"{node.name}_Q{rows.bits}", domain="com.microsoft", bits=rows.bits, block_size=rows.block_size,
            gather_axis=0, quantize_axis=1))
        model.graph.node.remove(node)
        return
    attributes = dict(axis=0) if per_row else dict(axis=1, block_size=rows.block_size)
    node.input[0] = _insert_dequantize(model, node_index, table, q, rows.bits, scales[:, 0] if per_row else scales,
                                       encoding, f"{node.name}_DQ", attributes)


def collect_hessians(model, widths: dict[str, int], samples: Callable[[], Iterable[Mapping]], *, name: str,
                     budget_bytes: int = HESSIAN_BUDGET_BYTES,
                     on_pass: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Xᵀ X (float64, [K, K]) of each activation named in `widths` (name -> K) over the calibration feeds.

    The fp32 graph `model` (named `name` in errors) runs on ONNX Runtime with those activations as extra outputs.
    MatMuls that share an input (q/k/v, gate/up) share one Hessian. When the Hessians do not fit in `budget_bytes`,
    they are gathered in several passes over the samples.
    """
    import onnx
    import onnxruntime as ort

    groups, current, size = [], [], 0
    for activation, width in widths.items():
        need = width * width * 8
        if current and size + need > budget_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(activation)
        size += need
    if current:
        groups.append(current)
    hessians: dict[str, np.ndarray] = {}
    graph_outputs = {o.name for o in model.graph.output}
    for number, names in enumerate(groups, 1):
        if on_pass:
            on_pass(number, len(groups))
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for activation in names:
            if activation not in graph_outputs:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(activation, onnx.TensorProto.FLOAT,
                                                                             None))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        inputs = {i.name for i in session.get_inputs()}
        sums = {activation: np.zeros((widths[activation],) * 2, np.float64) for activation in names}
        seen = 0
        for feed in samples():
            values = session.run(names, {k: v for k, v in feed.items() if k in inputs})
            for activation, value in zip(names, values):
                x = value.reshape(-1, widths[activation]).astype(np.float64)
                sums[activation] += x.T @ x
            seen += 1
        if seen == 0:
            raise CalibrationError(f"{name}: the calibration folder has no samples for this graph")
        hessians.update(sums)
        del session
    return hessians


def pack_4bit(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis (even length), the lower index in the low nibble."""
    nibbles = (values.astype(np.int16) & 0x0F).astype(np.uint8)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_tensors(bq: BlockQuantized) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B [N, blocks, block·bits/8] uint8 and scales [N·blocks] float32 for `bq`."""
    k, n = bq.q.shape
    blocks = bq.scales.shape[0]
    unsigned = np.full((blocks * bq.block_size, n), 2 ** (bq.bits - 1), np.uint8)  # padding rows hold zero
    unsigned[:k] = (bq.q.astype(np.int16) + 2 ** (bq.bits - 1)).astype(np.uint8)
    per_column = unsigned.T.reshape(n, blocks, bq.block_size)
    packed = pack_4bit(per_column) if bq.bits == 4 else per_column
    return np.ascontiguousarray(packed), np.ascontiguousarray(bq.scales.T).reshape(-1)


def _int_initializer(name: str, q: np.ndarray, bits: int):
    from onnx import TensorProto, helper

    if bits == 8:
        return helper.make_tensor(name, TensorProto.INT8, q.shape, q.astype(np.int8).tobytes(), raw=True)
    flat = q.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    return helper.make_tensor(name, TensorProto.INT4, q.shape, pack_4bit(flat).tobytes(), raw=True)


def _insert_dequantize(model, index: int, weight: str, q: np.ndarray, bits: int, scales: np.ndarray, encoding: str,
                       node_name: str, attributes: dict) -> str:
    """Add the integers `q` and their `scales` as initializers named after `weight`, and insert before node `index`
    the `encoding` node (DequantizeLinear, or TensorRT's TRT_INT4DequantizeLinear) that turns them back into float;
    returns its output's name."""
    from onnx import helper, numpy_helper

    model.graph.initializer.extend([_int_initializer(f"{weight}_Q{bits}", q, bits),
                                    numpy_helper.from_array(np.ascontiguousarray(scales), f"{weight}_scale")])
    model.graph.node.insert(index, helper.make_node(
        encoding, [f"{weight}_Q{bits}", f"{weight}_scale"], [f"{weight}_DQ"], name=node_name,
        domain=TRT_DOMAIN if encoding.startswith("TRT_") else "", **attributes))
    return f"{weight}_DQ"


def encode(model, target: Target, bq: BlockQuantized, encoding: str, accuracy_level: int, *,
           per_column: bool = False) -> None:
    """Replace the target MatMul in `model` (in place) by the encoding of `bq` (`per_column`: DequantizeLinear
    with one scale per output column, axis 1, for a `bq` of one block)."""
    from onnx import helper, numpy_helper

    node = model.graph.node[target.node_index]
    base = target.weight
    k, n = bq.q.shape
    if encoding == "MatMulNBits":
        packed, scales = matmulnbits_tensors(bq)
        model.graph.initializer.extend([numpy_helper.from_array(packed, f"{base}_Q{bq.bits}"),
                                        numpy_helper.from_array(scales, f"{base}_scales")])
        replacement = helper.make_node(
            "MatMulNBits", [node.input[0], f"{base}_Q{bq.bits}", f"{base}_scales"], list(node.output),
            name=f"{node.name}_Q{bq.bits}", domain="com.microsoft", K=k, N=n, bits=bq.bits,
            block_size=bq.block_size, accuracy_level=accuracy_level)
        model.graph.node.insert(target.node_index, replacement)
        model.graph.node.remove(node)
    elif encoding in ("DequantizeLinear", "TRT_INT4DequantizeLinear"):
        attributes = dict(axis=1) if per_column else dict(axis=0, block_size=bq.block_size)
        node.input[1] = _insert_dequantize(model, target.node_index, base, bq.q, bq.bits,
                                           bq.scales[0] if per_column else bq.scales, encoding, f"{node.name}_DQ",
                                           attributes)
    else:
        raise UsageError(f"unknown weight encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


def fitting_block(block_size: int, inputs: int) -> int:
    """`block_size`, or for a matrix with fewer inputs the largest power of two (from 16) that they fill, so a
    narrow model's blocks are not mostly padding."""
    return block_size if inputs >= block_size else max(BLOCK_SIZES[0], 1 << (inputs.bit_length() - 1))


def quantize_graph(source: Path, *, bits: int, block_size: int, method: str, encoding: str,
                   lm_head: bool = True, embeddings: bool = False, accuracy_level: int = 4,
                   samples: Callable[[], Iterable[Mapping]] | None = None,
                   on_weight: Callable[[int, int], None] | None = None,
                   on_pass: Callable[[int, int], None] | None = None, merge: bool = True,
                   max_positions: int | None = None, in_place_attention: bool = False):
    """The graph at `source` with its MatMul weights quantized (an onnx.ModelProto) and a summary dict.

    Args:
        embeddings: quantize the token embedding tables too (round to nearest, blocks along each row; per row for
            int8 weights on TensorRT), read by GatherBlockQuantized on ONNX Runtime and DequantizeLinear → Gather on
            TensorRT.
        samples: a callable returning the calibration feeds of this graph (gptq only; called once per pass).
        on_weight: called with (done, total) as weights are quantized (progress).
        on_pass: gptq: called with (pass, passes) as the calibration feeds are run for the Hessians.
        merge: first merge the MatMuls that share an input (fuse_shared_inputs).
        max_positions: MatMulNBits (ONNX Runtime): fuse the rotary embeddings into RotaryEmbedding with tables of
            this many positions (ort_fusions.fuse_rotary); None leaves them as exported.
        in_place_attention: MatMulNBits, with `max_positions`: also replace the self-attention over the cache with
            GroupQueryAttention writing the cache buffers in place, and the cross-attention over the images with
            MultiHeadAttention (ort_fusions.fuse_attention, fuse_cross_attention; fp32 float parts).
    """
    import onnx

    if block_size not in BLOCK_SIZES:
        raise UsageError(f"block size {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    per_column = encoding == "DequantizeLinear" and bits == 8  # TensorRT: int8 weights take per-channel scales
    if method not in WEIGHT_METHODS:
        raise UsageError(f"unknown weight method {method!r}; choose one of {', '.join(WEIGHT_METHODS)}")
    model = onnx.load(str(source))
    hessians = {}
    if method == "gptq":  # on the graph as exported, before anything below changes it
        if samples is None:
            raise UsageError("gptq needs calibration feeds (--calibration CALIB from flamingo-edge calibrate)")
        weights = {i.name: i for i in model.graph.initializer}
        widths = {t.activation: weights[t.weight].dims[0] for t in find_matmuls(model, lm_head=lm_head)}
        hessians = collect_hessians(model, widths, samples, name=source.name, on_pass=on_pass)
    if encoding == "DequantizeLinear" and bits == 4:
        model = _to_opset(model, DQ_OPSET)  # before the quantized nodes, which only opset 21 knows
    merged = fuse_shared_inputs(model, find_matmuls(model, lm_head=lm_head)) if merge else 0
    targets = find_matmuls(model, lm_head=lm_head)
    initializers = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    before = after = 0
    # last node first, so that inserting a node does not move the indices still to come
    for done, target in enumerate(sorted(targets, key=lambda t: -t.node_index), 1):
        weight = onnx.numpy_helper.to_array(initializers[target.weight]).astype(np.float32)
        block = weight.shape[0] if per_column else fitting_block(block_size, weight.shape[0])
        if method == "gptq":
            bq = gptq(weight, hessians[target.activation], bits, block)
        else:
            bq = rtn(weight, bits, block)
        encode(model, target, bq, encoding, accuracy_level, per_column=per_column)
        before += weight.nbytes
        after += bq.q.size * bits // 8 + bq.scales.nbytes
        if uses[target.weight] == 1:
            model.graph.initializer.remove(initializers[target.weight])
        if on_weight:
            on_weight(done, len(targets))
    tables = find_embeddings(model) if embeddings else []
    for index, table in sorted(tables, reverse=True):
        values = onnx.numpy_helper.to_array(initializers[table]).astype(np.float32)
        rows = rtn(np.ascontiguousarray(values.T), bits,
                   values.shape[1] if per_column else fitting_block(block_size, values.shape[1]))
        encode_embedding(model, index, table, rows, encoding, per_row=per_column)
        before += values.nbytes
        after += rows.q.size * bits // 8 + rows.scales.nbytes
        if uses[table] == 1:
            model.graph.initializer.remove(initializers[table])
    rotary = attention = cross = 0
    if encoding == "MatMulNBits" and max_positions:
        from flamingo_edge.calibration.ort_fusions import fuse_attention, fuse_cross_attention, fuse_rotary

        rotary = fuse_rotary(model, max_positions)
        attention = fuse_attention(model) if rotary and in_place_attention else 0
        cross = fuse_cross_attention(model) if in_place_attention else 0
    domain = {"MatMulNBits": "com.microsoft", "TRT_INT4DequantizeLinear": TRT_DOMAIN}.get(encoding)
    if domain and not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    summary = {"weights": len(targets), "merged": merged, "lm_head": any(t.lm_head for t in targets),
               "embeddings": len(tables),
               "encoding": encoding,
               "block_size": "per-channel" if per_column else block_size,
               "float_bytes": before, "quantized_bytes": after, "fused_rotary": rotary,
               "fused_attention": attention, "fused_cross_attention": cross}
    logger.info("%s: %d weights, %.1f MB -> %.1f MB", source.name, len(targets), before / 1e6, after / 1e6)
    return model, summary


def _to_opset(model, opset: int):
    """The model at `opset` for the default domain (DequantizeLinear with INT4 and block_size needs 21)."""
    from onnx import version_converter

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= opset:
        return model
    return version_converter.convert_version(model, opset)
