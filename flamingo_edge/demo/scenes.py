"""Scenes of coloured shapes drawn with OpenCV, with captions and question/answer pairs (numpy + OpenCV only).

A scene has one or two groups; a group is 1-3 copies of one shape in one colour, e.g. "two red circles and a blue
square". Shapes never overlap: each sits in its own cell of a 3 x 3 grid. Everything is drawn from a seeded
`numpy.random.Generator`, so a seed is a data set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLOURS = {  # RGB
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (235, 210, 20), "purple": (150, 40, 190), "orange": (245, 130, 20),
}
NUMBERS = ("one", "two", "three")
IMAGE_SIZE = 96
GRID = 3
CAPTION_PROMPT = "caption:"


@dataclass(frozen=True)
class Group:
    shape: str
    colour: str
    count: int

    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        article = ("an" if self.colour[0] in "aeiou" else "a") if self.count == 1 else NUMBERS[self.count - 1]
        return f"{article} {self.colour} {noun}"


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    groups: tuple[Group, ...]  # in caption order (the order of SHAPES)
    cells: tuple[tuple[str, str] | None, ...] = ()  # (shape, colour) or None per grid cell, row-major

    @property
    def caption(self) -> str:
        return " and ".join(group.phrase() for group in self.groups)

    def questions(self) -> list[tuple[str, str]]:
        """(question, answer) pairs this scene answers."""
        pairs = []
        for group in self.groups:
            pairs.append((f"what colour is the {group.shape}?", group.colour))
            pairs.append((f"how many {PLURALS[group.shape]} are there?", NUMBERS[group.count - 1]))
            pairs.append((f"what shape is {group.colour}?", group.shape))
        return pairs


def _draw(image: np.ndarray, shape: str, colour: tuple[int, int, int], center: tuple[int, int], size: int) -> None:
    import cv2

    x, y = center
    if shape == "circle":
        cv2.circle(image, center, size, colour, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(image, (x - size, y - size), (x + size, y + size), colour, -1, cv2.LINE_AA)
    else:
        if shape == "triangle":
            angles = np.deg2rad([-90, 30, 150])
            radii = np.full(3, size * 1.2)
        else:  # star: ten points alternating outer and inner radius
            angles = np.deg2rad(np.arange(10) * 36 - 90)
            radii = np.where(np.arange(10) % 2 == 0, size * 1.3, size * 0.55)
        points = np.stack([x + radii * np.cos(angles), y + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(image, [points.round().astype(np.int32)], colour, cv2.LINE_AA)


def make_scene(rng: np.random.Generator) -> Scene:
    """One random scene: 1-2 groups of distinct shapes and distinct colours, 1-3 copies each, on a light background."""
    kinds = rng.choice(len(SHAPES), size=int(rng.integers(1, 3)), replace=False)
    colours = rng.choice(list(COLOURS), size=len(kinds), replace=False)
    groups = tuple(sorted((Group(SHAPES[k], str(c), int(rng.integers(1, 4))) for k, c in zip(kinds, colours)),
                          key=lambda g: SHAPES.index(g.shape)))
    background = rng.integers(225, 256, size=3)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = background
    order = rng.permutation(GRID * GRID)[: sum(g.count for g in groups)]
    cell = IMAGE_SIZE // GRID
    cells: list[tuple[str, str] | None] = [None] * (GRID * GRID)
    placed = iter(order)
    for group in groups:
        for _ in range(group.count):
            index = int(next(placed))
            cells[index] = (group.shape, group.colour)
            row, col = divmod(index, GRID)
            size = int(rng.integers(cell // 4, cell // 3 + 1))
            # The star reaches 1.3 x size from its centre: keep every shape inside its cell.
            reach = int(np.ceil(size * 1.3)) + 1
            jitter = rng.integers(-(cell // 2 - reach), cell // 2 - reach + 1, size=2)
            center = (col * cell + cell // 2 + int(jitter[0]), row * cell + cell // 2 + int(jitter[1]))
            _draw(image, group.shape, COLOURS[group.colour], center, size)
    return Scene(image, groups, tuple(cells))


def caption_prompt(scene: Scene) -> list:
    """The prompt whose answer is the caption: [image, "caption:"]."""
    return [scene.image, CAPTION_PROMPT]


def question_prompt(scene: Scene, question: str) -> list:
    """The prompt whose answer is the answer: [image, "question: ... answer:"]."""
    return [scene.image, f"question: {question} answer:"]
