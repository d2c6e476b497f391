"""What an ONNX graph's weights take as stored, read from the file's protobuf fields without the `onnx` package (the
base install on a device has none) and without reading the weights themselves (the file is memory-mapped and only
the fields before each tensor's data are touched).

A tensor's size is its element count times its type's bits: packed 4-bit weights (MatMulNBits' uint8 blocks,
INT4/UINT4 DequantizeLinear initializers) count half a byte per weight, their scales and zero points what they are.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flamingo_edge.errors import ExportError

# TensorProto.DataType -> bits per element (onnx.proto); STRING (8) has no fixed size and is not a weight.
_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
         16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}
# Field numbers of onnx.proto: ModelProto.graph; GraphProto.node, .initializer; NodeProto.input, .op_type;
# TensorProto.dims, .data_type, .name.
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INITIALIZER = 7, 1, 5
_NODE_INPUT, _NODE_OP_TYPE = 1, 4
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME = 1, 2, 8
# (op_type, input index) of the tables a token reads one row of: an embedding's Gather, and ONNX Runtime's
# GatherBlockQuantized (quantized data, scales, zero points), and the cos/sin tables of RotaryEmbedding (one row per
# position).
_ROW_LOOKUPS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2), ("GatherBlockQuantized", 3),
                ("RotaryEmbedding", 2), ("RotaryEmbedding", 3)}


@dataclass(frozen=True)
class Initializer:
    name: str
    dims: tuple[int, ...]
    bits: int  # per element, as stored

    @property
    def nbytes(self) -> int:
        return math.ceil(math.prod(self.dims) * self.bits / 8)


def _varint(buffer, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            return value, position


def _fields(buffer, start: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """(field number, wire type, value) of each field of the message in buffer[start:end]; a length-delimited
    field's value is its (offset, length), not its bytes."""
    position = start
    while position < end:
        key, position = _varint(buffer, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(buffer, position)
        elif wire == 2:
            length, position = _varint(buffer, position)
            value, position = (position, length), position + length
        elif wire in (1, 5):  # fixed 64 / 32 bits
            value, position = 0, position + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} at byte {position}")
        yield number, wire, value


def _initializer(buffer, start: int, length: int) -> Initializer:
    dims, data_type, name = [], 0, ""
    for number, wire, value in _fields(buffer, start, start + length):
        if number == _TENSOR_DIMS and wire == 0:
            dims.append(value)
        elif number == _TENSOR_DIMS:  # packed
            offset, size = value
            position = offset
            while position < offset + size:
                dim, position = _varint(buffer, position)
                dims.append(dim)
        elif number == _TENSOR_DATA_TYPE:
            data_type = value
        elif number == _TENSOR_NAME:
            name = bytes(buffer[value[0]:value[0] + value[1]]).decode()
    return Initializer(name, tuple(dims), _BITS.get(data_type, 0))


def _node(buffer, start: int, length: int) -> tuple[str, list[str]]:
    op_type, inputs = "", []
    for number, _, value in _fields(buffer, start, start + length):
        if number in (_NODE_INPUT, _NODE_OP_TYPE):
            text = bytes(buffer[value[0]:value[0] + value[1]]).decode()
            if number == _NODE_OP_TYPE:
                op_type = text
            else:
                inputs.append(text)
    return op_type, inputs


def read_graph(path: str | Path) -> tuple[list[Initializer], list[tuple[str, list[str]]]]:
    """The initializers and the (op_type, inputs) of every node of the main graph of an ONNX file.

    Raises:
        ExportError: the file is not an ONNX model.
    """
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            initializers, nodes = [], []
            for number, wire, value in _fields(buffer, 0, len(buffer)):
                if number != _MODEL_GRAPH or wire != 2:
                    continue
                for field, kind, part in _fields(buffer, value[0], value[0] + value[1]):
                    if field == _GRAPH_INITIALIZER and kind == 2:
                        initializers.append(_initializer(buffer, *part))
                    elif field == _GRAPH_NODE and kind == 2:
                        nodes.append(_node(buffer, *part))
            return initializers, nodes
    except (OSError, ValueError, IndexError, TypeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path}: not a readable ONNX model ({error}); re-run flamingo-edge export") from None


def weight_bytes_per_token(path: str | Path) -> int:
    """Bytes of weights one token's pass through the graph reads at least, as stored: every initializer whole,
    except a table only looked up by rows (an embedding's Gather, or GatherBlockQuantized's quantized table and its
    scales), of which a token reads one row."""
    initializers, nodes = read_graph(path)
    readers: dict[str, set[tuple[str, int]]] = {}
    for op_type, inputs in nodes:
        for index, name in enumerate(inputs):
            readers.setdefault(name, set()).add((op_type, index))
    total = 0
    for tensor in initializers:
        looked_up = readers.get(tensor.name, set()) <= _ROW_LOOKUPS and tensor.name in readers and len(tensor.dims) > 1
        total += tensor.nbytes // tensor.dims[0] if looked_up else tensor.nbytes
    return total
