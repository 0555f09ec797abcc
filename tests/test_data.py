"""Calibration images (fxeq.data): decoding every kind of file, skipped files, and unreadable ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fxeq.data import ImageFiles, UnreadableImageError, calibration_loader, find_images, generate_images

RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # no normalization: pixels on the 0..1 scale


def pixels(path: Path, size: int = 16) -> torch.Tensor:
    return ImageFiles([path], size=size, **RAW)[0]


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path: Path) -> None:
    """The same random image as an 8-bit and a 16-bit PNG (PIL mode I;16) gives the same pixels."""
    deep = np.random.default_rng(0).integers(0, 65536, (24, 32), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray((deep / 257).round().astype(np.uint8)).save(tmp_path / "shallow.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    deep_pixels, shallow_pixels = pixels(tmp_path / "deep.png"), pixels(tmp_path / "shallow.png")
    assert abs(deep_pixels.mean() - 0.5) < 0.05  # not saturated at 1
    assert abs(deep_pixels.mean() - shallow_pixels.mean()) < 1 / 255
    torch.testing.assert_close(deep_pixels, shallow_pixels, atol=2 / 255, rtol=0)


@pytest.mark.parametrize(
    ("mode", "name"),
    [("L", "gray.png"), ("RGBA", "rgba.png"), ("P", "palette.png"), ("LA", "gray-alpha.png"), ("RGB", "rgb.webp"),
     ("L", "gray.jpg"), ("CMYK", "cmyk.jpg")],
)
def test_every_kind_of_image_is_read_as_rgb(mode: str, name: str, tmp_path: Path) -> None:
    """A flat colour in any mode comes out as the RGB colour PIL gives it."""
    image = Image.new("RGB", (30, 20), (200, 100, 50)).convert(mode, dither=Image.Dither.NONE)
    image.save(tmp_path / name, lossless=True)  # webp's option; the other formats ignore it
    expected = torch.tensor(Image.open(tmp_path / name).convert("RGB").getpixel((15, 10)), dtype=torch.float32) / 255
    x = pixels(tmp_path / name)
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x[:, 8, 8], expected, atol=2 / 255, rtol=0)


def test_normalization_and_crop(tmp_path: Path) -> None:
    """Shorter side resized to size, centre cropped, then (x - mean) / std per channel."""
    Image.new("RGB", (40, 20), (255, 0, 51)).save(tmp_path / "wide.png")
    x = ImageFiles([tmp_path / "wide.png"], size=8, mean=(0.5, 0.5, 0.1), std=(0.5, 0.25, 0.1))[0]
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -2.0, 1.0]))


def test_webp_images_are_found(tmp_path: Path) -> None:
    generate_images(tmp_path, 1, size=8)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.WEBP")
    assert [p.name for p in find_images(tmp_path)] == ["generated-texture-000.png", "photo.WEBP"]
    assert next(iter(calibration_loader(tmp_path, size=8, batch_size=2))).shape == (2, 3, 8, 8)


def test_other_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    generate_images(tmp_path, 2, size=8)
    for name in ("labels.txt", "a.bmp", "sub/b.BMP", "notes"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 4 files in .* whose extension is not jpg/jpeg/png/webp: "
                                         r"1 \(no extension\), 2 \.bmp, 1 \.txt; .* convert them to png"):
        assert len(find_images(tmp_path)) == 2


def test_one_other_file_is_counted_in_the_singular(tmp_path: Path) -> None:
    generate_images(tmp_path, 2, size=8)
    (tmp_path / "labels.txt").write_text("")
    with pytest.warns(UserWarning, match=r"skipped 1 file in .*: 1 \.txt"):
        find_images(tmp_path)


def test_a_folder_of_other_files_only_is_an_error(tmp_path: Path) -> None:
    for name in ("a.bmp", "b.tif"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds no jpg/jpeg/png/webp image, only other files: 1 \.bmp, 1 \.tif\. "
                                         r"Convert the images to jpg/jpeg/png/webp"):
        find_images(tmp_path)


@pytest.mark.parametrize(("count", "found"), [(0, "found 0 images"), (1, "found 1 image in")])
def test_too_few_images(count: int, found: str, tmp_path: Path) -> None:
    if count:
        generate_images(tmp_path, count, size=8)
    with pytest.raises(ValueError, match=f"{found} .*need at least 2 .* Add jpg/jpeg/png/webp images"):
        calibration_loader(tmp_path, size=8, batch_size=2)


def test_a_file_that_is_not_an_image_is_refused_before_any_work(tmp_path: Path) -> None:
    generate_images(tmp_path, 2, size=8)
    (tmp_path / "broken.png").write_text("not a png")
    with pytest.raises(UnreadableImageError, match=r"broken\.png is not a readable image \(.*\); remove it, or save "
                                                   r"it again as jpg/jpeg/png/webp"):
        calibration_loader(tmp_path, size=8, batch_size=2)


def test_a_truncated_png_names_the_file_when_read(tmp_path: Path) -> None:
    """Its header is fine, so the loader is built; decoding it raises UnreadableImageError (a ValueError)."""
    (path,) = generate_images(tmp_path, 1, size=32)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:200])
    loader = calibration_loader(tmp_path, size=8, batch_size=2)
    with pytest.raises(UnreadableImageError, match=r"truncated\.png is not a readable image \((?!.*\.cpp:).*corrupt"):
        next(iter(loader))
    assert issubclass(UnreadableImageError, ValueError)
