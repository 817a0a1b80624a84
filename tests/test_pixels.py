"""Every PIL mode becomes the 8-bit RGB values it should (`promptclip.clip.pixels.to_rgb`), read through the one
reader the datasets use (`open_rgb`) from files where the format allows, else from the image in memory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptclip.clip.pixels import to_rgb
from promptclip.clip.transforms import pil_to_tensor
from promptclip.data.datasets.base import open_rgb


def saved(image: Image.Image, path: Path) -> Image.Image:
    image.save(path)
    return open_rgb(path)


def rgb(*values: tuple[int, int, int]) -> np.ndarray:
    return np.array([values], dtype=np.uint8)


def grey(*values: int) -> np.ndarray:
    return rgb(*((v, v, v) for v in values))


def test_rgb_and_grey_and_bilevel(tmp_path: Path) -> None:
    colours = rgb((10, 20, 30), (200, 100, 0))
    assert np.array_equal(np.asarray(saved(Image.fromarray(colours), tmp_path / "a.png")), colours)
    grey_image = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert np.array_equal(np.asarray(saved(grey_image, tmp_path / "l.png")), grey(0, 77, 255))
    bilevel = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    assert np.array_equal(np.asarray(saved(bilevel, tmp_path / "b.png")), grey(0, 255))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_grey_is_scaled_by_its_bit_depth(tmp_path: Path, suffix: str) -> None:
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    image = saved(Image.fromarray(values), tmp_path / f"a{suffix}")
    # v * 255 / 65535, rounded: 257 -> 1, 1000 -> 3.89 -> 4, 32768 -> 127.5 -> 128
    assert np.array_equal(np.asarray(image), grey(0, 1, 4, 128, 255))


def test_a_tiff_declaring_twelve_bits_is_scaled_by_twelve(tmp_path: Path) -> None:
    path = tmp_path / "a.tif"
    Image.fromarray(np.array([[0, 2048, 4095]], dtype=np.uint16)).save(path)
    with Image.open(path) as image:
        image.load()
        image.tag_v2[258] = (12,)  # BitsPerSample, as a 12-bit camera writes it
        assert np.array_equal(np.asarray(to_rgb(image)), grey(0, 128, 255))  # 2048 * 255 / 4095 = 127.5


def test_sixteen_bit_pgm_read_as_mode_i(tmp_path: Path) -> None:
    path = tmp_path / "a.pgm"
    path.write_bytes(b"P5\n3 1\n65535\n" + np.array([0, 32768, 65535], dtype=">u2").tobytes())
    with Image.open(path) as image:
        assert image.mode == "I"
    assert np.array_equal(np.asarray(open_rgb(path)), grey(0, 128, 255))


def test_mode_i_without_a_declared_depth() -> None:
    within_16_bits = Image.fromarray(np.array([[0, 300, 65535]], dtype=np.int32))
    assert within_16_bits.mode == "I"
    assert np.array_equal(np.asarray(to_rgb(within_16_bits)), grey(0, 1, 255))
    beyond = Image.fromarray(np.array([[-5, 70000, 2**31 - 1]], dtype=np.int32))
    assert np.array_equal(np.asarray(to_rgb(beyond)), grey(0, 0, 255))  # 31 bits; negative -> 0


def test_float_grey_in_zero_to_one_is_scaled_and_otherwise_clipped(tmp_path: Path) -> None:
    unit = Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32))
    assert np.array_equal(np.asarray(saved(unit, tmp_path / "unit.tif")), grey(0, 64, 128, 255))
    wide = Image.fromarray(np.array([[-3.0, 0.4, 100.0, 300.0, np.nan]], dtype=np.float32))
    assert np.array_equal(np.asarray(saved(wide, tmp_path / "wide.tif")), grey(0, 0, 100, 255, 0))


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [100, 0, 0, 128]]], dtype=np.uint8))
    # 100 * 128 / 255 + 255 * 127 / 255 = 177.2 -> 177; 0 -> 127
    expected = rgb((255, 255, 255), (10, 20, 30), (177, 127, 127))
    assert np.array_equal(np.asarray(saved(rgba, tmp_path / "a.png")), expected)
    la = Image.fromarray(np.array([[[200, 0], [200, 255], [0, 128]]], dtype=np.uint8), mode="LA")
    assert np.array_equal(np.asarray(saved(la, tmp_path / "la.png")), grey(255, 200, 127))


def test_a_palette_with_a_transparent_entry_is_composited_on_white(tmp_path: Path) -> None:
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2])
    palette.info["transparency"] = 0  # entry 0 (black) is transparent
    expected = rgb((255, 255, 255), (0, 255, 0), (0, 0, 255))
    assert np.array_equal(np.asarray(saved(palette, tmp_path / "p.png")), expected)
    del palette.info["transparency"]
    assert np.array_equal(np.asarray(saved(palette, tmp_path / "q.png")), rgb((0, 0, 0), (0, 255, 0), (0, 0, 255)))


def test_premultiplied_alpha() -> None:
    premultiplied = Image.new("RGBa", (1, 1), (50, 0, 0, 128))  # straight colour ~ (100, 0, 0)
    assert np.array_equal(np.asarray(to_rgb(premultiplied)), rgb((177, 127, 127)))


def test_cmyk(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(128, 0, 0, 128), (0, 0, 0, 0)])
    # R = (255 - C)(255 - K) / 255 = 127 * 127 / 255 = 63.25; G = B = 255 * 127 / 255 = 127
    assert np.array_equal(np.asarray(saved(cmyk, tmp_path / "a.tif")), rgb((63, 127, 127), (255, 255, 255)))
    buffer = io.BytesIO()
    cmyk.save(buffer, "JPEG", quality=100)  # PIL undoes the Adobe inversion on reading
    (tmp_path / "a.jpg").write_bytes(buffer.getvalue())
    assert np.abs(np.asarray(open_rgb(tmp_path / "a.jpg")).astype(int) - [[[63, 127, 127], [255, 255, 255]]]).max() <= 3


def test_the_tensor_path_uses_the_same_rule() -> None:
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    pixels = pil_to_tensor(sixteen)
    assert pixels.shape == (3, 1, 3)
    assert [round(v * 255) for v in pixels[0, 0].tolist()] == [0, 128, 255]
