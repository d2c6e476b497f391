"""Llama 3.2 Vision (mllama): the tiled ViT (the `vision` graph) and the multi-modal projector (the `resampler` graph).

Mirrors transformers 5.x `models/mllama/modeling_mllama.py` (`MllamaVisionModel`, and the `multi_modal_projector`
of `MllamaModel`). An image arrives as T = max_num_tiles tiles of image_size² pixels (padding tiles marked 0 in
`aspect_ratio_mask`); each tile is a CLIP-style patch sequence with a class token. The P tokens of every tile are
padded to P8, a multiple of 8, and all T*P8 tokens go through a local transformer (whose outputs at
`intermediate_layers_indices` are kept) and a global transformer of tanh-gated layers. The output is every token of
the global transformer, padding dropped, with the kept local outputs appended on the feature axis.

Written for export like vision.py: attention with MatMul/Softmax/Where (no einsum, no SDPA), the mask built with
comparisons and logical ops from `aspect_ratio_mask`, sizes from the settings as Python ints, no branch on values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from flamingo_edge.config import TiledVisionConfig
from flamingo_edge.errors import CheckpointError
from flamingo_edge.models.tensor_map import map_tensors
from flamingo_edge.models.layers import attend, merge_heads, split_heads
from flamingo_edge.models.vision import VisionMLP

def zero_rows(x: Tensor, rows: int) -> Tensor:
    """Zeros [N, T, rows, D] for x [N, T, R, D], rows <= R.

    Taken from x (a Slice and a Mul, shapes known statically) rather than `F.pad` or `expand(x.shape[0], ...)`:
    torch exports F.pad's pads through a reversed Slice that is not constant-folded, so the graph's Pad gets computed
    pads (a TensorRT hazard) and ONNX shape inference loses every later dimension; expand adds Shape arithmetic.
    x is finite here (patch embeddings, LayerNorm outputs), so x * 0 is exactly 0.
    """
    return x[:, :, :rows] * 0  # [N, T, rows, D]


def tile_attention_mask(aspect_ratio_mask: Tensor, patch_is_real: Tensor) -> Tensor:
    """Which keys each query may attend to: bool [N, 1, T*P8, T*P8] from aspect_ratio_mask i64 [N, T].

    Upstream (`_prepare_aspect_ratio_attention_mask`) adds finfo.min only where *both* query and key are padding (a
    padding tile, or the patches that pad a tile to P8): real tokens attend to every token, padding included, and
    padding attends to real tokens only. We keep that rule (the outputs depend on it) but write it as a bool for
    `where`, not an additive finfo.min, which overflows in fp16.
    """
    real = (aspect_ratio_mask[:, :, None] > 0) & patch_is_real  # [N, T, P8]
    real = real.flatten(1)  # [N, T*P8]
    return (real[:, :, None] | real[:, None, :])[:, None]  # [N, 1, T*P8, T*P8]


class MllamaVisionAttention(nn.Module):
    """Multi-head self-attention with bias-free projections and a key mask, `chunk` heads at a time: an image's
    scores over all of its tiles are [chunk, T*P8, T*P8] at most (`TiledVisionConfig.heads_per_chunk`; the 11B's
    would be 2.6 GB for its 16 heads at once, more than a Jetson can spare)."""

    def __init__(self, *, width: int, heads: int, chunk: int | None = None):
        super().__init__()
        self.heads, self.head_dim, self.width = heads, width // heads, width
        self.chunk = chunk or heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        # x [N, S, D], allowed bool [N, 1, S, S]
        q, k, v = (split_heads(proj(x), self.heads, self.head_dim) for proj in (self.q, self.k, self.v))  # [N,H,S,Dh]
        parts = [attend(q[:, h:h + self.chunk], k[:, h:h + self.chunk], v[:, h:h + self.chunk], self.head_dim, allowed)
                 for h in range(0, self.heads, self.chunk)]  # [N, chunk, S, Dh] each
        attended = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [N, H, S, Dh]
        return self.out(merge_heads(attended, self.width))  # [N, S, D]


class MllamaVisionBlock(nn.Module):
    """Pre-LN transformer block; in the global transformer both residual branches are scaled by tanh(gate)."""

    def __init__(self, *, settings: TiledVisionConfig, gated: bool):
        super().__init__()
        width = settings.hidden_size
        self.norm1 = nn.LayerNorm(width, eps=settings.norm_eps)
        self.attn = MllamaVisionAttention(width=width, heads=settings.attention_heads,
                                          chunk=settings.heads_per_chunk())
        self.norm2 = nn.LayerNorm(width, eps=settings.norm_eps)
        self.mlp = VisionMLP(width=width, hidden=settings.intermediate_size, act=settings.hidden_act)
        self.attn_gate = nn.Parameter(torch.zeros(1)) if gated else None
        self.mlp_gate = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        h = self.attn(self.norm1(x), allowed)
        x = x + (h if self.attn_gate is None else self.attn_gate.tanh() * h)
        h = self.mlp(self.norm2(x))
        return x + (h if self.mlp_gate is None else self.mlp_gate.tanh() * h)


class MllamaVision(nn.Module):
    """Tiled ViT: pixel_values [N, T, C, S, S], aspect_ratio_ids [N], aspect_ratio_mask [N, T]
    -> image_features [N, T, P, vision_output_dim]."""

    def __init__(self, *, settings: TiledVisionConfig):
        super().__init__()
        self.settings = settings
        s, width = settings, settings.hidden_size
        tiles, patches, ratios = s.max_num_tiles, s.patches_per_tile, s.max_aspect_ratio_id + 1
        self.patch_embed = nn.Conv2d(s.num_channels, width, kernel_size=s.patch_size, stride=s.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        # One vector per tile, chosen by aspect ratio, added before the class token (upstream pre_tile_...).
        self.pre_tile_embedding = nn.Embedding(ratios, tiles * width)
        self.pre_tile_gate = nn.Parameter(torch.zeros(1))
        # (1 - tanh g) * a position embedding shared by tiles + tanh g * one per (aspect ratio, tile, position).
        self.position_embedding = nn.Parameter(torch.zeros(patches, width))
        self.tile_position_embedding = nn.Embedding(ratios, tiles * patches * width)
        self.position_gate = nn.Parameter(torch.zeros(1))
        self.post_tile_embedding = nn.Embedding(ratios, tiles * width)
        self.post_tile_gate = nn.Parameter(torch.zeros(1))
        # Upstream builds these two with nn.LayerNorm's default eps (1e-5), not config.norm_eps.
        self.pre_norm = nn.LayerNorm(width)
        self.post_norm = nn.LayerNorm(width)
        self.local_blocks = nn.ModuleList(
            MllamaVisionBlock(settings=s, gated=False) for _ in range(s.num_hidden_layers))
        self.global_blocks = nn.ModuleList(
            MllamaVisionBlock(settings=s, gated=True) for _ in range(s.num_global_layers))
        # A constant: which of the P8 slots of a tile hold a token (the rest pad the tile to a multiple of 8).
        self.register_buffer("patch_is_real", torch.arange(s.padded_patches_per_tile) < patches, persistent=False)

    def embed(self, pixel_values: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """Patches, tile and position embeddings, pre-norm: [N, T, P, D]."""
        s, width = self.settings, self.settings.hidden_size
        tiles, patches = s.max_num_tiles, s.patches_per_tile
        x = self.patch_embed(pixel_values.reshape(-1, s.num_channels, s.image_size, s.image_size))  # [N*T, D, g, g]
        x = x.reshape(-1, width, patches - 1).transpose(1, 2).reshape(-1, tiles, patches - 1, width)  # [N, T, P-1, D]
        x = x + self.pre_tile_embedding(aspect_ratio_ids).reshape(-1, tiles, 1, width) * self.pre_tile_gate.tanh()
        x = torch.cat([zero_rows(x, 1) + self.class_embedding, x], dim=2)  # [N, T, P, D]
        gate = self.position_gate.tanh()
        x = x + (1 - gate) * self.position_embedding  # [N, T, P, D]
        x = x + gate * self.tile_position_embedding(aspect_ratio_ids).reshape(-1, tiles, patches, width)
        return self.pre_norm(x)

    def forward(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        # pixel_values f32 [N, T, C, S, S], aspect_ratio_ids i64 [N], aspect_ratio_mask i64 [N, T] (1 = real tile)
        s, width = self.settings, self.settings.hidden_size
        tiles, patches, padded = s.max_num_tiles, s.patches_per_tile, s.padded_patches_per_tile
        x = self.embed(pixel_values, aspect_ratio_ids)  # [N, T, P, D]
        x = torch.cat([x, zero_rows(x, padded - patches)], dim=2)  # [N, T, P8, D], the padding rows exactly 0
        x = x.reshape(-1, tiles * padded, width)  # [N, T*P8, D]: the local transformer also sees every tile
        allowed = tile_attention_mask(aspect_ratio_mask, self.patch_is_real)  # [N, 1, T*P8, T*P8]
        outputs = []
        for block in self.local_blocks:
            x = block(x, allowed)
            outputs.append(x)
        # Upstream stacks the kept layers on a new last axis and flattens it: features are ordered (d, layer).
        kept = torch.stack([outputs[i] for i in s.kept_layers], dim=-1)  # [N, T*P8, D, K]
        kept = kept.reshape(-1, tiles, padded, width * len(s.kept_layers))  # [N, T, P8, D*K]
        x = self.post_norm(x).reshape(-1, tiles, padded, width)  # [N, T, P8, D]
        x = x + self.post_tile_embedding(aspect_ratio_ids).reshape(-1, tiles, 1, width) * self.post_tile_gate.tanh()
        x = x.reshape(-1, tiles * padded, width)  # [N, T*P8, D]
        for block in self.global_blocks:
            x = block(x, allowed)
        x = x.reshape(-1, tiles, padded, width)  # [N, T, P8, D]
        return torch.cat([x[:, :, :patches], kept[:, :, :patches]], dim=-1)  # [N, T, P, D*(1+K)]


class MllamaProjector(nn.Module):
    """multi_modal_projector: image_features [N, T, P, vision_output_dim] -> visual tokens [N, T*P, text width]."""

    def __init__(self, *, settings: TiledVisionConfig):
        super().__init__()
        self.settings = settings
        self.proj = nn.Linear(settings.vision_output_dim, settings.text_hidden_size)

    def forward(self, image_features: Tensor) -> Tensor:
        s = self.settings
        tokens = s.max_num_tiles * s.patches_per_tile
        # Upstream reshapes to [B*M*T, P, W] and the cross-attention views that as [B, M*T*P, W]: every image is
        # T*P tokens, padding tiles included (the text's cross_attention_mask hides those tiles).
        return self.proj(image_features).reshape(-1, tokens, s.text_hidden_size)  # [N, T*P, W]


# Our parameter name -> transformers' name, relative to MllamaVisionModel / the projector Linear. `{i}` is a layer
# index, the same on both sides. In a MllamaForConditionalGeneration state dict (transformers 5.x) these sit under
# UPSTREAM_PREFIXES (checked by the tests). Hub files saved by transformers 4.x are expected to use "vision_model." and
# "multi_modal_projector." (no leading "model."; not checked offline): pass that as `prefix`.
_BLOCK = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.q": "self_attn.q_proj",
          "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.out": "self_attn.o_proj",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_KINDS = {"norm1": ("weight", "bias"), "norm2": ("weight", "bias"), "mlp.fc1": ("weight", "bias"),
                "mlp.fc2": ("weight", "bias")}
VISION_WEIGHT_MAP: dict[str, str] = {
    "patch_embed.weight": "patch_embedding.weight",
    "class_embedding": "class_embedding",
    "pre_tile_embedding.weight": "pre_tile_positional_embedding.embedding.weight",
    "pre_tile_gate": "pre_tile_positional_embedding.gate",
    "position_embedding": "gated_positional_embedding.embedding",
    "tile_position_embedding.weight": "gated_positional_embedding.tile_embedding.weight",
    "position_gate": "gated_positional_embedding.gate",
    "post_tile_embedding.weight": "post_tile_positional_embedding.embedding.weight",
    "post_tile_gate": "post_tile_positional_embedding.gate",
    "pre_norm.weight": "layernorm_pre.weight", "pre_norm.bias": "layernorm_pre.bias",
    "post_norm.weight": "layernorm_post.weight", "post_norm.bias": "layernorm_post.bias",
    **{
        f"{ours_stack}.{{i}}.{ours}.{kind}": f"{theirs_stack}.layers.{{i}}.{theirs}.{kind}"
        for ours_stack, theirs_stack in (("local_blocks", "transformer"), ("global_blocks", "global_transformer"))
        for ours, theirs in _BLOCK.items()
        for kind in _BLOCK_KINDS.get(ours, ("weight",))
    },
    "global_blocks.{i}.attn_gate": "global_transformer.layers.{i}.gate_attn",
    "global_blocks.{i}.mlp_gate": "global_transformer.layers.{i}.gate_ffn",
}
PROJECTOR_WEIGHT_MAP: dict[str, str] = {"proj.weight": "weight", "proj.bias": "bias"}
UPSTREAM_PREFIXES = {"vision": "model.vision_model.", "projector": "model.multi_modal_projector."}


def upstream_name(our_name: str, weight_map: Mapping[str, str]) -> str:
    """The upstream name of one of our parameters, through `weight_map` (templates with `{i}`)."""
    for ours, theirs in weight_map.items():
        match = re.fullmatch(re.escape(ours).replace(r"\{i\}", r"(\d+)"), our_name)
        if match:
            return theirs.replace("{i}", match.group(1)) if match.groups() else theirs
    raise CheckpointError(f"{our_name} has no entry in the mllama weight map; add it to mllama_vision.py")


def load_from_transformers(module: MllamaVision | MllamaProjector, upstream: Mapping[str, Tensor], *,
                           prefix: str = "") -> None:
    """Copy upstream weights into `module`, every name mapped and every shape checked, no upstream tensor left over.

    `upstream` is a MllamaVisionModel's (or the projector Linear's) state dict, or a whole model's with `prefix`
    (UPSTREAM_PREFIXES) naming the part to take.
    """
    weight_map = VISION_WEIGHT_MAP if isinstance(module, MllamaVision) else PROJECTOR_WEIGHT_MAP
    theirs = {name: tensor for name, tensor in upstream.items() if name.startswith(prefix)}
    expected = {name: tensor.shape for name, tensor in module.state_dict().items()}
    loaded, _ = map_tensors(theirs, {}, expected, lambda name: (prefix + upstream_name(name, weight_map),))
    module.load_state_dict(loaded)
