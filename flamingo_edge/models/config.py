"""The model configuration: frozen dataclasses, one per component, plus the whole-model record.

Importers (`models/importers/*`) map upstream configs into these; model files read nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP-style ViT: patch convolution, class token, learned positions, pre-LN transformer blocks."""

    image_size: int  # square input side in pixels (H = W)
    patch_size: int  # side of one patch; image_size must be a multiple of it
    width: int  # Dv, the token width
    layers: int  # transformer blocks
    heads: int  # attention heads; width must be a multiple of it
    mlp_width: int  # hidden width of each block's MLP
    act: str  # MLP activation: a key of layers.ACTIVATIONS ("gelu", "quick_gelu", "gelu_tanh", "relu")
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    @property
    def num_tokens(self) -> int:
        """T: patches plus the class token (IDEFICS feeds all of them, class token included, to the resampler)."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class ResamplerConfig:
    """The Perceiver Resampler: learned latents cross-attend to [image features; latents]."""

    enabled: bool  # False: the visual tokens are the vision tokens themselves (IDEFICS use_resampler=False)
    latents: int  # L, visual tokens per image when enabled
    depth: int  # attention + MLP blocks
    heads: int
    head_dim: int  # inner width = heads * head_dim, independent of Dv
    mlp_width: int  # IDEFICS: 4 * Dv
    act: str = "relu"  # IDEFICS uses ReLU; OpenFlamingo GELU
    qk_layer_norms: bool = False  # LayerNorm(head_dim) on q and k after the head split
    max_frames: int = 0  # > 0 adds learned per-frame (time) embeddings, OpenFlamingo's frame_embs
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class DecoderConfig:
    """A LLaMA-style decoder with gated cross-attention blocks placed before some of its layers."""

    vocab_size: int  # the base vocabulary (IDEFICS `vocab_size`)
    additional_vocab_size: int  # IDEFICS' extra rows (e.g. <image>); merged after the base rows: V = sum of both
    width: int  # D
    layers: int
    heads: int  # H for self-attention
    mlp_width: int  # SwiGLU hidden width
    cross_layers: tuple[int, ...]  # indices of the decoder layers preceded by a gated cross-attention block
    cross_heads: int  # H for cross-attention (IDEFICS: = heads)
    cross_head_dim: int  # Dh for cross-attention (IDEFICS: width // heads)
    cross_qk_norms: bool = False  # RMSNorm(Dh) on cross-attention q and k (IDEFICS qk_layer_norms)
    vector_gates: bool = False  # tanh gates per channel [D] instead of one scalar (IDEFICS alpha_type="vector")
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048
    act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    @property
    def total_vocab_size(self) -> int:
        """V, the rows of the embedding and of the logits."""
        return self.vocab_size + self.additional_vocab_size

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class FlamingoConfig:
    """The whole model: vision encoder -> resampler -> decoder with gated cross-attention."""

    family: str  # the importer that produced it ("idefics")
    vision: VisionConfig
    resampler: ResamplerConfig
    decoder: DecoderConfig

    @property
    def visual_tokens_per_image(self) -> int:
        """L as seen by the cross-attention."""
        return self.resampler.latents if self.resampler.enabled else self.vision.num_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FlamingoConfig:
        """Inverse of `to_dict`; unknown keys raise TypeError (our own records are strict)."""
        decoder = dict(data["decoder"])
        decoder["cross_layers"] = tuple(decoder["cross_layers"])
        return cls(
            family=data["family"],
            vision=VisionConfig(**data["vision"]),
            resampler=ResamplerConfig(**data["resampler"]),
            decoder=DecoderConfig(**decoder),
        )
