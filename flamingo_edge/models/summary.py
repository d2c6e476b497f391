"""What a checkpoint is: parameter counts per component and the architecture facts users ask for.

Counts come from a model built on the meta device from the config alone, so summarising an 80B checkpoint costs no
memory and reads no weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from flamingo_edge.config import FlamingoConfig
from flamingo_edge.models.flamingo import FlamingoModel


@dataclass(frozen=True)
class ModelSummary:
    """Architecture facts and parameter counts of one model."""

    family: str
    parameters: dict[str, int]  # component -> parameter count; "total" is their sum
    vision_kind: str  # "CLIP ViT" or "tiled ViT" (mllama)
    image_size: int  # the image's side in pixels; a tiled tower: one tile's
    patch_size: int
    tiles: int  # tiles per image (a tiled tower's max_num_tiles, padding tiles included), else 1
    tokens_per_tile: int  # a tile's tokens (patches + class token); untiled: the vision tokens
    vision_tokens_per_image: int  # T (a tiled tower: tiles x tokens per tile)
    visual_tokens_per_image: int  # L, what each gated block attends to per image
    vision_layers: int  # a tiled tower: its local layers
    vision_global_layers: int  # a tiled tower's gated global layers, else 0
    vision_heads: int
    vision_width: int
    resampler: str  # "off", "<depth> blocks, <heads> heads x <head_dim>", or "projector (Linear <in> -> <out>)"
    decoder_layers: int
    decoder_heads: int
    decoder_kv_heads: int  # key/value heads of self-attention (grouped-query attention: fewer than the heads)
    decoder_width: int
    decoder_blocks: str  # how the LM's blocks are built, e.g. "RMSNorm, RoPE, SwiGLU (silu)"
    cross_attention_layers: list[int]  # decoder layers preceded (or, `cross_attention_replaces`, replaced) by a block
    cross_attention_replaces: bool  # the gated blocks are decoder layers of their own (mllama), not extra blocks
    cross_attention_heads: int
    vocab_size: int
    additional_vocab_size: int
    input_only_vocab_size: int  # embedding rows the LM head has not (mllama's <|image|> and 7 spares)

    def to_dict(self) -> dict:
        return asdict(self)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_blocks(text) -> str:
    """The switches of a DecoderConfig in words: norm, positions, MLP, and the departures from LLaMA."""
    norm = "RMSNorm" if text.norm == "rms" else ("LayerNorm" if text.norm_bias else "LayerNorm without bias")
    if text.positions == "alibi":
        positions = "ALiBi"
    else:
        positions = "RoPE" if text.rotary_channels == text.head_dim else \
            f"RoPE on {text.rotary_channels} of {text.head_dim} channels"
    if text.positions == "rope" and text.rope_type == "llama3":
        positions += f" (Llama 3.1 scaling x{text.rope_factor:g})"
    mlp = f"{'SwiGLU' if text.mlp == 'swiglu' else 'MLP'} ({text.act})"
    extras = [name for name, on in (("biased projections", text.attn_bias), ("q/k norm", text.qk_norm),
                                    ("parallel residual", text.parallel_residual)) if on]
    return ", ".join([norm, positions, mlp, *extras])


def summarize(config: FlamingoConfig) -> ModelSummary:
    """Summarise a model from its config (no weights needed)."""
    with torch.device("meta"):
        model = FlamingoModel(config=config)
    decoder = model.decoder
    cross = sum(_count(block) for block in decoder.cross_blocks)
    embeddings = _count(decoder.embed) + _count(decoder.lm_head)
    parameters = {
        "vision": _count(model.vision),
        "resampler": _count(model.resampler),
        "cross_attention": cross,
        "decoder": _count(decoder) - cross - embeddings,
        "embeddings_and_lm_head": embeddings,
    }
    parameters["total"] = sum(parameters.values())
    text = config.decoder
    return ModelSummary(
        family=config.family, parameters=parameters, **_vision_facts(config), resampler=_describe_resampler(config),
        visual_tokens_per_image=config.visual_tokens_per_image, decoder_layers=text.layers,
        decoder_heads=text.heads, decoder_kv_heads=text.kv_head_count, decoder_width=text.width,
        decoder_blocks=describe_blocks(text), cross_attention_layers=list(text.cross_layers),
        cross_attention_replaces=text.cross_placement == "replace", cross_attention_heads=text.cross_heads,
        vocab_size=text.vocab_size, additional_vocab_size=text.additional_vocab_size,
        input_only_vocab_size=text.input_only_vocab,
    )


def _vision_facts(config: FlamingoConfig) -> dict:
    """The ModelSummary fields of the vision tower, a CLIP ViT's or a tiled one's."""
    v = config.vision
    if config.tiled:
        return dict(vision_kind="tiled ViT", image_size=v.image_size, patch_size=v.patch_size,
                    tiles=v.max_num_tiles, tokens_per_tile=v.patches_per_tile,
                    vision_tokens_per_image=v.max_num_tiles * v.patches_per_tile, vision_layers=v.num_hidden_layers,
                    vision_global_layers=v.num_global_layers, vision_heads=v.attention_heads,
                    vision_width=v.hidden_size)
    return dict(vision_kind="CLIP ViT", image_size=v.image_size, patch_size=v.patch_size, tiles=1,
                tokens_per_tile=v.num_tokens, vision_tokens_per_image=v.num_tokens, vision_layers=v.layers,
                vision_global_layers=0, vision_heads=v.heads, vision_width=v.width)


def _describe_resampler(config: FlamingoConfig) -> str:
    r = config.resampler
    if config.tiled:
        return f"projector (Linear {config.vision.vision_output_dim} -> {config.vision.text_hidden_size})"
    return f"{r.depth} blocks, {r.latents} latents, {r.heads} heads x {r.head_dim}" if r.enabled else "off"
