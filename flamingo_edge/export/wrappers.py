"""One small module per graph: its `forward` takes exactly the graph's inputs, in the contract's order.

The wrappers hold no state and do no work of their own beyond unpacking tensors: each calls one sub-module of the
reference model, so an exported graph computes exactly what the PyTorch reference computes.
"""

from __future__ import annotations

from torch import Tensor, nn

from flamingo_edge.models.flamingo import FlamingoModel


class PartGraph(nn.Module):
    """A graph that is one part of the model called as it is: `vision` (pixel_values [N, 3, H, W] -> image_features
    [N, T, Dv]; a tiled tower also takes the aspect-ratio ids and tile mask) and `resampler` (image_features
    [N, F, T, Dv] -> visual_tokens [N, L, Dv])."""

    def __init__(self, name: str, part: nn.Module):
        super().__init__()
        self.name = name
        self.add_module(name, part)  # under the part's own name: compare reports layers as "vision.blocks.3"

    def forward(self, *tensors: Tensor) -> Tensor:
        return getattr(self, self.name)(*tensors)


class CrossKVGraph(nn.Module):
    """visual_tokens [N, L, Dv] -> cross_key.0, cross_value.0, cross_key.1, ... [N, Hx, L, Dh]."""

    def __init__(self, model: FlamingoModel):
        super().__init__()
        self.blocks = model.decoder.cross_blocks

    def forward(self, visual_tokens: Tensor) -> tuple[Tensor, ...]:
        return tuple(tensor for block in self.blocks for tensor in block.project_visual(visual_tokens))


class DecoderGraph(nn.Module):
    """input_ids, attention_mask, past_key.l/past_value.l..., cross_key.i/cross_value.i..., image_attention_mask
    -> logits, present_key.l/present_value.l...  (flat, in the contract's order)."""

    def __init__(self, model: FlamingoModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        layers, blocks = len(self.decoder.layers), len(self.decoder.cross_blocks)
        past, cross, image_attention_mask = tensors[: 2 * layers], tensors[2 * layers : -1], tensors[-1]
        logits, keys, values = self.decoder(
            input_ids, attention_mask, list(past[0::2]), list(past[1::2]), list(cross[0::2]), list(cross[1::2]),
            image_attention_mask,
        )
        assert len(cross) == 2 * blocks  # internal invariant of the contract's order
        return (logits, *(tensor for pair in zip(keys, values) for tensor in pair))


WRAPPERS = {"vision": lambda model: PartGraph("vision", model.vision),
            "resampler": lambda model: PartGraph("resampler", model.resampler), "xattn_kv": CrossKVGraph,
            "decoder": DecoderGraph}
