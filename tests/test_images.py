"""Robust image reading and the ADM centre crop (reglue.data.images)."""

from __future__ import annotations

import io
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import shared_file
from reglue.data.images import BadImageError, adm_center_crop, load_image

# ---------------------------------------------------------------------------------------------
# ADM centre crop against sizes worked out by hand.
# (input W×H, target, box-halving sizes, bicubic size, crop offset (left, top))
CROP_CASES = [
    ((517, 389), 256, [], (340, 256), (42, 0)),  # 517·256/389 = 340.24
    ((389, 517), 256, [], (256, 340), (0, 42)),
    ((1024, 200), 256, [], (1311, 256), (527, 0)),  # 1024·1.28 = 1310.72
    ((256, 256), 256, [], (256, 256), (0, 0)),
    ((2000, 1100), 256, [(1000, 550), (500, 275)], (465, 256), (104, 0)),  # 500·256/275 = 465.45
    ((1025, 2051), 256, [(512, 1025), (256, 512)], (256, 512), (0, 128)),  # short side = 2·256 halves
    ((45, 40), 100, [], (112, 100), (6, 0)),  # upsampling; 45·2.5 = 112.5 rounds half to even
]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def crop_by_hand(image, box_sizes, bicubic_size, offset, size) -> np.ndarray:
    for box_size in box_sizes:
        image = image.resize(box_size, Image.BOX)
    pixels = np.asarray(image.resize(bicubic_size, Image.BICUBIC))
    left, top = offset
    return pixels[top : top + size, left : left + size]


@pytest.mark.parametrize("input_size, size, box_sizes, bicubic_size, offset", CROP_CASES)
def test_adm_center_crop_matches_hand_computed_steps(input_size, size, box_sizes, bicubic_size, offset):
    image = noise_image(*input_size)
    cropped = adm_center_crop(image, size)
    assert cropped.dtype == np.uint8 and cropped.shape == (size, size, 3)
    np.testing.assert_array_equal(cropped, crop_by_hand(image, box_sizes, bicubic_size, offset, size))


def test_adm_center_crop_of_target_size_is_identity_and_writable():
    image = noise_image(256, 256, seed=3)
    cropped = adm_center_crop(image, 256)
    np.testing.assert_array_equal(cropped, np.asarray(image))
    cropped[0, 0] = 0  # a plain array the caller may modify


def test_adm_center_crop_rejects_non_rgb():
    with pytest.raises(ValueError, match="expects an RGB image, found mode L"):
        adm_center_crop(Image.new("L", (300, 300)), 256)


# ---------------------------------------------------------------------------------------------
# The real test images (tests/fixtures/testdata): every edge case handled as tests/fixtures/README.md lists it.
GREY_SOURCES = ["grey/camera.png", "grey/coins.png", "grey/text.png",
                "texture/brick.png", "texture/grass.png", "texture/gravel.png"]
KEPT = ["photo/astronaut.png", "photo/chelsea.png", "photo/coffee.png", "photo/rocket.jpg",
        *GREY_SOURCES, "edge_cases/cmyk.jpg", "edge_cases/rgba.png", "edge_cases/palette.png",
        "edge_cases/sixteen_bit.png", "edge_cases/exif_rotated.jpg", "edge_cases/very_wide.jpg"]
REJECTED = {
    "edge_cases/tiny_8x8.png": "too small: 8×8 < minimum 32 px short side",
    "edge_cases/truncated.jpg": "truncated or corrupt: image file is truncated",
    "edge_cases/zero_bytes.png": "zero-byte file",
    "edge_cases/not_an_image.jpg": "not an image",
}


def stored_image(path) -> Image.Image:
    """The file as PIL decodes it, without our rules (file closed)."""
    with Image.open(path) as image:
        image.load()
        return image


@pytest.fixture(scope="module")
def real_images():
    return shared_file("testdata/real_images")


def test_every_real_image_file_has_an_expected_outcome(real_images):
    found = {p.relative_to(real_images).as_posix() for p in real_images.rglob("*") if p.is_file()}
    assert found == set(KEPT) | set(REJECTED)


@pytest.mark.parametrize("name", KEPT)
def test_real_images_are_kept_and_cropped(real_images, name):
    image = load_image(real_images / name)
    assert image.mode == "RGB"
    cropped = adm_center_crop(image, 256)
    assert cropped.dtype == np.uint8 and cropped.shape == (256, 256, 3)


@pytest.mark.parametrize("name, reason", REJECTED.items())
def test_bad_real_images_raise_with_their_reason(real_images, name, reason):
    with pytest.raises(BadImageError) as caught:
        load_image(real_images / name)
    assert str(caught.value).startswith(reason)
    assert caught.value.reason == str(caught.value)


@pytest.mark.parametrize("name", [*GREY_SOURCES, "edge_cases/sixteen_bit.png"])
def test_grey_images_have_three_equal_channels(real_images, name):
    assert stored_image(real_images / name).mode in ("L", "I;16")
    pixels = np.asarray(load_image(real_images / name))
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    assert pixels.std() > 0


def test_cmyk_and_palette_match_the_rgb_original(real_images):
    coffee = np.asarray(load_image(real_images / "photo/coffee.png"), dtype=np.float64)
    for name in ("edge_cases/cmyk.jpg", "edge_cases/palette.png"):
        assert stored_image(real_images / name).mode in ("CMYK", "P")
        pixels = np.asarray(load_image(real_images / name), dtype=np.float64)
        assert np.abs(pixels - coffee).mean() < 6, name  # lossy copies; inverted CMYK would be ~100


def test_alpha_is_dropped_keeping_stored_colours(real_images):
    stored = np.asarray(stored_image(real_images / "edge_cases/rgba.png"))
    assert (stored[..., 3] < 255).any()  # compositing would change these pixels
    np.testing.assert_array_equal(np.asarray(load_image(real_images / "edge_cases/rgba.png")), stored[..., :3])


def test_exif_orientation_is_ignored(real_images):
    path = real_images / "edge_cases/exif_rotated.jpg"
    raw = stored_image(path)
    assert raw.getexif().get(0x0112) == 6 and ImageOps.exif_transpose(raw).size == (600, 400)
    image = load_image(path)
    assert image.size == raw.size == (400, 600)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(raw.convert("RGB")))


def test_real_sixteen_bit_png_keeps_its_picture(real_images):
    """The shared file stores coffee.png's grey levels (0..255) in a 16-bit PNG."""
    path = real_images / "edge_cases/sixteen_bit.png"
    raw = np.asarray(stored_image(path))
    assert raw.dtype == np.uint16 and raw.max() <= 255
    pixels = np.asarray(load_image(path))
    np.testing.assert_array_equal(pixels[..., 0], raw.astype(np.uint8))
    coffee_grey = np.asarray(stored_image(real_images / "photo/coffee.png").convert("L"))
    assert abs(pixels.mean() - coffee_grey.mean()) < 1.0 and pixels.mean() < 250


def test_bytes_and_zip_members_give_the_same_image(real_images, tmp_path):
    path = real_images / "photo/rocket.jpg"
    expected = np.asarray(load_image(path))
    data = path.read_bytes()
    for source in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(np.asarray(load_image(source)), expected)
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(path, "photo/rocket.jpg")
    with zipfile.ZipFile(archive) as handle:
        np.testing.assert_array_equal(np.asarray(load_image(handle.read("photo/rocket.jpg"))), expected)


# ---------------------------------------------------------------------------------------------
# Rules on synthetic files.
def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def test_full_range_sixteen_bit_png_is_scaled_where_pil_would_clip_to_white():
    grey = np.random.default_rng(1).integers(0, 256, (40, 48)).astype(np.uint16)
    data = encoded(Image.fromarray(grey * 257), "PNG")  # 16-bit: 0..65535
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    clipped = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (clipped == 255).mean() > 0.99  # PIL's own conversion saturates every value ≥ 256
    np.testing.assert_array_equal(np.asarray(load_image(data)), np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("mode, dtype, values, expected", [
    ("I;16B", ">u2", [0, 128, 129, 385, 25700, 65535], [0, 0, 1, 1, 100, 255]),  # 128/257 < ½ < 129/257
    ("I", np.int32, [0, 128, 129, 25700, 70000, -5], [0, 0, 1, 100, 255, 0]),  # out of range: clipped
    ("I;16B", ">u2", [0, 17, 200, 255], [0, 17, 200, 255]),  # 8-bit data in a 16-bit container: kept
])
def test_other_sixteen_bit_modes_round_and_clip(mode, dtype, values, expected):
    pixels = np.repeat(np.repeat(np.array([values], dtype=dtype), 32, axis=1), 32, axis=0)  # (32, 32·n)
    data = encoded(Image.fromarray(pixels), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(data))[0, ::32, 0], expected)


def test_float_images_are_rejected():
    data = encoded(Image.new("F", (40, 40), 0.5), "TIFF")
    with pytest.raises(BadImageError, match="unsupported mode F"):
        load_image(data)


def test_palette_with_transparency_and_grey_alpha_become_rgb_silently():
    palette_image = noise_image(40, 40).quantize(16)
    data = encoded(palette_image, "PNG", transparency=bytes([0] * 8 + [255] * 8))
    la = Image.merge("LA", [noise_image(40, 40).convert("L"), Image.new("L", (40, 40), 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(data)
        grey = load_image(encoded(la, "PNG"))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(palette_image.convert("RGB")))
    np.testing.assert_array_equal(np.asarray(grey)[..., 1], np.asarray(la)[..., 0])


def test_min_size_is_the_short_side_and_configurable():
    data = encoded(noise_image(60, 40), "PNG")
    assert load_image(data, min_size=40).size == (60, 40)
    with pytest.raises(BadImageError, match="too small: 60×40 < minimum 41 px short side"):
        load_image(data, min_size=41)
    assert load_image(encoded(noise_image(8, 8), "PNG"), min_size=8).size == (8, 8)


def test_decompression_bombs_are_rejected(monkeypatch):
    data = encoded(noise_image(60, 40), "PNG")  # 2400 pixels
    for limit in (1500, 1000):  # PIL warns above the limit and errors above twice the limit
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(BadImageError, match="decompression-bomb guard"):
            load_image(data)


def test_broken_png_chunk_is_corrupt_not_a_crash():
    data = bytearray(encoded(noise_image(200, 200), "PNG"))  # incompressible: two IDAT chunks
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)
    data[second : second + 4] = b"ID\xcdT"  # PIL raises SyntaxError("broken PNG file") here
    with pytest.raises(BadImageError, match=r"truncated or corrupt: broken PNG file"):
        load_image(bytes(data))


@pytest.mark.parametrize("name", ["photo/coffee.png", "photo/rocket.jpg"])
def test_damaged_files_give_an_image_or_bad_image_error(real_images, name):
    data = (real_images / name).read_bytes()
    rng = np.random.default_rng(0)
    outcomes = set()
    for trial in range(30):
        damaged = bytearray(data)
        if trial % 2:
            damaged = damaged[: rng.integers(1, len(damaged))]
        else:
            for position in rng.integers(0, len(damaged), 8):
                damaged[position] = rng.integers(0, 256)
        try:
            outcomes.add(load_image(bytes(damaged)).mode)
        except BadImageError:
            outcomes.add("bad")
    assert "bad" in outcomes and outcomes <= {"RGB", "bad"}


def test_missing_file_is_not_a_bad_image(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
