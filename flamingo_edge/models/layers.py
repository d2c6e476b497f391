"""Building blocks shared by the model files: norms, activations, attention, rotary embeddings.

Attention is written with MatMul/Softmax/Where only (no einsum, no scaled_dot_product_attention) so that every graph
exports to plain ONNX ops that TensorRT 8.5 through 11 parse; masks are applied with `where` against a finite score.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# A masked score. Large enough that exp(masked - max) is exactly 0 in fp32 and fp16 for any realistic score, small
# enough not to overflow fp16 (max 65504). We never use -finfo.max: it overflows to -inf/NaN in fp16 engines.
MASKED_SCORE = -1.0e4


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, CLIP/IDEFICS "gelu"
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,  # OpenAI CLIP
    "relu": F.relu,
    "silu": F.silu,
}


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in dtype, without a no-op Cast: the TorchScript exporter mis-wires graphs around no-op casts."""
    return x if x.dtype == dtype else x.to(dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (LLaMA, IDEFICS)."""

    def __init__(self, *, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Computed in fp32 whatever the weight dtype: x**2 overflows fp16 for |x| > 256.
        x32 = cast(x, torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * cast(x32 * torch.rsqrt(variance + self.eps), x.dtype)


def make_norm(kind: str, *, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """The norm a config names: "rms" (RMSNorm, LLaMA/IDEFICS) or "layer" (LayerNorm, MPT/GPT-NeoX/OpenFlamingo)."""
    if kind == "rms":
        return RMSNorm(dim=dim, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"unknown norm {kind!r}; expected 'rms' or 'layer'")


# The sizes a module knows from its config (heads, head size, width) are passed in as Python ints: a size read from a
# tensor (`x.shape[-1]`) is traced into the graph as Shape/Gather/Unsqueeze/Concat arithmetic that every run pays
# for (about a third of a decode step's nodes before this), while a Python int becomes a constant.


def split_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """[B, S, H*Dh] -> [B, H, S, Dh]."""
    return x.reshape(x.shape[0], -1, heads, head_dim).transpose(1, 2)  # [B, H, S, Dh]


def merge_heads(x: Tensor, width: int) -> Tensor:
    """[B, H, S, Dh] -> [B, S, H*Dh] (`width` = H*Dh)."""
    x = x.transpose(1, 2)  # [B, S, H, Dh]; the batch read from the reshaped tensor itself, which ONNX Runtime folds
    return x.reshape(x.shape[0], -1, width)  # [B, S, H*Dh]


def attention_weights(scores: Tensor, allowed: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Scores [B, H, S, T] -> softmax weights in `dtype`: `bias` added (ALiBi), disallowed keys masked, the softmax
    in float32."""
    if bias is not None:
        scores = scores + cast(bias, scores.dtype)
    if allowed is not None:
        scores = torch.where(allowed, scores, MASKED_SCORE)
    return cast(torch.softmax(cast(scores, torch.float32), dim=-1), dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, head_dim: int, allowed: Tensor | None = None,
           bias: Tensor | None = None) -> Tensor:
    """Softmax attention. q [B, H, S, Dh], k/v [B, H, T, Dh], allowed bool and bias (added to the scores, ALiBi)
    broadcastable to [B, H, S, T]. `head_dim` = Dh, for the 1/sqrt(Dh) scale.

    A row with nothing allowed comes out as the mean of v: callers that can have such rows must gate them.
    """
    scores = torch.matmul(q * head_dim ** -0.5, k.transpose(-1, -2))  # [B, H, S, T]
    return torch.matmul(attention_weights(scores, allowed, bias, v.dtype), v)  # [B, H, S, Dh]


def attend_after_past(q: Tensor, past_key: Tensor, past_value: Tensor, key: Tensor, value: Tensor, head_dim: int,
                      allowed: Tensor | None = None, bias: Tensor | None = None,
                      past_length: int | Tensor | None = None) -> Tensor:
    """Attention of S new queries over P cached keys/values and the S new ones, without concatenating the cache.

    q/key/value [B, H, S, Dh], past_key/past_value [B, H, P, Dh]; allowed bool and bias broadcastable to
    [B, H, S, P+S] (the past's slots first). The same numbers as `attend(q, cat(past, new), ...)`, but the past is
    only read: no per-step copy of the whole cache into a P+S tensor. Only the scores are joined, [B, H, S, P+S],
    a Dh-th of the K/V's size. `past_length` is P when the caller has it (read once for every layer, a traced graph
    then has one Shape for all of them); None reads it from `past_key`.
    """
    q = q * head_dim ** -0.5
    # (K q^T)^T rather than q K^T for the past: the cache is the product's streamed left operand, the queries the
    # small right one (ONNX Runtime's GEMM packs the right operand: K^T there cost a copy of the cache per step).
    past_scores = torch.matmul(past_key, q.transpose(-1, -2)).transpose(-1, -2)  # [B, H, S, P]
    scores = torch.cat((past_scores, torch.matmul(q, key.transpose(-1, -2))), dim=-1)
    weights = attention_weights(scores, allowed, bias, value.dtype)  # [B, H, S, P+S]
    past = past_key.shape[2] if past_length is None else past_length
    return torch.matmul(weights[..., :past], past_value) + torch.matmul(weights[..., past:], value)  # [B, H, S, Dh]


def rotary_inverse_frequencies(*, head_dim: int, theta: float) -> Tensor:
    """The RoPE frequencies 1 / theta^(2i / Dh), i < Dh/2 (LLaMA's default rope)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def llama3_scaled_frequencies(frequencies: Tensor, *, factor: float, low_freq_factor: float, high_freq_factor: float,
                              original_max_positions: int) -> Tensor:
    """Llama 3.1's RoPE scaling of `frequencies` (transformers' `rope_type="llama3"`): wavelengths longer than
    original_max_positions / low_freq_factor are stretched by `factor`, those shorter than original_max_positions /
    high_freq_factor kept, and those between interpolated smoothly."""
    wavelengths = 2 * math.pi / frequencies
    long_wavelength = original_max_positions / low_freq_factor
    short_wavelength = original_max_positions / high_freq_factor
    scaled = torch.where(wavelengths > long_wavelength, frequencies / factor, frequencies)
    smooth = (original_max_positions / wavelengths - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelengths >= short_wavelength) & (wavelengths <= long_wavelength)
    return torch.where(between, smoothed, scaled)


def rotary_cos_sin(positions: Tensor, inverse_frequencies: Tensor) -> tuple[Tensor, Tensor]:
    """positions i64 [B, S] -> cos and signed sin [B, 1, S, Dh], laid out as (freqs, freqs) like LLaMA's rotate_half.

    The sin's first half is negated here, once per forward, so that `apply_rotary` swaps the halves without
    negating one in every layer: rotate_half(x) * sin = (-x2, x1) * (s, s) = (x2, x1) * (-s, s).
    """
    freqs = positions[..., None].float() * inverse_frequencies  # [B, S, Dh/2]
    sin = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1)[:, None].cos(), torch.cat((-sin, sin), dim=-1)[:, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, channels: int, head_dim: int) -> Tensor:
    """x [B, H, S, Dh] (Dh = `head_dim`) rotated by the angles in cos/sin [B, 1, S, R] from `rotary_cos_sin` (its
    sin is signed), R = `channels`. With R < Dh only the first R channels of each head turn and the rest pass
    unchanged (GPT-NeoX's partial rotary, `rotary_pct`)."""
    if channels < head_dim:
        rotated = apply_rotary(x[..., :channels], cos, sin, channels, channels)
        return torch.cat((rotated, x[..., channels:]), dim=-1)
    half = channels // 2
    # rotate_half, its sign in `sin` (rotary_cos_sin). A Gather of the permuted channels would be one node instead of
    # a Split and a Concat, but ONNX Runtime's Gather on the last axis cost 4x as much in a 1024-token prefill.
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cast(cos, x.dtype) + swapped * cast(sin, x.dtype)


def alibi_slopes(*, heads: int, bias_max: float) -> Tensor:
    """ALiBi's per-head slopes [H] as MPT computes them (transformers `build_mpt_alibi_tensor`, mosaicml
    `gen_slopes`): 2^(-bias_max * i / H') for i = 1..H', H' the next power of two; when H is not a power of two,
    the odd-indexed slopes first, then the even-indexed ones, cut to H."""
    padded = 1 << (heads - 1).bit_length()
    slopes = 1.0 / torch.pow(2.0, torch.arange(1, padded + 1, dtype=torch.float32) * (bias_max / padded))
    if padded != heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:heads]
    return slopes


class Mlp(nn.Module):
    """The plain transformer MLP: down(act(up(x))) (MPT, GPT-NeoX, OpenFlamingo's cross-attention feed-forward)."""

    def __init__(self, *, dim: int, hidden: int, act: str, bias: bool = False):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class SwiGLU(nn.Module):
    """LLaMA's gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, *, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def make_mlp(kind: str, *, dim: int, hidden: int, act: str, bias: bool = False) -> nn.Module:
    """The MLP a config names: "swiglu" (LLaMA/IDEFICS) or "mlp" (MPT, GPT-NeoX, OpenFlamingo)."""
    if kind == "swiglu":
        if bias:
            raise ValueError("a SwiGLU MLP with biases is not implemented")
        return SwiGLU(dim=dim, hidden=hidden, act=act)
    if kind == "mlp":
        return Mlp(dim=dim, hidden=hidden, act=act, bias=bias)
    raise ValueError(f"unknown MLP {kind!r}; expected 'swiglu' or 'mlp'")
