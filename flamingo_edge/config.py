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
    output_class_token: bool = True  # IDEFICS feeds the class token on; OpenFlamingo (open_clip) only the patches

    @property
    def num_positions(self) -> int:
        """Patches plus the class token: the rows of the learned position embedding."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def num_tokens(self) -> int:
        """T, the tokens of `image_features`: every position, or the patches alone without the class token."""
        return self.num_positions if self.output_class_token else self.num_positions - 1


# The most bytes of float32 attention scores the tiled vision tower holds at once per image: its attention runs over a
# whole image's T*P8 tokens (the 11B: 6432, 165 MB of scores per head), so it is computed a few heads at a time.
VISION_SCORES_BYTES = 256 << 20


@dataclass(frozen=True)
class TiledVisionConfig:
    """mllama's tiled ViT (Llama 3.2 Vision, transformers' MllamaVisionConfig): an image is `max_num_tiles` tiles of
    image_size² pixels (padding tiles marked 0 in aspect_ratio_mask); a local transformer over every tile's patches
    and class token, then a global transformer of tanh-gated layers; the output is the global transformer's tokens
    with the kept local layers' outputs appended on the feature axis (`vision_output_dim`)."""

    hidden_size: int  # D, the token width of both transformers
    num_hidden_layers: int  # layers of the local transformer
    num_global_layers: int  # gated layers of the global transformer
    attention_heads: int  # D must be a multiple of it
    intermediate_size: int  # hidden width of every MLP
    image_size: int  # side of one square tile in pixels
    patch_size: int  # side of one patch; image_size must be a multiple of it
    max_num_tiles: int  # T, tiles per image (the processor pads every image to T)
    supported_aspect_ratios: tuple[tuple[int, int], ...]  # (rows, cols) of tiles; aspect_ratio_id k = entry k-1
    intermediate_layers_indices: tuple[int, ...]  # local layers whose outputs are appended (negative: from the end)
    vision_output_dim: int  # D * (1 + len(intermediate_layers_indices))
    text_hidden_size: int  # the projector's output width: the text model's hidden size
    hidden_act: str = "gelu"  # a key of layers.ACTIVATIONS
    norm_eps: float = 1e-5  # the blocks' LayerNorms (layernorm_pre/post always use 1e-5, as upstream)
    num_channels: int = 3

    @property
    def max_aspect_ratio_id(self) -> int:
        """The largest aspect_ratio_id; id 0 is padding (no image)."""
        return len(self.supported_aspect_ratios)

    @property
    def patches_per_tile(self) -> int:
        """P, the tokens of one tile: its patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_patches_per_tile(self) -> int:
        """P8, P rounded up to a multiple of 8 (P = g² + 1 is never one, so there is always padding)."""
        return -(-self.patches_per_tile // 8) * 8

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """intermediate_layers_indices made non-negative, in their order (upstream indexes a tuple with them)."""
        return tuple(i % self.num_hidden_layers for i in self.intermediate_layers_indices)

    def heads_per_chunk(self) -> int:
        """Attention heads computed at once, so that one image's scores [chunk, T*P8, T*P8] stay within
        VISION_SCORES_BYTES (all heads when they fit; at least one)."""
        tokens = self.max_num_tiles * self.padded_patches_per_tile
        return max(1, min(self.attention_heads, VISION_SCORES_BYTES // (tokens * tokens * 4)))


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
    # "perceiver": the Perceiver Resampler above; "projector" (mllama): one Linear from the tiled vision tower's
    # vision_output_dim to the decoder's width, every token kept (the other fields are unused and 0)
    kind: str = "perceiver"


@dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only LM with gated cross-attention blocks placed before some of its layers.

    The defaults describe IDEFICS (a LLaMA decoder with IDEFICS' cross-attention blocks). Each way in which the
    language models of other families differ is one field (docs/models.md lists which family sets which):
    LLaMA = RMSNorm, RoPE, SwiGLU; MPT = LayerNorm without bias, ALiBi, GELU MLP; GPT-NeoX = LayerNorm, partial
    RoPE, biased projections, GELU MLP, parallel residual.
    """

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
    rms_norm_eps: float = 1e-6  # epsilon of every norm of the LM, whatever its kind (`norm`)
    rope_theta: float = 10000.0
    max_positions: int = 2048
    kv_heads: int = 0  # key/value heads of self-attention, grouped-query attention (Llama 3, mllama); 0: = heads
    # RoPE frequency scaling: "default" (none) or "llama3" (Llama 3.1's: low frequencies divided by rope_factor,
    # high ones kept, a smooth ramp between; the wavelength bounds from rope_original_max_positions)
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    act: str = "silu"  # the LM's MLP activation (a key of layers.ACTIVATIONS)
    # -- how the language model's blocks are built (defaults: LLaMA)
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm)
    norm_bias: bool = True  # LayerNorm with a bias (MPT's no_bias LMs: False); unused by RMSNorm
    positions: str = "rope"  # "rope" (rotary, positions from attention_mask) or "alibi" (MPT)
    rotary_dim: int = 0  # rotated channels of each head: 0 = all of them (LLaMA); GPT-NeoX rotary_pct * Dh
    alibi_bias_max: float = 8.0  # ALiBi slopes 2^(-alibi_bias_max * i / H') (MPT's default)
    attn_bias: bool = False  # biases on the self-attention q/k/v/o projections (GPT-NeoX)
    qk_norm: bool = False  # a norm of kind `norm` over the whole q and k before the head split (MPT-1B's qk_ln)
    mlp: str = "swiglu"  # "swiglu" (gate/up/down) or "mlp" (up -> act -> down)
    mlp_bias: bool = False  # biases on the MLP projections (GPT-NeoX)
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX) instead of one after the other
    # -- how the gated cross-attention blocks are built (defaults: IDEFICS)
    cross_norm: str = "rms"  # norm before cross-attention and before its MLP: "rms" (IDEFICS), "layer" (OpenFlamingo)
    cross_norm_eps: float = 0.0  # 0: the LM's rms_norm_eps (IDEFICS); OpenFlamingo's LayerNorm: 1e-5
    cross_mlp: str = "swiglu"  # "swiglu" with the LM's width and act (IDEFICS) or "mlp" (OpenFlamingo: GELU, 4 D)
    cross_mlp_width: int = 0  # 0: the LM's mlp_width
    cross_act: str = ""  # "": the LM's act (IDEFICS); OpenFlamingo: "gelu"
    cross_kv_heads: int = 0  # key/value heads of cross-attention (mllama: grouped-query); 0: = cross_heads
    # "before": a gated block before decoder layer i (IDEFICS, OpenFlamingo); "replace": the gated block is layer i,
    # which has no self-attention (mllama's cross-attention decoder layers)
    cross_placement: str = "before"
    # a text row that may see no image: "zero" adds exactly 0 (IDEFICS, OpenFlamingo); "attend_all" (mllama) attends
    # to every visual token and adds the gated attention, and only the MLP's output is zeroed for it
    cross_empty_rows: str = "zero"
    # embedding rows past the logits' vocabulary: tokens that are read but never predicted (mllama's 8 extra rows,
    # `<|image|>` the first of them; its LM head has vocab_size rows)
    input_only_vocab: int = 0
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

    @property
    def self_attention_layers(self) -> int:
        """Layers with self-attention, each with its K/V cache (`past_key.{l}`): all of them, or with
        cross_placement "replace" those that are not cross-attention layers."""
        return self.layers - len(self.cross_layers) if self.cross_placement == "replace" else self.layers

    @property
    def cross_kv_head_count(self) -> int:
        """Key/value heads of cross-attention: the H of `cross_key.{i}` (`cross_kv_heads`, else `cross_heads`)."""
        return self.cross_kv_heads or self.cross_heads

    @property
    def kv_head_count(self) -> int:
        """Key/value heads of self-attention: the H of the self-attention K/V cache (`kv_heads`, else `heads`)."""
        return self.kv_heads or self.heads

    @property
    def rotary_channels(self) -> int:
        """Channels of each head that RoPE rotates."""
        return self.rotary_dim or self.head_dim


@dataclass(frozen=True)
class FlamingoConfig:
    """The whole model: vision encoder -> resampler -> decoder with gated cross-attention."""

    family: str  # the importer that produced it ("idefics", "openflamingo", "mllama")
    vision: VisionConfig | TiledVisionConfig
    resampler: ResamplerConfig
    decoder: DecoderConfig

    @property
    def tiled(self) -> bool:
        """The vision tower takes tiled images (mllama): each tile is one image slot of the cross-attention."""
        return isinstance(self.vision, TiledVisionConfig)

    @property
    def slots_per_image(self) -> int:
        """Image slots of `image_attention_mask` per image: T tiles for a tiled tower, else 1."""
        return self.vision.max_num_tiles if self.tiled else 1

    @property
    def visual_tokens_per_slot(self) -> int:
        """L of the decoder's contract: the visual tokens behind one slot of `image_attention_mask` (a tile's P
        tokens for a tiled tower)."""
        if self.tiled:
            return self.vision.patches_per_tile
        return self.resampler.latents if self.resampler.enabled else self.vision.num_tokens

    @property
    def visual_tokens_per_image(self) -> int:
        """The visual tokens of one image, as `xattn_kv` gives them: its slots times L."""
        return self.slots_per_image * self.visual_tokens_per_slot

    @property
    def visual_width(self) -> int:
        """The width of the visual tokens the gated blocks read: the projector's (the text width) for a tiled tower,
        else the vision tower's."""
        return self.vision.text_hidden_size if self.tiled else self.vision.width

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FlamingoConfig:
        """Inverse of `to_dict`; unknown keys raise TypeError (our own records are strict)."""
        decoder = dict(data["decoder"])
        decoder["cross_layers"] = tuple(decoder["cross_layers"])
        vision = dict(data["vision"])
        if "max_num_tiles" in vision:  # a tiled tower: its lists are tuples
            vision["supported_aspect_ratios"] = tuple(tuple(r) for r in vision["supported_aspect_ratios"])
            vision["intermediate_layers_indices"] = tuple(vision["intermediate_layers_indices"])
        return cls(
            family=data["family"],
            vision=(TiledVisionConfig if "max_num_tiles" in vision else VisionConfig)(**vision),
            resampler=ResamplerConfig(**data["resampler"]),
            decoder=DecoderConfig(**decoder),
        )


def config_differences(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """'decoder.width 128 vs 64' for every leaf that differs between two config dicts (`FlamingoConfig.to_dict()`,
    or the one an export.json records)."""
    found = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, f"{prefix}{key}.")
        elif _as_lists(a) != _as_lists(b):
            found.append(f"{prefix}{key} {a!r} vs {b!r}")
    return found


def _as_lists(value):
    """Tuples (ours) and lists (JSON's), nested, compared alike."""
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value
