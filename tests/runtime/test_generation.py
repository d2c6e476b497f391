"""Streaming detokenization: the pieces a TextStream releases always add up to the decoded tokens."""

from __future__ import annotations

import numpy as np

from flamingo_edge.runtime.generation import TextStream
from flamingo_edge.runtime.tokenizer import Tokenizer


def test_streamed_pieces_add_up_to_the_decoded_tokens(idefics_checkpoint, seed):
    tokenizer = Tokenizer.from_pretrained(idefics_checkpoint)
    rng = np.random.default_rng(seed)
    vocab = tokenizer.backend.get_vocab_size()
    for _ in range(200):  # random byte-level tokens: incomplete and invalid UTF-8 sequences are common
        ids = rng.integers(0, vocab, size=int(rng.integers(1, 12))).tolist()
        stream = TextStream(tokenizer)
        pieces = [stream.push(token) for token in ids] + [stream.flush()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
