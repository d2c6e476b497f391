"""Fusions for the ONNX Runtime weight-only target: exported subgraphs replaced by ONNX Runtime's fused operators.

A 4-bit decode step reads a quarter of the fp32 weights, so what the graph does between its MatMulNBits weighs four
times as much in the step; on a 2-core CPU each small node costs microseconds. The graphs of the `MatMulNBits`
encoding already need ONNX Runtime (its com.microsoft domain), so they may use its other fused operators too. The
fp32 export and the TensorRT encodings keep standard ONNX (graph contract v2); the fused graph has the same inputs,
outputs and numbers.

- `fuse_rotary`: each rotary embedding that `models.layers.apply_rotary` wrote, x·cos + swap_halves(x)·signed_sin with
  cos and sin computed in the graph from the positions (`rotary_cos_sin`), becomes one com.microsoft
  `RotaryEmbedding` reading the positions and cos/sin tables over the model's positions: 5 nodes per query or key
  (and the graph's cos/sin subgraph) become 1.
- `fuse_attention`: each layer's `attend_after_past` (with the reshapes and transposes around it) becomes one
  com.microsoft `GroupQueryAttention` that reads the cache buffers and writes the new tokens' K/V into them in place
  (`graphs.in_place_decoder`; the ONNX Runtime session binds the buffers as past and present at once).
- `fuse_cross_attention`: each gated cross-attention block's attention over its images' K/V becomes one com.microsoft
  `MultiHeadAttention` reading the fed `cross_key.{i}` / `cross_value.{i}` as they are.

100m preset, int4, 2-core CPU: the decoder goes from 642 nodes to 291 after ONNX Runtime's own fusions
(benchmarks/README.md has the decode figures).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

MICROSOFT = "com.microsoft"


class _Graph:
    """Producers, readers and constant values of one ONNX graph, for matching exported patterns."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.readers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def node(self, name: str, op_type: str):
        """The node producing `name` if it is an `op_type`, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def reader(self, name: str, op_type: str):
        """The one `op_type` node reading `name` (other readers, e.g. a Shape, are allowed), else None."""
        nodes = [node for node in self.readers.get(name, []) if node.op_type == op_type]
        return nodes[0] if len(nodes) == 1 else None

    def ints(self, name: str) -> list[int] | None:
        value = self.values.get(name)
        return None if value is None else [int(v) for v in np.ravel(value)]


def _angles(graph: _Graph, cos_sin: str):
    """(positions, inverse frequencies [R/2]) if `cos_sin` is `rotary_cos_sin`'s cos [B, 1, S, R]:
    Cos(Unsqueeze(Concat(F, F))) with F = Cast(Unsqueeze(positions)) · inverse frequencies; else None."""
    cos = graph.node(cos_sin, "Cos")
    unsqueeze = cos and graph.node(cos.input[0], "Unsqueeze")
    concat = unsqueeze and graph.node(unsqueeze.input[0], "Concat")
    if not concat or len(concat.input) != 2 or concat.input[0] != concat.input[1]:
        return None
    product = graph.node(concat.input[0], "Mul")
    cast = product and graph.node(product.input[0], "Cast")
    lifted = cast and graph.node(cast.input[0], "Unsqueeze")
    frequencies = product and graph.values.get(product.input[1])
    if not lifted or frequencies is None or frequencies.ndim != 1:
        return None
    return lifted.input[0], frequencies.astype(np.float32), product.output[0]


def _signed_sin(graph: _Graph, name: str, angles: str) -> bool:
    """Whether `name` is `rotary_cos_sin`'s signed sin of `angles`: Unsqueeze(Concat(Neg(Sin(F)), Sin(F)))."""
    unsqueeze = graph.node(name, "Unsqueeze")
    concat = unsqueeze and graph.node(unsqueeze.input[0], "Concat")
    if not concat or len(concat.input) != 2:
        return False
    neg, sin = graph.node(concat.input[0], "Neg"), graph.node(concat.input[1], "Sin")
    return bool(neg and sin and neg.input[0] == sin.output[0] and sin.input[0] == angles)


def _swapped_halves(graph: _Graph, name: str, x: str, half: int) -> bool:
    """Whether `name` is Concat(x[..., half:], x[..., :half]) on the last axis (apply_rotary's swap)."""
    concat = graph.node(name, "Concat")
    if not concat or len(concat.input) != 2:
        return False
    upper, lower = graph.node(concat.input[0], "Slice"), graph.node(concat.input[1], "Slice")
    if not upper or not lower or upper.input[0] != x or lower.input[0] != x:
        return False
    starts, ends = ([graph.ints(s.input[i]) for s in (upper, lower)] for i in (1, 2))
    axes = [graph.ints(s.input[3]) if len(s.input) > 3 else None for s in (upper, lower)]
    return starts[0] == [half] and ends[0] is not None and ends[0][0] >= 2 * half and starts[1] == [0] \
        and ends[1] == [half] and all(a == [-1] or a == [3] for a in axes)


def fuse_rotary(model, max_positions: int) -> int:
    """Replace each rotary embedding of the graph (in place) with com.microsoft RotaryEmbedding over cos/sin tables
    of `max_positions` rows; returns how many were replaced (0 for a model without rotary positions).

    The tables hold cos and sin of float32(position) · inverse frequency, the angles the exported graph computed per
    step. Positions come from the graph's own position computation, below `max_positions` (the Pipeline's context
    limit).
    """
    from onnx import helper, numpy_helper

    graph = _Graph(model)
    tables: dict[str, tuple[str, str]] = {}  # angles output -> (cos table, sin table)
    replaced = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        plain, turned = graph.node(node.input[0], "Mul"), graph.node(node.input[1], "Mul")
        found = plain and turned and _angles(graph, plain.input[1])
        if not found:
            continue
        positions, frequencies, angles = found
        x, half = plain.input[0], len(frequencies)
        if not _signed_sin(graph, turned.input[1], angles) or not _swapped_halves(graph, turned.input[0], x, half):
            continue
        if angles not in tables:
            grid = np.arange(max_positions, dtype=np.float32)[:, None] * frequencies[None]  # [positions, R/2]
            names = (f"rotary_cos_{len(tables)}", f"rotary_sin_{len(tables)}")
            model.graph.initializer.extend([numpy_helper.from_array(np.cos(grid), names[0]),
                                            numpy_helper.from_array(np.sin(grid), names[1])])
            tables[angles] = names
        replaced[index] = helper.make_node("RotaryEmbedding", [x, positions, *tables[angles]], list(node.output),
                                           name=f"{node.name}/RotaryEmbedding", domain=MICROSOFT, interleaved=0)
    if not replaced:
        return 0
    nodes = [replaced.get(index, node) for index, node in enumerate(model.graph.node)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _finish(model)
    logger.info("fused %d rotary embeddings into RotaryEmbedding", len(replaced))
    return len(replaced)


def prune(model) -> None:
    """Drop (in place) the nodes no graph output depends on, and the initializers no node reads."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    for init in [i for i in model.graph.initializer if i.name not in needed]:
        model.graph.initializer.remove(init)


def _heads_input(graph: _Graph, rotated: str):
    """(the [B, S, H·Dh] projection, the RotaryEmbedding node) behind a rotated [B, H, S, Dh] query or key:
    RotaryEmbedding(Transpose(Reshape(projection)))."""
    rotary = graph.node(rotated, "RotaryEmbedding")
    transpose = rotary and graph.node(rotary.input[0], "Transpose")
    reshape = transpose and graph.node(transpose.input[0], "Reshape")
    return (reshape.input[0], rotary) if reshape else None


def _self_attention(graph: _Graph, layer: int):
    """The names around one layer's `attend_after_past` in a graph whose rotary embeddings are fused: the query, key
    and value projections [B, S, H·Dh], the rotary inputs (positions, cos, sin), the score bias [B, 1, S, P+S], the
    scale, and the attention output [B, S, H·Dh] the output projection reads; None if the layer does not match."""
    from flamingo_edge.graphs import new_key, new_value, past_key, past_value

    scores = graph.reader(past_key(layer), "MatMul")  # (K q^T)
    values = graph.reader(past_value(layer), "MatMul")
    lifted = scores and graph.node(scores.input[1], "Transpose")
    scaled = lifted and graph.node(lifted.input[0], "Mul")
    # grouped-query attention: the rotated [B, H, S, Dh] query is regrouped to [B, Hkv, G*S, Dh] before the scale
    grouped = scaled and graph.node(scaled.input[0], "Reshape")
    query = scaled and _heads_input(graph, grouped.input[0] if grouped else scaled.input[0])
    key = _heads_input(graph, new_key(layer))
    value = graph.node(new_value(layer), "Transpose")
    value = value and graph.node(value.input[0], "Reshape")
    total = values and graph.reader(values.output[0], "Add")
    ungrouped = grouped and total and graph.reader(total.output[0], "Reshape")  # [B, Hkv, G*S, Dh] -> [B, H, S, Dh]
    back = total and graph.reader((ungrouped or total).output[0], "Transpose")
    merged = back and graph.reader(back.output[0], "Reshape")  # [B, S, H, Dh] -> [B, S, H·Dh]
    if not (query and key and value and merged) or query[1].input[1:] != key[1].input[1:]:
        return None
    scale = graph.values.get(scaled.input[1])
    # the score bias: Add(Concat(Transpose(past scores), new scores), bias) before the Softmax
    turned = graph.reader(scores.output[0], "Transpose")
    joined = turned and graph.reader(turned.output[0], "Concat")
    biased = joined and graph.reader(joined.output[0], "Add")
    if scale is None or scale.size != 1 or not biased or bool(grouped) != bool(ungrouped):
        return None
    bias, groups = biased.input[1], 1
    if grouped:  # the bias [B, 1, S, T] was tiled to the G*S rows: take it before, and G from the tiling
        tile = graph.node(bias, "Tile")
        repeats = tile and graph.values.get(tile.input[1])
        if repeats is None or repeats.size != 4 or list(repeats.ravel()[[0, 1, 3]]) != [1, 1, 1]:
            return None
        bias, groups = tile.input[0], int(repeats.ravel()[2])
    return dict(query=query[0], key=key[0], value=value.input[0], rotary=list(query[1].input[1:]),
                bias=bias, scale=float(scale.ravel()[0]), output=merged.output[0], groups=groups)


def fuse_attention(model) -> int:
    """Replace (in place) every self-attention layer's attention over the cache with ONNX Runtime's
    GroupQueryAttention reading and writing the cache buffers where they lie; returns the layers replaced, 0 when
    any layer does not match (e.g. ALiBi, partial rotary, q/k norms: the graph is then left as it was).

    The graph then takes the whole [B, H, C, Dh] buffers as the past and writes the new tokens' K/V into them
    (`graphs.in_place_decoder`): outputs `present_key.{l}` / `present_value.{l}`, inputs `seqlens_k` and
    `total_sequence_length`; the score bias of the exported graph (mask, causality) is cut to the T slots
    GroupQueryAttention reads. Run `fuse_rotary` first: the rotations move onto the [B, S, H·Dh] projections.
    """
    from onnx import TensorProto, helper, numpy_helper

    from flamingo_edge.graphs import SEQLENS_K, TOTAL_LENGTH, past_key, past_value, present_key, present_value

    graph = _Graph(model)
    layers = sum(1 for i in model.graph.input if i.name.startswith("past_key."))
    found = [_self_attention(graph, layer) for layer in range(layers)]
    if not layers or any(f is None for f in found) or len({(f["bias"], f["groups"]) for f in found}) != 1:
        return 0
    _, kv_heads, _, head_dim = _input_dims(model, past_key(0))
    heads = kv_heads * found[0]["groups"]  # query heads: G per K/V head
    if not heads or not head_dim or any(abs(f["scale"] - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5 for f in found):
        return 0
    bias = found[0]["bias"]  # [B, 1, S, P+S]: the past's P slots, then the S new tokens
    constants = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                 (("gqa_zero", [0]), ("gqa_one", [1]), ("gqa_two", [2]), ("gqa_end", [np.iinfo(np.int64).max]),
                  ("gqa_axis", [3]), ("gqa_flat", [1]))]
    model.graph.initializer.extend(constants)
    nodes = [  # T = total_sequence_length; the bias over slots 0..T-S-1 then the S new tokens: [B, 1, S, T]
        helper.make_node("Shape", ["input_ids"], ["gqa_ids_shape"]),
        helper.make_node("Slice", ["gqa_ids_shape", "gqa_one", "gqa_two"], ["gqa_new"]),
        helper.make_node("Cast", [TOTAL_LENGTH], ["gqa_total64"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["gqa_total64", "gqa_flat"], ["gqa_total"]),
        helper.make_node("Sub", ["gqa_total", "gqa_new"], ["gqa_used"]),
        helper.make_node("Neg", ["gqa_new"], ["gqa_minus_new"]),
        helper.make_node("Slice", [bias, "gqa_zero", "gqa_used", "gqa_axis"], ["gqa_bias_past"]),
        helper.make_node("Slice", [bias, "gqa_minus_new", "gqa_end", "gqa_axis"], ["gqa_bias_new"]),
        helper.make_node("Concat", ["gqa_bias_past", "gqa_bias_new"], ["gqa_bias"], axis=3),
    ]
    for layer, f in enumerate(found):
        # The rotations stay RotaryEmbedding nodes at the graph's positions (the count of real tokens): the
        # operator's own rotary (do_rotary with position_ids) did not give the exported graph's keys for a
        # left-padded prefill in our test, and it takes head sizes of 16k only.
        rotated = [f"gqa_query.{layer}", f"gqa_key.{layer}"]
        nodes += [helper.make_node("RotaryEmbedding", [f[part], *f["rotary"]], [out], domain=MICROSOFT,
                                   interleaved=0, num_heads=count)
                  for part, out, count in zip(("query", "key"), rotated, (heads, kv_heads))]
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [*rotated, f["value"], past_key(layer), past_value(layer), SEQLENS_K, TOTAL_LENGTH, "", "", "",
             "gqa_bias"],
            [f"{f['output']}_gqa", present_key(layer), present_value(layer)],
            name=f"gqa.{layer}", domain=MICROSOFT, num_heads=heads, kv_num_heads=kv_heads))
    model.graph.input.extend([helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["B"]),
                              helper.make_tensor_value_info(TOTAL_LENGTH, TensorProto.INT32, [])])
    outputs = [o for o in model.graph.output if not o.name.startswith(("new_key.", "new_value."))]
    for layer in range(layers):
        for name in (present_key, present_value):
            outputs.append(helper.make_tensor_value_info(name(layer), TensorProto.FLOAT,
                                                         ["B", kv_heads, "P", head_dim]))
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    _splice(model, nodes, {f["output"]: f"{f['output']}_gqa" for f in found})
    logger.info("fused %d self-attention layers into GroupQueryAttention over the cache in place", layers)
    return layers


def _input_dims(model, name: str) -> list[int]:
    """The fixed sizes of graph input `name` (0 for a dynamic axis)."""
    value = next(i for i in model.graph.input if i.name == name)
    return [dim.dim_value for dim in value.type.tensor_type.shape.dim]


def _splice(model, nodes: list, renamed: dict[str, str]) -> None:
    """Put `nodes` in the graph in place of the subgraphs they replace: the readers of each tensor of `renamed` read
    its replacement instead, the graph stays topologically sorted, and what no output needs any more goes."""
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    _insert_in_order(model, nodes)
    _finish(model)


def _finish(model) -> None:
    """Prune what no graph output needs, and declare the com.microsoft domain the fused operators come from."""
    from onnx import helper

    prune(model)
    if not any(o.domain == MICROSOFT for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))


def _insert_in_order(model, nodes: list) -> None:
    """Add `nodes` to the graph, keeping it topologically sorted."""
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node) + nodes, []
    while pending:
        waiting = []
        for node in pending:
            if all(name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"cannot order the graph: {waiting[0].name} waits for an input no node makes")
        pending = waiting
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _cross_attention(graph: _Graph, block: int):
    """The names around one gated cross-attention block's attention over its images' K/V: the query projection
    [B, S, Hx·Dh], the allowed-positions condition and its masked score, the scale, and the attention output
    [B, S, Hx·Dh]; None if the block does not match."""
    from flamingo_edge.graphs import cross_key, cross_value

    key_t = graph.reader(cross_key(block), "Transpose")
    scores = key_t and graph.reader(key_t.output[0], "MatMul")
    scaled = scores and graph.node(scores.input[0], "Mul")
    lifted = scaled and graph.node(scaled.input[0], "Transpose")
    split = lifted and graph.node(lifted.input[0], "Reshape")
    masked = scores and graph.reader(scores.output[0], "Where")
    softmax = masked and graph.reader(masked.output[0], "Softmax")
    values = softmax and graph.reader(softmax.output[0], "MatMul")
    back = values and graph.reader(values.output[0], "Transpose")
    merged = back and graph.reader(back.output[0], "Reshape")
    if not (split and merged) or scores.input[1] != key_t.output[0] or values.input[1] != cross_value(block) \
            or masked.input[1] != scores.output[0]:
        return None
    scale, fill = graph.values.get(scaled.input[1]), graph.values.get(masked.input[2])
    if scale is None or scale.size != 1 or fill is None or fill.size != 1:
        return None
    return dict(query=split.input[0], allowed=masked.input[0], fill=float(fill.ravel()[0]),
                scale=float(scale.ravel()[0]), output=merged.output[0])


def fuse_cross_attention(model) -> int:
    """Replace (in place) every gated cross-attention block's attention over its images' K/V with ONNX Runtime's
    MultiHeadAttention, reading `cross_key.{i}` / `cross_value.{i}` [B, Hx, M·L, Dh] as they are fed; returns the
    blocks replaced, 0 when any block does not match (the graph is then left as it was).

    The exported block sets a masked score to a constant (Where); the fused one adds that constant as an attention
    bias. Both give a masked image token a weight of exactly 0 wherever a token may see some image. A token that
    may see none (text before the first image) gets other weights, but the block's gate multiplies its output by 0
    in both graphs.
    """
    from onnx import helper, numpy_helper

    graph = _Graph(model)
    blocks = sum(1 for i in model.graph.input if i.name.startswith("cross_key."))
    found = [_cross_attention(graph, block) for block in range(blocks)]
    if not blocks or any(f is None for f in found):
        return 0
    heads = _input_dims(model, "cross_key.0")[1]
    nodes, biases = [], {}
    for block, f in enumerate(found):
        key = (f["allowed"], f["fill"])
        if key not in biases:  # one additive bias [B, 1, S, M·L] per mask and fill value, for every block
            name = f"mha_bias_{len(biases)}"
            model.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), f"{name}_open"),
                                            numpy_helper.from_array(np.array(f["fill"], np.float32), f"{name}_fill")])
            nodes.append(helper.make_node("Where", [f["allowed"], f"{name}_open", f"{name}_fill"], [name]))
            biases[key] = name
        nodes.append(helper.make_node(
            "MultiHeadAttention", [f["query"], f"cross_key.{block}", f"cross_value.{block}", "", "", biases[key]],
            [f"{f['output']}_mha"], name=f"mha.{block}", domain=MICROSOFT, num_heads=heads, scale=f["scale"]))
    _splice(model, nodes, {f["output"]: f"{f['output']}_mha" for f in found})
    logger.info("fused %d cross-attention blocks into MultiHeadAttention", blocks)
    return blocks
