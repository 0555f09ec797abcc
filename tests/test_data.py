"""Calibration images (fxeq.data): decoding every kind of file, skipped and unreadable files, batches and ranks."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fxeq.cli.images import (
    BatchShard,
    CalibrationImageError,
    ImageFiles,
    ImageProcessorTransform,
    UnreadableImageError,
    calibration_loader,
    find_images,
    generate_images,
)


def pixels(path: Path, size: int = 16) -> torch.Tensor:
    """An image on the 0..1 scale (no normalization)."""
    return ImageFiles([path], size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))[0]


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


# ---------------------------------------------------------------------------
# Batches: none dropped, sharded across ranks, the model's own preprocessing
# ---------------------------------------------------------------------------

def _paths_of(loader: DataLoader[torch.Tensor]) -> list[list[str]]:
    """The file names in each batch of a loader, as its batch sampler gives them to this rank."""
    paths = cast(ImageFiles, loader.dataset).paths
    return [[paths[i].name for i in batch] for batch in cast(BatchShard, loader.batch_sampler)]


@pytest.mark.parametrize(("count", "sizes"), [(4, [2, 2]), (5, [2, 3]), (3, [3]), (7, [2, 2, 3])])
def test_a_last_image_on_its_own_joins_the_batch_before_it(count: int, sizes: list[int], tmp_path: Path) -> None:
    generate_images(tmp_path, count, size=8)
    loader = calibration_loader(tmp_path, size=8, batch_size=2)
    assert [len(b) for b in loader] == sizes  # every image, in batches of at least 2
    assert sum(sizes) == count


@pytest.mark.parametrize(("count", "world_size"), [(8, 2), (7, 3), (5, 2), (13, 4)])
def test_each_image_is_on_exactly_one_rank_in_the_batches_one_process_would_form(
    count: int, world_size: int, tmp_path: Path
) -> None:
    generate_images(tmp_path, count, size=8)
    single = _paths_of(calibration_loader(tmp_path, size=8, batch_size=2))
    shards = [_paths_of(calibration_loader(tmp_path, size=8, batch_size=2, rank=r, world_size=world_size))
              for r in range(world_size)]
    expected = [batch for r in range(world_size) for batch in single[r::world_size]]
    assert [batch for shard in shards for batch in shard] == expected
    names = [name for shard in shards for batch in shard for name in batch]
    assert sorted(names) == sorted(p.name for p in find_images(tmp_path))  # each exactly once


def test_num_batches_counts_the_batches_of_all_ranks(tmp_path: Path) -> None:
    generate_images(tmp_path, 10, size=8)
    shards = [calibration_loader(tmp_path, size=8, batch_size=2, num_batches=3, rank=r, world_size=2) for r in (0, 1)]
    assert [_paths_of(s) for s in shards] == [
        [["generated-texture-000.png", "generated-texture-001.png"],
         ["generated-texture-004.png", "generated-texture-005.png"]],
        [["generated-texture-002.png", "generated-texture-003.png"]],
    ]
    assert cast(BatchShard, shards[1].batch_sampler).images == 6


@pytest.mark.parametrize(("count", "world_size", "words"), [
    (2, 3, r"found 2 images in .*, which make 1 batch of up to 2, fewer than the 3 processes calibrating: each "
           r"process calibrates on whole batches of its own\. Add images, lower --batch-size \(at least 2\), or "
           r"start at most 1 process\."),
    (5, 3, r"found 5 images in .*, which make 2 batches of up to 3, fewer than the 3 processes .* start at most 2 "
           r"processes\."),
], ids=["more-ranks-than-images", "more-ranks-than-batches"])
def test_more_ranks_than_batches_is_an_error(count: int, world_size: int, words: str, tmp_path: Path) -> None:
    generate_images(tmp_path, count, size=8)
    with pytest.raises(ValueError, match=words):
        calibration_loader(tmp_path, size=8, batch_size=2, rank=0, world_size=world_size)


class Processor:
    """An image processor as transformers calls it: resizes to ``size`` and scales to 0..1, with a recorded call."""

    def __init__(self, size: tuple[int, int] | None = (6, 5)) -> None:
        self.size = size
        self.calls: list[tuple[tuple[int, ...], torch.dtype, dict[str, object]]] = []

    def __call__(self, images: torch.Tensor, **kwargs: object) -> dict[str, torch.Tensor]:
        self.calls.append((tuple(images.shape), images.dtype, kwargs))
        size = self.size or tuple(images.shape[-2:])
        x = torch.nn.functional.interpolate(images[None].float() / 255, size=size, mode="bilinear")
        return {"pixel_values": x}


def test_the_models_image_processor_replaces_size_mean_and_std(tmp_path: Path) -> None:
    """It gets each decoded image as uint8 (a 16-bit PNG scaled down), channels first, and its output is batched."""
    deep = np.random.default_rng(0).integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    Image.fromarray(deep[..., 0]).save(tmp_path / "a-deep.png")
    generate_images(tmp_path, 2, size=16)
    processor = Processor()
    (batch,) = calibration_loader(tmp_path, size=99, batch_size=3, preprocess=ImageProcessorTransform(processor))
    assert batch.shape == (3, 3, 6, 5)
    assert processor.calls[0] == ((3, 12, 10), torch.uint8, {"return_tensors": "pt",
                                                              "input_data_format": "channels_first"})
    assert 0.4 < batch[0].mean() < 0.6  # 16-bit pixels scaled to uint8, not saturated


def test_images_of_different_sizes_after_preprocessing_are_an_error(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 12)).save(tmp_path / "b.png")
    loader = calibration_loader(tmp_path, batch_size=2, preprocess=ImageProcessorTransform(Processor(size=None)))
    with pytest.raises(CalibrationImageError, match=r"the preprocessing gave the images of one batch different sizes "
                                                    r"\(3x8x8 and 3x12x8\), so they cannot be batched; expected one "
                                                    r"size\. Make the image processor resize to a fixed size"):
        next(iter(loader))


# ---------------------------------------------------------------------------
# Trust, round 2: huge images, linked folders, EXIF orientation, channels
# ---------------------------------------------------------------------------

def test_an_image_over_pils_decompression_bomb_limit_is_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(2):
        Image.new("RGB", (40, 30), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1200 pixels: over twice the limit, a DecompressionBombError
    batch = next(iter(calibration_loader(tmp_path, size=8, batch_size=2)))
    assert batch.shape == (2, 3, 8, 8)


def test_linked_folders_are_followed_once(tmp_path: Path) -> None:
    real, calib = tmp_path / "real", tmp_path / "calib"
    real.mkdir()
    calib.mkdir()
    Image.new("RGB", (8, 8)).save(real / "a.png")
    Image.new("RGB", (8, 8)).save(calib / "b.png")
    (calib / "linked").symlink_to(real, target_is_directory=True)
    (calib / "loop").symlink_to(calib, target_is_directory=True)  # a cycle: read once
    assert [p.name for p in find_images(calib)] == ["b.png", "a.png"]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.jpg")
    shapes = [tuple(ImageFiles([tmp_path / n], preprocess=lambda x: x.float())[0].shape)
              for n in ("rotated.jpg", "plain.jpg")]
    assert shapes == [(3, 40, 20), (3, 20, 40)]


@pytest.mark.parametrize("channels", [1, 4])
def test_images_are_decoded_as_the_models_channels(channels: int, tmp_path: Path) -> None:
    for i in range(2):
        Image.new("RGB", (12, 12), (200, 100, 50)).save(tmp_path / f"{i}.png")
    mean, std = (0.0,) * channels, (1.0,) * channels
    batch = next(iter(calibration_loader(tmp_path, size=8, batch_size=2, channels=channels, mean=mean, std=std)))
    assert batch.shape == (2, channels, 8, 8)
    if channels == 4:
        assert torch.allclose(batch[:, 3], torch.ones(2, 8, 8))  # opaque: the file has no alpha
    with pytest.raises(ValueError, match=rf"mean and std need {channels} value"):
        calibration_loader(tmp_path, size=8, batch_size=2, channels=channels)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"size": 0}, r"the image size must be a positive number of pixels, got 0"),
    ({"channels": 2}, r"channels must be one of 1, 3, 4 \(grayscale, RGB, RGBA\), got 2"),
    ({"batch_size": 1}, r"the batch size must be at least 2, got 1: calibration runs batch normalization with batch "
                        r"statistics .* Use a batch size of 2 or more\."),
    ({"rank": 2, "world_size": 2}, r"expected 0 <= rank < world_size, got rank=2, world_size=2"),
], ids=["size", "channels", "batch-size", "rank"])
def test_bad_loader_arguments(kwargs: dict[str, int], words: str, tmp_path: Path) -> None:
    """The command line's parser refuses these first; the loader refuses them too, named by its arguments."""
    generate_images(tmp_path, 2, size=8)
    with pytest.raises(ValueError, match=words):
        calibration_loader(tmp_path, **{"size": 8, "batch_size": 2, **kwargs})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated-texture-000.png", "generated-texture-001.png"]


def test_a_missing_calibration_folder_names_calib(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--calib .*nowhere does not exist or is not a folder; pass a folder "
                                                r"of jpg/jpeg/png/webp images \(searched recursively\)"):
        find_images(tmp_path / "nowhere")


@pytest.mark.parametrize(("count", "size"), [(0, 8), (1, 1)])
def test_generate_images_needs_an_image_of_2x2_pixels(count: int, size: int, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"need at least one image of at least 2x2 pixels, got count={count}, "
                                         rf"size={size}"):
        generate_images(tmp_path / "out", count, size=size)
    assert not (tmp_path / "out").exists()
