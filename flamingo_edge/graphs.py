"""The graph contract: the one description of every exported graph's inputs and outputs.

Export, graph checks, engine profiles, runtime backends and tests all read this; nobody else spells a tensor name.
Plain Python + numpy (no torch), because the runtime on the device reads it too.

Dims are ints (fixed by the model) or names (dynamic axes, the same name = the same size within one graph):

    vision     pixel_values f32 [N, 3, H, W]                       -> image_features f32 [N, T, Dv]
    resampler  image_features f32 [N, F, T, Dv]                    -> visual_tokens f32 [N, L, Dv]
    xattn_kv   visual_tokens f32 [N, L, Dv]                        -> cross_key.{i}, cross_value.{i} f32 [N, Hx, L, Dh]
    decoder    input_ids i64 [B, S], attention_mask i64 [B, P+S],
               past_key.{l}, past_value.{l} f32 [B, H, P, Dh],
               cross_key.{i}, cross_value.{i} f32 [B, Hx, M*L, Dh],
               image_attention_mask i64 [B, S, M]                  -> logits f32 [B, S, V],
                                                                      new_key.{l}, new_value.{l} f32 [B, H, S, Dh]

A tiled vision tower (mllama) extends `vision` and `resampler` (a projector in its place) and keeps the rest:

    vision     pixel_values f32 [N, T, 3, S, S], aspect_ratio_ids i64 [N],
               aspect_ratio_mask i64 [N, T]                        -> image_features f32 [N, T, P, Dvo]
    resampler  image_features f32 [N, T, P, Dvo]                   -> visual_tokens f32 [N, T*P, D]
    xattn_kv   visual_tokens f32 [N, T*P, D]                       -> cross_key.{i}, cross_value.{i} [N, Hx, T*P, Dh]

and every tile is one image slot of the decoder: M counts tiles (T per image, padding tiles included) and L = P, so
`image_attention_mask` [B, S, M*T] says which tiles a token sees (mllama's cross_attention_mask) and an image's
cross K/V are T consecutive slots.

The decoder reads the past and returns only the new tokens' K/V (contract v2; v1 returned the whole past + new as
present_key.{l}, copied every step). The past's P slots may end in unused slots masked by attention_mask: a static KV
cache feeds its whole preallocated buffer, zero-copy, and writes each step's new K/V into it at the next slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flamingo_edge.config import FlamingoConfig

# Bumped whenever a name, dtype or dim of any graph changes; export.json records it and the runtime checks it.
CONTRACT_VERSION = 2  # 2: the decoder returns new_key/new_value [B, H, S, Dh] (1: present_* [B, H, P+S, Dh])

GRAPH_NAMES = ("vision", "resampler", "xattn_kv", "decoder")
DEFAULT_OPSET = 17  # the newest ONNX opset TensorRT 8.5 (JetPack 5) parses


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str  # numpy dtype name: "float32" | "int64"
    dims: tuple[str | int, ...]  # ints are fixed by the model, strings are dynamic axes

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def dynamic_axes(self) -> dict[int, str]:
        return {axis: dim for axis, dim in enumerate(self.dims) if isinstance(dim, str)}


@dataclass(frozen=True)
class GraphSpec:
    """The inputs and outputs of one graph, in order."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)


def format_dims(dims) -> str:
    return "[" + ", ".join(str(dim) for dim in dims) + "]"


def io_mismatches(kind: str, declared, expected) -> list[str]:
    """What a graph file declares (TensorSpecs; dims may be None where unknown) vs the contract, for its inputs or
    its outputs: missing and unexpected names, dtypes, ranks, and fixed dims that differ. Order is not compared."""
    by_name = {tensor.name: tensor for tensor in declared}
    names = {tensor.name for tensor in expected}
    problems = [f"{kind} {tensor.name!r} is missing" for tensor in expected if tensor.name not in by_name]
    problems += [f"unexpected {kind} {tensor.name!r}" for tensor in declared if tensor.name not in names]
    for want in expected:
        have = by_name.get(want.name)
        if have is None:
            continue
        if have.dtype != want.dtype:
            problems.append(f"{kind} {want.name!r} is {have.dtype}, expected {want.dtype}")
        if len(have.dims) != len(want.dims):
            problems.append(f"{kind} {want.name!r} has rank {len(have.dims)} {format_dims(have.dims)}, "
                            f"expected {len(want.dims)} {format_dims(want.dims)}")
        elif any(isinstance(w, int) and isinstance(h, int) and w != h for h, w in zip(have.dims, want.dims)):
            problems.append(f"{kind} {want.name!r} has shape {format_dims(have.dims)}, "
                            f"expected {format_dims(want.dims)}")
    return problems


def _indexed(prefix: str):
    def name(index: int) -> str:
        return f"{prefix}.{index}"

    name.__name__ = name.__qualname__ = prefix
    return name


# The contract's per-layer and per-block tensor names: past_key(3) == "past_key.3".
past_key, past_value = _indexed("past_key"), _indexed("past_value")  # per decoder layer
new_key, new_value = _indexed("new_key"), _indexed("new_value")  # per decoder layer: the new tokens' K/V
cross_key, cross_value = _indexed("cross_key"), _indexed("cross_value")  # per gated cross-attention block
# The in-place decoder (in_place_decoder): the whole cache buffers written where they lie, per decoder layer
present_key, present_value = _indexed("present_key"), _indexed("present_value")
SEQLENS_K, TOTAL_LENGTH = "seqlens_k", "total_sequence_length"


def _f32(name: str, *dims) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(dims))


def _i64(name: str, *dims) -> TensorSpec:
    return TensorSpec(name, "int64", tuple(dims))


def build_graphs(config: FlamingoConfig) -> dict[str, GraphSpec]:
    """The four graph specs of one model (tensor counts and fixed sizes come from its config)."""
    vision, text = config.vision, config.decoder
    latents = config.visual_tokens_per_image
    heads, head_dim = text.kv_head_count, text.head_dim  # the self-attention K/V's heads (grouped-query: fewer)
    cross_heads, cross_dim = text.cross_kv_head_count, text.cross_head_dim  # the cross K/V's heads
    blocks, layers = range(len(text.cross_layers)), range(text.self_attention_layers)
    cross_kv_per_image = [
        _f32(name(i), "N", cross_heads, latents, cross_dim) for i in blocks for name in (cross_key, cross_value)
    ]
    dv = config.visual_width
    return {
        **(_tiled_image_graphs(vision) if config.tiled else _image_graphs(vision, latents)),
        "xattn_kv": GraphSpec(
            "xattn_kv",
            inputs=(_f32("visual_tokens", "N", latents, dv),),
            outputs=tuple(cross_kv_per_image),
        ),
        "decoder": GraphSpec(
            "decoder",
            inputs=(
                _i64("input_ids", "B", "S"),
                _i64("attention_mask", "B", "P+S"),
                *(_f32(name(l), "B", heads, "P", head_dim) for l in layers for name in (past_key, past_value)),
                *(_f32(name(i), "B", cross_heads, "M*L", cross_dim) for i in blocks for name in (cross_key, cross_value)),
                _i64("image_attention_mask", "B", "S", "M"),
            ),
            outputs=(
                _f32("logits", "B", "S", text.total_vocab_size),
                *(_f32(name(l), "B", heads, "S", head_dim) for l in layers for name in (new_key, new_value)),
            ),
        ),
    }


def _image_graphs(vision, latents: int) -> dict[str, GraphSpec]:
    """`vision` and `resampler` of a CLIP tower and a Perceiver Resampler (or none)."""
    dv, tokens = vision.width, vision.num_tokens
    return {
        "vision": GraphSpec(
            "vision",
            inputs=(_f32("pixel_values", "N", vision.num_channels, vision.image_size, vision.image_size),),
            outputs=(_f32("image_features", "N", tokens, dv),),
        ),
        "resampler": GraphSpec(
            "resampler",
            inputs=(_f32("image_features", "N", "F", tokens, dv),),
            outputs=(_f32("visual_tokens", "N", latents, dv),),
        ),
    }


def _tiled_image_graphs(vision) -> dict[str, GraphSpec]:
    """`vision` and `resampler` of mllama's tiled tower and its projector."""
    tiles, patches, side = vision.max_num_tiles, vision.patches_per_tile, vision.image_size
    return {
        "vision": GraphSpec(
            "vision",
            inputs=(_f32("pixel_values", "N", tiles, vision.num_channels, side, side),
                    _i64("aspect_ratio_ids", "N"), _i64("aspect_ratio_mask", "N", tiles)),
            outputs=(_f32("image_features", "N", tiles, patches, vision.vision_output_dim),),
        ),
        "resampler": GraphSpec(
            "resampler",
            inputs=(_f32("image_features", "N", tiles, patches, vision.vision_output_dim),),
            outputs=(_f32("visual_tokens", "N", tiles * patches, vision.text_hidden_size),),
        ),
    }


def in_place_decoder(spec: GraphSpec) -> GraphSpec:
    """What a decoder graph that writes the new tokens' K/V into the cache buffers itself declares (ONNX Runtime's
    weight-only exports, `calibration/ort_fusions.fuse_attention`), for the same contract `spec`.

    The past inputs are the whole [B, H, C, Dh] buffers, `attention_mask` [B, C + S] marks the slots in use and then
    the new tokens (as a decode step's feed already does), and the new tokens go to slots T - S .. T - 1 of the
    buffers, T = `total_sequence_length`: the outputs `present_key.{l}` / `present_value.{l}` are the buffers
    themselves, bound to the same memory as the past. `seqlens_k` [B] int32 is T - 1 for every row. The ONNX
    Runtime session runs such a graph in place and returns what the contract names (runtime/onnxruntime_backend.py).
    """
    inputs = (*spec.inputs, TensorSpec(SEQLENS_K, "int32", ("B",)), TensorSpec(TOTAL_LENGTH, "int32", ()))
    outputs = [out for out in spec.outputs if not out.name.startswith(("new_key.", "new_value."))]
    for out in spec.outputs:
        if out.name.startswith("new_key."):
            layer = int(out.name.split(".")[1])
            batch, heads, _, head_dim = out.dims
            outputs += [TensorSpec(name(layer), out.dtype, (batch, heads, "P", head_dim))
                        for name in (present_key, present_value)]
    return GraphSpec(spec.name, inputs, tuple(outputs))


def resolve_dims(spec: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape of a tensor for the dynamic sizes in `sizes` (keys N, F, B, S, P, M, L)."""
    derived = {**sizes, "P+S": sizes.get("P", 0) + sizes.get("S", 0), "M*L": sizes.get("M", 0) * sizes.get("L", 0)}
    return tuple(dim if isinstance(dim, int) else derived[dim] for dim in spec.dims)


def example_feed(spec: GraphSpec, sizes: dict[str, int], *, rng: np.random.Generator, vocab_size: int,
                 max_aspect_ratio_id: int = 1) -> dict:
    """Random valid inputs for a graph: normal floats, token ids < vocab_size, 0/1 masks with real tokens last;
    (a tiled tower) aspect-ratio ids in 1..max_aspect_ratio_id and tile masks with the first tile real.

    Used to trace the export and to check graphs against PyTorch on fresh inputs.
    """
    feed = {}
    for tensor in spec.inputs:
        shape = resolve_dims(tensor, sizes)
        if tensor.name == "input_ids":
            feed[tensor.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif tensor.name == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            mask[1:, : shape[1] // 3] = 0  # left padding on every row but the first
            feed[tensor.name] = mask
        elif tensor.name == "image_attention_mask":
            feed[tensor.name] = rng.integers(0, 2, size=shape, dtype=np.int64)
        elif tensor.name == "aspect_ratio_ids":
            feed[tensor.name] = rng.integers(1, max_aspect_ratio_id + 1, size=shape, dtype=np.int64)
        elif tensor.name == "aspect_ratio_mask":  # [N, T]: the first k tiles real, k >= 1
            real = rng.integers(1, shape[1] + 1, size=(shape[0], 1))
            feed[tensor.name] = (np.arange(shape[1]) < real).astype(np.int64)
        else:
            feed[tensor.name] = rng.standard_normal(shape).astype(tensor.np_dtype)
    return feed
