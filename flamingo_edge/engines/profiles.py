"""Optimization profiles from shape limits (torch-free, TensorRT-free): min/opt/max per input of every graph.

The decoder gets two profiles: prefill (S from 1 to the longest prompt, P from 0 to the context, for a reused prompt
prefix of any length) and decode (S = 1, P from 0 to the context). P = 0 is always allowed: a prefill with no past.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flamingo_edge.errors import UsageError
from flamingo_edge.graphs import GraphSpec, resolve_dims

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


@dataclass(frozen=True)
class ShapeLimits:
    max_batch: int = 1
    max_prompt: int = 128  # tokens in one prefill
    max_context: int = 256  # prompt + generated tokens per sequence
    max_images: int = 4  # images per sequence

    def check(self, max_positions: int) -> None:
        """Raises UsageError for limits that make no engine."""
        for name, value in asdict(self).items():
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_prompt > self.max_context:
            raise UsageError(f"--max-prompt {self.max_prompt} > --max-context {self.max_context}")
        if self.max_context > max_positions:
            raise UsageError(f"--max-context {self.max_context} > {max_positions}, the model's position limit")


def _profile(spec: GraphSpec, low: dict, opt: dict, high: dict) -> Profile:
    return {t.name: (resolve_dims(t, low), resolve_dims(t, opt), resolve_dims(t, high)) for t in spec.inputs}


def graph_profiles(spec: GraphSpec, limits: ShapeLimits, latents: int, slots_per_image: int = 1) -> list[Profile]:
    """The optimization profiles of one graph of the contract. `latents`: L, the visual tokens of one image slot;
    `slots_per_image`: the decoder's image slots per image (a tiled tower's T tiles, else 1)."""
    images = limits.max_batch * limits.max_images
    if spec.name in ("vision", "resampler", "xattn_kv"):
        return [_profile(spec, {"N": 1, "F": 1}, {"N": 1, "F": 1}, {"N": images, "F": 1})]
    if spec.name != "decoder":
        raise UsageError(f"no profile rule for graph {spec.name!r}")
    base = {"L": latents}
    low = {**base, "B": 1, "S": 1, "P": 0, "M": 1}
    high_p = limits.max_context - 1
    prefill = _profile(spec, low, {**base, "B": 1, "S": min(32, limits.max_prompt), "P": 0, "M": 1},
                       {**base, "B": limits.max_batch, "S": limits.max_prompt, "P": high_p,
                        "M": limits.max_images * slots_per_image})
    decode = _profile(spec, low, {**base, "B": 1, "S": 1, "P": limits.max_context // 2, "M": 1},
                      {**base, "B": limits.max_batch, "S": 1, "P": high_p, "M": limits.max_images * slots_per_image})
    return [prefill, decode]
