"""stages.images: one decoder for every colour mode, EXIF orientation, the bomb guard, stats pixels, manifest."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.images import (MANIFEST_FIELDS, ImageDecodeError, _to_rgb8, load_rgb, read_manifest,
                           stats_transform)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR + IEND claiming `width` x `height` RGB pixels, with no pixel data (tiny file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **kwargs) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    buffer.seek(0)
    return buffer


def test_rgb_jpeg_path_and_file_object_give_same_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.jpg", quality=95)
    from_path, facts = load_rgb(tmp_path / "a.jpg")
    from_file, _ = load_rgb(io.BytesIO((tmp_path / "a.jpg").read_bytes()))
    assert facts == {"format": "JPEG", "mode": "RGB", "rotated": False, "width": 30, "height": 20}
    assert from_path.mode == "RGB" and from_path.size == (30, 20)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_file))


def test_exif_orientation_is_applied_and_sides_swap() -> None:
    # 40 wide x 20 high: left half red, right half blue. Orientation 6 = "rotate 90 degrees clockwise".
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    image, facts = load_rgb(encode(Image.fromarray(array), "JPEG", quality=100, exif=exif.tobytes()))
    assert facts["rotated"] is True
    assert image.size == (20, 40) and (facts["width"], facts["height"]) == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 50  # the left (red) half is now on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 50


def test_draft_decode_reports_full_size() -> None:
    image, facts = load_rgb(encode(Image.new("RGB", (400, 300), (10, 20, 30)), "JPEG"), draft_size=64)
    assert (facts["width"], facts["height"]) == (400, 300)
    assert image.size == (100, 75)  # scaled by 1/4: still at least 64 on each side


@pytest.mark.parametrize("mode, fmt, value, expected", [
    ("L", "PNG", 77, (77, 77, 77)),
    ("P", "GIF", None, (10, 200, 30)),
    ("CMYK", "JPEG", (0, 0, 0, 0), (255, 255, 255)),
    ("RGBA", "PNG", (10, 20, 30, 0), (255, 255, 255)),  # fully transparent: white background
    ("RGBA", "PNG", (10, 20, 30, 255), (10, 20, 30)),
    ("LA", "PNG", (100, 255), (100, 100, 100)),
])
def test_colour_modes_become_8bit_rgb(mode: str, fmt: str, value, expected) -> None:
    if mode == "P":
        image = Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = Image.new(mode, (8, 8), value)
    decoded, facts = load_rgb(encode(image, fmt))
    assert facts["mode"] == mode and facts["format"] == fmt
    assert decoded.mode == "RGB"
    np.testing.assert_allclose(np.asarray(decoded)[4, 4], expected, atol=2)  # JPEG may round by 1


def test_16bit_png_is_scaled_to_8bit() -> None:
    array = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    decoded, facts = load_rgb(encode(Image.fromarray(array), "PNG"))
    assert facts["mode"].startswith("I")
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_to_rgb8_32bit_integer_image_in_8bit_range_is_not_rescaled() -> None:
    image = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I")
    assert np.asarray(_to_rgb8(image))[0, :, 1].tolist() == [0, 100, 255]


def mode_files(root: Path, side: int = 4) -> dict[str, tuple[int, int, int]]:
    """One generated `side` x `side` file per colour mode and format the decode rule names; returns
    {name: expected RGB} of the pixel at (row 1, column 1) after decoding (JPEG within a rounding tolerance)."""
    root.mkdir(parents=True, exist_ok=True)
    size = (side, side)
    gray16 = np.full(size, 32896, dtype=np.uint16)  # 32896 / 257 = 128
    Image.new("L", size, 77).save(root / "l.png")
    Image.new("LA", size, (100, 0)).save(root / "la_clear.png")  # fully transparent: white
    Image.new("LA", size, (100, 255)).save(root / "la_opaque.png")
    Image.fromarray(gray16).save(root / "gray16.png")
    Image.fromarray(gray16).save(root / "gray16.tif")
    Image.fromarray(np.full(size, 200, dtype=np.int32), mode="I").save(root / "int32_8bit.tif")
    Image.fromarray(np.full(size, 65535, dtype=np.int32), mode="I").save(root / "int32_16bit.tif")
    Image.fromarray(np.full(size, 0.5, dtype=np.float32), mode="F").save(root / "float_unit.tif")
    Image.fromarray(np.full(size, 300.0, dtype=np.float32), mode="F").save(root / "float_over.tif")
    Image.new("CMYK", size, (0, 255, 0, 0)).save(root / "cmyk.tif")  # magenta ink only
    Image.new("CMYK", size, (0, 0, 0, 0)).save(root / "cmyk.jpg", quality=100)
    Image.new("1", size, 1).save(root / "bilevel.png")
    palette = Image.new("P", size, 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(root / "palette.png")
    palette.save(root / "palette_trns.png", transparency=1)  # index 1 transparent: white
    Image.new("RGBA", size, (10, 20, 30, 0)).save(root / "rgba_clear.png")
    half = Image.new("RGBA", size, (0, 0, 0, 128))  # half-transparent black over white
    half.save(root / "rgba_half.png")
    Image.new("RGB", size, (1, 2, 3)).save(root / "rgb_trns.png", transparency=(1, 2, 3))
    return {"l.png": (77,) * 3, "la_clear.png": (255,) * 3, "la_opaque.png": (100,) * 3,
            "gray16.png": (128,) * 3, "gray16.tif": (128,) * 3, "int32_8bit.tif": (200,) * 3,
            "int32_16bit.tif": (255,) * 3, "float_unit.tif": (128,) * 3, "float_over.tif": (255,) * 3,
            "cmyk.tif": (255, 0, 255), "cmyk.jpg": (255, 255, 255), "bilevel.png": (255,) * 3,
            "palette.png": (10, 200, 30), "palette_trns.png": (255,) * 3, "rgba_clear.png": (255,) * 3,
            "rgba_half.png": (127, 127, 127), "rgb_trns.png": (255,) * 3}


def test_every_mode_file_decodes_by_the_rule(tmp_path: Path) -> None:
    expected = mode_files(tmp_path)
    for name, rgb in expected.items():
        decoded, facts = load_rgb(tmp_path / name)
        assert decoded.mode == "RGB" and decoded.size == (4, 4), name
        np.testing.assert_allclose(np.asarray(decoded)[1, 1], rgb, atol=1, err_msg=name)
    assert load_rgb(tmp_path / "gray16.tif")[1]["mode"].startswith("I;16")
    assert load_rgb(tmp_path / "float_unit.tif")[1]["mode"] == "F"
    assert load_rgb(tmp_path / "cmyk.tif")[1]["mode"] == "CMYK"


def test_float_nan_is_black_and_negative_int_is_clipped() -> None:
    floats = Image.fromarray(np.array([[np.nan, 0.25, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(_to_rgb8(floats))[0, :, 0].tolist() == [0, 64, 255]
    ints = Image.fromarray(np.array([[-5, 257, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(_to_rgb8(ints))[0, :, 0].tolist() == [0, 1, 255]


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("TIFF", "tif"), ("JPEG", "jpg")])
def test_exif_orientation_applies_to_png_and_tiff_too(tmp_path: Path, fmt: str, suffix: str) -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display: the left half goes to the bottom
    kwargs = {"tiffinfo": {0x0112: 8}} if fmt == "TIFF" else {"exif": exif.tobytes()}  # TIFF: a tag of its own
    Image.fromarray(array).save(tmp_path / f"r.{suffix}", format=fmt, **kwargs)
    image, facts = load_rgb(tmp_path / f"r.{suffix}")
    assert facts["rotated"] is True and image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert pixels[35, 10, 0] > 200 and pixels[5, 10, 0] < 50


def test_report_thumbnail_uses_the_same_rule(tmp_path: Path) -> None:
    from stages.report_html import make_thumbnail

    expected = mode_files(tmp_path)
    for name in ("rgba_clear.png", "palette_trns.png", "gray16.tif", "cmyk.tif"):
        with Image.open(io.BytesIO(make_thumbnail(tmp_path / name))) as thumb:
            np.testing.assert_allclose(np.asarray(thumb.convert("RGB"))[1, 1], expected[name], atol=3,
                                       err_msg=name)


def test_prepare_keeps_every_mode_and_quarantines_the_corrupt(tmp_path: Path) -> None:
    from stages.params import parse_params
    from stages.prepare import prepare_dataset

    raw = tmp_path / "raw"
    for side, folder in enumerate(("train/modes", "train/other", "val/modes", "val/other"), start=4):
        expected = mode_files(raw / folder, side)  # a side of its own: no file is a duplicate of another
    (raw / "train/modes/corrupt.png").write_bytes((raw / "train/modes/l.png").read_bytes()[:40])
    params = parse_params({"backbones": ["efficientnet_lite0"], "prepare": {"num_workers": 0, "stats_size": 4}})
    prepared = prepare_dataset(raw, params, num_workers=0)
    assert [q["path"] for q in prepared.quarantine] == ["train/modes/corrupt.png"]
    assert len(prepared.manifest) == 4 * len(expected)


@pytest.mark.parametrize("data, match", [
    (b"", "not an image"),
    (b"hello, I am a text file\n", "not an image"),
    (png_header(100_000, 100_000), "decompression bomb"),  # PIL's hard limit, raised while opening
    (png_header(10_000, 9_500), "decompression bomb"),  # 95 Mpx: PIL only warns; the warning is an error here
])
def test_bad_inputs_raise_with_a_location_free_reason(data: bytes, match: str) -> None:
    with pytest.raises(ImageDecodeError, match=match) as err:
        load_rgb(io.BytesIO(data))
    assert "BytesIO" not in str(err.value)


def test_truncated_jpeg_raises() -> None:
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG").getvalue()
    with pytest.raises(ImageDecodeError, match="truncated|broken|OSError"):
        load_rgb(io.BytesIO(data[: len(data) // 2]))


def test_stats_transform_resizes_short_side_and_centre_crops() -> None:
    image = Image.new("RGB", (30, 10), (1, 2, 3))
    out = stats_transform(8)(image)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 8, 8)
    assert out[:, 4, 4].tolist() == [1, 2, 3]


def test_read_manifest_round_trip_and_wrong_columns(tmp_path: Path) -> None:
    good = tmp_path / "manifest.csv"
    good.write_text(",".join(MANIFEST_FIELDS) + "\ntrain/a/x y.jpg,a,0,train," + "0" * 64 + ",3,4\n",
                    encoding="utf-8")
    (row,) = read_manifest(good)
    assert (row.path, row.cls, row.label, row.split, row.width, row.height) == ("train/a/x y.jpg", "a", 0,
                                                                               "train", 3, 4)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class\nx,a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected columns path,class,label,split,sha256,width,height"):
        read_manifest(bad)
