"""A built-in labelled image dataset drawn procedurally: nothing downloaded, nothing stored in git.

Eight classes a person tells apart at a glance (shape, colour, texture), each image with a
random position, size, rotation-free jitter and a noisy background, all from one seed:

    write_synthetic_dataset("demo/images", images_per_class=32, size=64, seed=0)

writes an ImageFolder tree (``<class>/<index>.png``) that ``reglue prepare`` reads like any other.
Pictures are drawn natively at ``size`` (any side; the demo draws at its training resolution):
shapes are fractions of the side, and the painters' fixed lengths (stripe period, checker cell,
dot radius) are given for 64 pixels and scaled, so a class looks the same at every side (the
pixel noise is drawn per pixel, so one seed's pictures at two sides are not rescaled copies).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from reglue.io import atomic_write

Painter = Callable[[ImageDraw.ImageDraw, np.random.Generator, int], None]
DRAWN_AT = 64  # the side the painters' fixed lengths (stripe period, cell, dot radius) are given for


def _box(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    """A random square box covering 35-70 % of the side, fully inside the image."""
    side = int(size * rng.uniform(0.35, 0.7))
    x, y = rng.integers(0, size - side + 1, 2)
    return int(x), int(y), int(x + side), int(y + side)


def _circle(colour):
    return lambda draw, rng, size: draw.ellipse(_box(rng, size), fill=colour)


def _square(colour):
    return lambda draw, rng, size: draw.rectangle(_box(rng, size), fill=colour)


def _triangle(colour):
    def paint(draw, rng, size):
        x0, y0, x1, y1 = _box(rng, size)
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=colour)
    return paint


def _ring(colour):
    def paint(draw, rng, size):
        box = _box(rng, size)
        draw.ellipse(box, outline=colour, width=max(2, (box[2] - box[0]) // 6))
    return paint


def _cross(colour):
    def paint(draw, rng, size):
        x0, y0, x1, y1 = _box(rng, size)
        w = max(2, (x1 - x0) // 5)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - w, y0, cx + w, y1), fill=colour)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=colour)
    return paint


def _scaled(pixels: int, size: int) -> int:
    """A length drawn for a 64-pixel picture, at ``size`` pixels (the same picture at any side)."""
    return max(1, round(pixels * size / DRAWN_AT))


def _stripes(colour):
    def paint(draw, rng, size):
        period = _scaled(int(rng.integers(6, 12)), size)
        offset = int(rng.integers(0, period))
        for x in range(-period + offset, size, period):
            draw.rectangle((x, 0, x + period // 2 - 1, size), fill=colour)
    return paint


def _checkers(colour):
    def paint(draw, rng, size):
        cell = _scaled(int(rng.integers(6, 12)), size)
        for i, x in enumerate(range(0, size, cell)):
            for j, y in enumerate(range(0, size, cell)):
                if (i + j) % 2 == 0:
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour)
    return paint


def _dots(colour):
    def paint(draw, rng, size):
        for _ in range(int(rng.integers(12, 24))):
            x, y = rng.integers(0, size, 2)
            r = _scaled(int(rng.integers(2, 4)), size)
            draw.ellipse((int(x) - r, int(y) - r, int(x) + r, int(y) + r), fill=colour)
    return paint


CLASSES: dict[str, Painter] = {
    "red_circle": _circle((220, 40, 40)),
    "blue_square": _square((40, 80, 220)),
    "green_triangle": _triangle((40, 180, 60)),
    "purple_ring": _ring((150, 60, 190)),
    "orange_cross": _cross((240, 140, 30)),
    "yellow_stripes": _stripes((235, 215, 40)),
    "cyan_checkers": _checkers((40, 200, 210)),
    "white_dots": _dots((245, 245, 245)),
}


def draw_image(label: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One uint8 (size, size, 3) image of class ``label``."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must lie in 0..{len(CLASSES) - 1}, found {label}.")
    background = rng.integers(20, 90, 3)
    pixels = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    list(CLASSES.values())[label](ImageDraw.Draw(image), rng, size)
    return np.asarray(image)


def write_synthetic_dataset(root: str | Path, images_per_class: int = 32, size: int = 64, seed: int = 0,
                            num_classes: int = len(CLASSES)) -> Path:
    """Write an ImageFolder tree of ``num_classes`` × ``images_per_class`` PNGs; deterministic in ``seed``."""
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must lie in 1..{len(CLASSES)}, found {num_classes}.")
    root = Path(root)
    for label, name in enumerate(list(CLASSES)[:num_classes]):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            rng = np.random.default_rng([seed, label, index])
            with atomic_write(folder / f"{index:05d}.png") as tmp:
                Image.fromarray(draw_image(label, rng, size)).save(tmp, format="PNG")
    return root
