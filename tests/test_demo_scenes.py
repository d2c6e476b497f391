"""The demo task's scenes: deterministic per seed, captions and answers consistent with what is drawn."""

from __future__ import annotations

import numpy as np

from flamingo_edge.demo import scenes


def test_scenes_are_reproducible_and_consistent(seed):
    first = [scenes.make_scene(np.random.default_rng(seed)) for _ in range(2)]
    assert np.array_equal(first[0].image, first[1].image) and first[0].caption == first[1].caption
    rng = np.random.default_rng(seed)
    for _ in range(50):
        scene = scenes.make_scene(rng)
        assert scene.image.shape == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.groups) <= 2 and all(1 <= g.count <= 3 for g in scene.groups)
        assert len({g.shape for g in scene.groups}) == len(scene.groups)
        for group in scene.groups:  # each group's colour is really drawn
            colour = np.array(scenes.COLOURS[group.colour])
            assert (np.abs(scene.image.astype(int) - colour).sum(-1) < 10).sum() > 20
        assert (f"what colour is the {scene.groups[0].shape}?", scene.groups[0].colour) in scene.questions()


def test_caption_grammar():
    assert scenes.Group("circle", "orange", 1).phrase() == "an orange circle"
    assert scenes.Group("star", "red", 3).phrase() == "three red stars"


def test_cells_hold_the_groups_and_no_shape_spills_into_another_cell(seed):
    rng = np.random.default_rng(seed)
    cell = scenes.IMAGE_SIZE // scenes.GRID
    for _ in range(50):
        scene = scenes.make_scene(rng)
        assert len(scene.cells) == scenes.GRID ** 2
        drawn = [c for c in scene.cells if c is not None]
        assert sorted(drawn) == sorted((g.shape, g.colour) for g in scene.groups for _ in range(g.count))
        background = scene.image[0, 0].astype(int)
        for index, content in enumerate(scene.cells):
            row, col = divmod(index, scenes.GRID)
            block = scene.image[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].astype(int)
            inked = np.abs(block - background).sum(-1) > 30
            assert inked.sum() > 20 if content is not None else not inked.any()  # empty cells get no ink
