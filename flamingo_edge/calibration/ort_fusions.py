"""Fusions for the ONNX Runtime weight-only target: exported subgraphs replaced by ONNX Runtime's fused operators.

A 4-bit decode step reads a quarter of the fp32 weights, so what the graph does between its MatMulNBits weighs four
times as much in the step; on a 2-core CPU each small node costs microseconds. The graphs of the `MatMulNBits`
encoding already need ONNX Runtime (its com.microsoft domain), so they may use its other fused operators too. The
fp32 export and the TensorRT encodings keep standard ONNX (graph contract v2); the fused graph has the same inputs,
outputs and numbers.

- `fuse_rotary`: each rotary embedding that `models.layers.apply_rotary` wrote, x·cos + swap_halves(x)·signed_sin with
  cos and sin computed in the graph from the positions (`rotary_cos_sin`), becomes one com.microsoft
  `RotaryEmbedding` reading the positions and cos/sin tables over the model's positions: 5 nodes per query or key
  (and the graph's cos/sin subgraph) become 1. 100m preset, int4, 2-core CPU: the decode step takes ~0.1-0.5 ms less
  out of ~4.6 ms (benchmarks/README.md).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

MICROSOFT = "com.microsoft"


class _Graph:
    """Producers and constant values of one ONNX graph, for matching exported patterns."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def node(self, name: str, op_type: str):
        """The node producing `name` if it is an `op_type`, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

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
    prune(model)
    if not any(o.domain == MICROSOFT for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))
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
