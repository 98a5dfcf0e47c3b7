"""The built-in synthetic datasets: deterministic, labelled, readable by `reglue prepare`.

The "colours" set is the demo's and must not change; the "shapes" set separates its classes by
shape and layout only, so colour must carry no class information."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from reglue.data.sources import open_source
from reglue.data.synthetic import (
    CLASSES,
    SHAPES,
    SUPERSAMPLE,
    class_names,
    draw_image,
    figure_coverage,
    write_synthetic_dataset,
)
from reglue.resolution import RESOLUTIONS

# sha256 of the "colours" pixels at sides 32, 64, 128 (labels 0-7, indices 0-1, seed 0), as drawn
# before the "shapes" set existed: the demo's pictures stay byte-identical.
COLOURS_SHA256 = "c762add285a20fa132f5067fcd1cb48839851e7073bc25f1d9f3896cad6a86fc"


def colour_thumbnails(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 (N, H, W, 3) with H, W multiples of ``side`` -> float (N, side·side·3) block means in [0, 1]."""
    n, h, w, _ = images.shape
    blocks = images.reshape(n, side, h // side, side, w // side, 3).mean(axis=(2, 4)) / 255
    return blocks.reshape(n, -1)


def labelled_images(variant: str, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (K·per_class, 64, 64, 3) images of every class of ``variant``, their (K·per_class,) labels."""
    labels = np.repeat(np.arange(len(class_names(variant))), per_class)
    images = [draw_image(int(k), np.random.default_rng([seed, k, i]), 64, variant=variant)
              for i, k in enumerate(labels)]
    return np.stack(images), labels


def halvings(image: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 (2n, 2n, 3) -> {how: float (n, n, 3)}: the picture downscaled 2× by every usual means."""
    half = image.shape[0] // 2
    halved = {f"PIL {f.name}": np.asarray(Image.fromarray(image).resize((half, half), f), dtype=np.float64)
              for f in Image.Resampling}  # NEAREST, BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS
    halved["2×2 mean"] = image.reshape(half, 2, half, 2, 3).mean(axis=(1, 3))
    halved["even pixels"], halved["odd pixels"] = image[::2, ::2].astype(np.float64), image[1::2, 1::2].astype(np.float64)
    return halved


def discs(figure) -> set[tuple[float, float, float]]:
    """{(centre x, centre y, radius)} of the painted parts of ``figure``, each taken for a disc."""
    return {(*np.round(v.mean(0), 6).tolist(), round(float(np.linalg.norm(v - v.mean(0), axis=1).max()), 6))
            for v, paints in figure.parts if paints}


def test_dataset_is_deterministic_and_an_image_folder(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", images_per_class=3, size=32, seed=5)
    b = write_synthetic_dataset(tmp_path / "b", images_per_class=3, size=32, seed=5)
    c = write_synthetic_dataset(tmp_path / "c", images_per_class=3, size=32, seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 3 * len(CLASSES)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    source = open_source(a)
    assert source.class_names == sorted(CLASSES) and len(source.items) == 3 * len(CLASSES)


def test_colours_pictures_are_unchanged():
    digest = hashlib.sha256()
    for size in (32, 64, 128):
        for label in range(len(CLASSES)):
            for index in range(2):
                image = draw_image(label, np.random.default_rng([0, label, index]), size, variant="colours")
                digest.update(image.tobytes())
    assert digest.hexdigest() == COLOURS_SHA256
    assert class_names() == class_names("colours") == tuple(CLASSES)


def test_classes_differ_in_colour_statistics():
    means = []
    for label in range(len(CLASSES)):
        images = np.stack([draw_image(label, np.random.default_rng([0, label, i]), 64) for i in range(8)])
        means.append(images.reshape(-1, 3).mean(0))
    means = np.array(means)
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(len(CLASSES), dtype=bool)].min() > 2.0  # every pair of classes differs


@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_are_deterministic_at_every_side_and_labelled_like_an_image_folder(tmp_path, size):
    a = write_synthetic_dataset(tmp_path / "a", images_per_class=1, size=size, seed=5, variant="shapes")
    b = write_synthetic_dataset(tmp_path / "b", images_per_class=1, size=size, seed=5, variant="shapes")
    c = write_synthetic_dataset(tmp_path / "c", images_per_class=1, size=size, seed=6, variant="shapes")
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == len(SHAPES)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    source = open_source(a)
    assert source.class_names == list(class_names("shapes"))  # alphabetical: a label is its folder's index
    image = draw_image(0, np.random.default_rng([5, 0, 0]), size, variant="shapes")
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("size", RESOLUTIONS)
@pytest.mark.parametrize("variant", ["colours", "shapes"])
def test_both_variants_draw_every_class_at_every_resolution(variant, size):
    for label in range(len(class_names(variant))):
        image = draw_image(label, np.random.default_rng([0, label, 0]), size, variant=variant)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert image.reshape(-1, 3).std(0).max() > 10  # a picture, not a flat fill
        assert np.array_equal(image, draw_image(label, np.random.default_rng([0, label, 0]), size, variant=variant))


@pytest.mark.parametrize("variant", ["colours", "shapes"])
def test_pictures_are_drawn_natively_at_each_side_not_downscaled(variant):
    """One seed's 128² picture is no 2× downscale of its 256² picture, by any usual filter.

    A picture drawn at 256² (or 512²) and downscaled would match one of these halvings to within
    rounding (max ≤ 2, mean ≈ 0.5 at worst: box from 512² checked). Drawn natively, "colours" places its figure elsewhere (the
    per-pixel noise consumes the generator first; max ≥ 49 found) and "shapes", whose figure sits at
    the same place, has fresh per-pixel noise at each side (max ≥ 18, mean ≥ 2.6 found, every filter).
    """
    for label in range(len(class_names(variant))):
        small = draw_image(label, np.random.default_rng([0, label, 0]), 128, variant=variant).astype(np.float64)
        big = draw_image(label, np.random.default_rng([0, label, 0]), 256, variant=variant)
        for how, halved in halvings(big).items():
            difference = np.abs(small - halved)
            assert difference.max() > 10 and difference.mean() > 1.5, (label, how, difference.max(), difference.mean())


def test_shapes_have_twelve_classes_two_of_them_one_layout_apart():
    assert len(class_names("shapes")) == 12
    side_by_side, stacked = SHAPES["dots_side_by_side"], SHAPES["dots_stacked"]
    quarter_turn = {(-y, x, r) for x, y, r in discs(side_by_side)}
    assert len(discs(side_by_side)) == 2 and discs(stacked) == quarter_turn
    assert side_by_side.max_turn < np.pi / 4 and stacked.max_turn < np.pi / 4  # no turn swaps the layouts


def test_shapes_edges_are_antialiased():
    """The figure's coverage blends at its edge (17 levels at 4× supersampling), not 0 or 1 only."""
    alpha = figure_coverage(SHAPES["circle"], np.random.default_rng(0), 64)  # (64, 64) in [0, 1]
    edge = (alpha > 0) & (alpha < 1)
    assert edge.sum() > 40 and len(np.unique(alpha)) == SUPERSAMPLE**2 + 1
    assert alpha.max() == 1.0 and alpha.min() == 0.0


def test_shape_classes_carry_no_colour_information():
    """Nearest-class-mean on 4×4 colour thumbnails (40 images per class) is at chance for the shapes
    and far above it for the colours; per-class mean colours spread no more than chance (F ≈ 1)."""
    per_class = 40
    for variant, low, high in [("shapes", 0.0, 2 / 12), ("colours", 0.6, 1.0)]:
        count = len(class_names(variant))
        train, train_labels = labelled_images(variant, per_class, seed=0)
        test, test_labels = labelled_images(variant, per_class, seed=1)
        train_features, test_features = colour_thumbnails(train, 4), colour_thumbnails(test, 4)
        means = np.stack([train_features[train_labels == k].mean(0) for k in range(count)])  # (K, 48)
        nearest = ((test_features[:, None] - means[None]) ** 2).sum(-1).argmin(1)
        accuracy = (nearest == test_labels).mean()
        assert low <= accuracy <= high, (variant, accuracy)
        colour = train.reshape(len(train), -1, 3).mean(1)  # (N, 3) mean colour of each image
        class_colour = np.stack([colour[train_labels == k].mean(0) for k in range(count)])  # (K, 3)
        within = np.mean([colour[train_labels == k].var(0, ddof=1) for k in range(count)], axis=0)
        f_ratio = class_colour.var(0, ddof=1) / (within / per_class)  # (3,): ≈ 1 if one colour law for all
        assert (f_ratio < 4).all() if variant == "shapes" else (f_ratio > 50).all(), (variant, f_ratio)


def test_one_shape_class_comes_in_many_colours():
    star = class_names("shapes").index("star")
    stars = np.stack([draw_image(star, np.random.default_rng([0, star, i]), 64, variant="shapes")
                      for i in range(8)])
    assert stars.reshape(8, -1, 3).mean(1).std(0).min() > 40  # per channel, over the 8 images' mean colours


def test_bad_arguments():
    with pytest.raises(ValueError, match="label must lie"):
        draw_image(99, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"label must lie in 0..11 for the 'shapes' set"):
        draw_image(12, np.random.default_rng(0), variant="shapes")
    with pytest.raises(ValueError, match="num_classes must lie"):
        write_synthetic_dataset("unused", num_classes=0)
    with pytest.raises(ValueError, match=r"num_classes must lie in 1..12"):
        write_synthetic_dataset("unused", num_classes=13, variant="shapes")
    unknown = r"unknown synthetic variant 'circle'; choose one of colours, shapes\."
    with pytest.raises(ValueError, match=unknown):
        class_names("circle")
