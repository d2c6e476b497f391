"""The stream API refuses bad generation settings when it is built, before any frame is read."""

from __future__ import annotations

import pytest

from flamingo_edge.errors import UsageError
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.sources import open_source
from flamingo_edge.runtime.stream import FrameStream


@pytest.mark.parametrize("settings, match", [
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1"),
    (dict(seed=-1), r"seed"),
    (dict(stop_strings="###"), r"stop_strings"),
])
def test_bad_settings_are_refused_at_construction(demo_export, tmp_path, settings, match):
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "frame.png"), np.zeros((8, 8, 3), np.uint8))
    source = open_source(str(tmp_path))
    with Pipeline.open(demo_export) as pipeline:
        with pytest.raises(UsageError, match=match):
            FrameStream(pipeline, source, prompts=["caption:"], **settings)
    assert source.index == 0  # no frame was read
