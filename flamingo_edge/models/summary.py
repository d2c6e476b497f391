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
    image_size: int
    patch_size: int
    vision_tokens_per_image: int  # T
    visual_tokens_per_image: int  # L, what each gated block attends to per image
    vision_layers: int
    vision_heads: int
    vision_width: int
    resampler: str  # "off" or "<depth> blocks, <heads> heads x <head_dim>"
    decoder_layers: int
    decoder_heads: int
    decoder_width: int
    decoder_blocks: str  # how the LM's blocks are built, e.g. "RMSNorm, RoPE, SwiGLU (silu)"
    cross_attention_layers: list[int]  # decoder layers preceded by a gated cross-attention block
    cross_attention_heads: int
    vocab_size: int
    additional_vocab_size: int

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
    vision, resampler, text = config.vision, config.resampler, config.decoder
    return ModelSummary(
        family=config.family, parameters=parameters, image_size=vision.image_size, patch_size=vision.patch_size,
        vision_tokens_per_image=vision.num_tokens, visual_tokens_per_image=config.visual_tokens_per_image,
        vision_layers=vision.layers, vision_heads=vision.heads, vision_width=vision.width,
        resampler=(f"{resampler.depth} blocks, {resampler.latents} latents, {resampler.heads} heads x "
                   f"{resampler.head_dim}" if resampler.enabled else "off"),
        decoder_layers=text.layers, decoder_heads=text.heads, decoder_width=text.width,
        decoder_blocks=describe_blocks(text), cross_attention_layers=list(text.cross_layers), cross_attention_heads=text.cross_heads,
        vocab_size=text.vocab_size, additional_vocab_size=text.additional_vocab_size,
    )
