"""Shared fixtures: small IDEFICS checkpoints with random weights, built offline and saved with save_pretrained.

Every run draws a fresh seed (printed in the header); set FLAMINGO_EDGE_TEST_SEED to replay one.
"""

from __future__ import annotations

import os
import secrets

import pytest

from flamingo_edge.models.random_idefics import PRESETS

SEED = int(os.environ.get("FLAMINGO_EDGE_TEST_SEED", secrets.randbelow(2**31)))


def pytest_report_header(config):
    return f"flamingo-edge test seed: {SEED} (replay with FLAMINGO_EDGE_TEST_SEED={SEED})"


@pytest.fixture(scope="session")
def seed() -> int:
    return SEED


@pytest.fixture(scope="session", params=sorted(PRESETS))
def idefics_checkpoint(request, tmp_path_factory):
    """A folder written by IdeficsForVisionText2Text/IdeficsProcessor.save_pretrained, one per preset."""
    from flamingo_edge.models.random_idefics import save_random_idefics

    return save_random_idefics(tmp_path_factory.mktemp(f"idefics-{request.param}"), preset=request.param, seed=SEED)
