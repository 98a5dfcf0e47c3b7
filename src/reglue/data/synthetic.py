"""Built-in labelled image datasets drawn procedurally: nothing downloaded, nothing stored in git.

Two variants, chosen by name (:data:`SYNTHETIC_SETS`, :func:`class_names`):

- ``"colours"`` (the demo's): eight classes a person tells apart at a glance by colour, shape and
  texture (``red_circle``, ``yellow_stripes`` ...), each image with a random position, size and a
  noisy background. Colour alone nearly separates them.
- ``"shapes"``: twelve classes that differ by shape and layout only (:data:`SHAPES`). The figure's
  colour, position, size and rotation and the background's colour and texture (pixel noise, faint
  stripes at a random angle) are random per image, so colour carries no class information;
  ``dots_side_by_side`` and ``dots_stacked`` are the same two dots in two layouts (their rotation
  stays within ±15° so the layouts stay apart). Class names are in alphabetical order, so a
  label here is the same index an ImageFolder reader gives the class.

Image ``index`` of class ``label`` is drawn from ``np.random.default_rng([seed, label, index])``, and

    write_synthetic_dataset("demo/images", images_per_class=32, size=64, seed=0, variant="shapes")

writes an ImageFolder tree (``<class>/<index>.png``) that ``reglue prepare`` reads like any other.
Pictures are drawn natively at ``size`` (any side; the demo draws at its training resolution):
shapes are fractions of the side, and the painters' fixed lengths (stripe period, checker cell,
dot radius) are given for 64 pixels and scaled, so a class looks the same at every side (the
pixel noise is drawn per pixel, so one seed's pictures at two sides are not rescaled copies).
The shapes are drawn at :data:`SUPERSAMPLE` × the side and box-filtered down (antialiased), so
they stay legible at 64².
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from reglue.encoders.pixel import LUMINANCE
from reglue.errors import InputError
from reglue.io import atomic_write

Painter = Callable[[ImageDraw.ImageDraw, np.random.Generator, int], None]
DRAWN_AT = 64  # the side the painters' fixed lengths (stripe period, cell, dot radius) are given for
SUPERSAMPLE = 4  # the shapes are drawn at 4× the side, then box-filtered down: antialiased edges


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


# ----------------------------------------------------------------------------- "colours"
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


def _draw_colours(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """One uint8 (size, size, 3) image of colour class ``label``: a noisy dark background, one painter."""
    background = rng.integers(20, 90, 3)
    pixels = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    list(CLASSES.values())[label](ImageDraw.Draw(image), rng, size)
    return np.asarray(image)


# ----------------------------------------------------------------------------- "shapes"
@dataclass(frozen=True)
class Figure:
    """A shape class: polygons in the unit disc, painted in order, and how far it may turn.

    ``parts``: ((n, 2) vertices, paints) pairs; a part that does not paint erases (a ring's hole).
    ``max_turn``: the rotation is uniform in ±max_turn radians (π: any angle).
    """

    parts: tuple[tuple[np.ndarray, bool], ...]
    max_turn: float = np.pi


LAYOUT_TURN = np.pi / 12  # ±15°: side by side stays side by side, stacked stays stacked


def _regular(corners: int, radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0),
             inner: float | None = None) -> np.ndarray:
    """(corners, 2) regular polygon, one corner up; with ``inner`` a star of 2·corners vertices."""
    count = corners if inner is None else 2 * corners
    angles = -np.pi / 2 + 2 * np.pi * np.arange(count) / count
    radii = np.full(count, radius) if inner is None else np.where(np.arange(count) % 2, inner, radius)
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)


def _disc(radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(96, 2): a disc as a polygon, round to within 0.1 px at 512²."""
    return _regular(96, radius, centre)


def _outline(*points: tuple[float, float]) -> np.ndarray:
    return np.array(points, dtype=np.float64)


def _paint(*polygons: np.ndarray) -> tuple[tuple[np.ndarray, bool], ...]:
    return tuple((polygon, True) for polygon in polygons)


SHAPES: dict[str, Figure] = {  # alphabetical: the labels ImageFolder readers give these folders
    "arrow": Figure(_paint(_outline((-0.95, -0.14), (0.15, -0.14), (0.15, 0.14), (-0.95, 0.14)),
                           _outline((0.1, -0.55), (0.95, 0.0), (0.1, 0.55)))),
    "circle": Figure(_paint(_disc(0.9))),
    "crescent": Figure(((_disc(0.95), True), (_disc(0.8, (0.45, 0.0)), False))),
    "cross": Figure(_paint(_outline((-0.95, -0.2), (0.95, -0.2), (0.95, 0.2), (-0.95, 0.2)),
                           _outline((-0.2, -0.95), (0.2, -0.95), (0.2, 0.95), (-0.2, 0.95)))),
    "dots_side_by_side": Figure(_paint(_disc(0.38, (-0.55, 0.0)), _disc(0.38, (0.55, 0.0))), LAYOUT_TURN),
    "dots_stacked": Figure(_paint(_disc(0.38, (0.0, -0.55)), _disc(0.38, (0.0, 0.55))), LAYOUT_TURN),
    "l_shape": Figure(_paint(_outline((-0.5, -0.8), (-0.1, -0.8), (-0.1, 0.3), (0.6, 0.3), (0.6, 0.7),
                                      (-0.5, 0.7)))),
    "pentagon": Figure(_paint(_regular(5))),
    "ring": Figure(((_disc(1.0), True), (_disc(0.6), False))),
    "square": Figure(_paint(_regular(4))),
    "star": Figure(_paint(_regular(5, inner=0.42))),
    "triangle": Figure(_paint(_regular(3))),
}
MIN_LUMA_CONTRAST = 50  # figure and background differ by at least this much luma (0-255): always visible


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array(LUMINANCE))


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two uniform random float (3,) RGB colours (background, figure) at least MIN_LUMA_CONTRAST apart."""
    while True:
        background, figure = rng.uniform(0, 255, (2, 3))
        if abs(_luma(background) - _luma(figure)) >= MIN_LUMA_CONTRAST:
            return background, figure


def _background(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """float (size, size, 3): ``colour``, with faint stripes at a random angle in half the images."""
    canvas = np.broadcast_to(colour, (size, size, 3)).copy()
    if rng.random() < 0.5:
        period = rng.uniform(6, 16) * size / DRAWN_AT
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:size, 0:size]
        wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)  # (size, size)
        canvas += rng.uniform(6, 18) * wave[..., None]
    return canvas


def figure_coverage(figure: Figure, rng: np.random.Generator, size: int) -> np.ndarray:
    """float (size, size) coverage in [0, 1] of ``figure`` at a random place, size and rotation."""
    radius = rng.uniform(0.18, 0.36) * size  # the unit disc's radius: the figure spans 36-72 % of the side
    centre = rng.uniform(radius, size - radius, 2)
    turn = rng.uniform(-figure.max_turn, figure.max_turn)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    mask = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for vertices, paints in figure.parts:
        points = (vertices @ rotation.T * radius + centre) * SUPERSAMPLE  # (n, 2) pixels of the big mask
        draw.polygon([tuple(p) for p in points.tolist()], fill=255 if paints else 0)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float64) / 255


def _draw_shape(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """One uint8 (size, size, 3) image of shape class ``label``: random colours, textured background."""
    background, colour = _contrasting_colours(rng)
    canvas = _background(rng, size, background)
    alpha = figure_coverage(list(SHAPES.values())[label], rng, size)[..., None]  # (size, size, 1)
    pixels = canvas * (1 - alpha) + colour * alpha + rng.normal(0, rng.uniform(3, 12), (size, size, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the variants
@dataclass(frozen=True)
class SyntheticSet:
    """A built-in variant: class names in label order; ``draw(label, rng, size)`` -> uint8 (size, size, 3)."""

    classes: tuple[str, ...]
    draw: Callable[[int, np.random.Generator, int], np.ndarray]


SYNTHETIC_SETS: dict[str, SyntheticSet] = {
    "colours": SyntheticSet(tuple(CLASSES), _draw_colours),
    "shapes": SyntheticSet(tuple(SHAPES), _draw_shape),
}


def _synthetic_set(variant: str) -> SyntheticSet:
    if variant not in SYNTHETIC_SETS:
        raise InputError(f"unknown synthetic variant {variant!r}; choose one of {', '.join(SYNTHETIC_SETS)}.")
    return SYNTHETIC_SETS[variant]


def class_names(variant: str = "colours") -> tuple[str, ...]:
    """The class names of ``variant`` in label order."""
    return _synthetic_set(variant).classes


def draw_image(label: int, rng: np.random.Generator, size: int = 64, *,
               variant: str = "colours") -> np.ndarray:
    """One uint8 (size, size, 3) image of class ``label`` of ``variant``."""
    synthetic = _synthetic_set(variant)
    if not 0 <= label < len(synthetic.classes):
        raise InputError(f"label must lie in 0..{len(synthetic.classes) - 1} for the {variant!r} set, "
                         f"found {label}.")
    return synthetic.draw(label, rng, size)


def write_synthetic_dataset(root: str | Path, images_per_class: int = 32, size: int = 64, seed: int = 0,
                            num_classes: int | None = None, *, variant: str = "colours") -> Path:
    """Write an ImageFolder tree of ``num_classes`` (default: all) × ``images_per_class`` PNGs of ``variant``.

    Deterministic in ``seed``: image ``index`` of class ``label`` is drawn with
    ``np.random.default_rng([seed, label, index])``.
    """
    names = class_names(variant)
    num_classes = len(names) if num_classes is None else num_classes
    if not 1 <= num_classes <= len(names):
        raise InputError(f"num_classes must lie in 1..{len(names)} for the {variant!r} set, "
                         f"found {num_classes}.")
    root = Path(root)
    for label, name in enumerate(names[:num_classes]):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            rng = np.random.default_rng([seed, label, index])
            with atomic_write(folder / f"{index:05d}.png") as tmp:
                Image.fromarray(draw_image(label, rng, size, variant=variant)).save(tmp, format="PNG")
    return root
