"""Calibration images for the command line: a folder of images as a DataLoader.

fxeq measures each fusion input's mean and std on calibration batches, so the
command line needs batches from image files: :func:`calibration_loader` finds
the images under a folder (following linked sub-folders once), decodes them
with ``torchvision.io.decode_image`` (8- and 16-bit, grayscale, palette and
RGBA files alike, turned upright by their EXIF orientation) as the model's
channels (1: grayscale, 3: RGB, 4: RGBA), resizes (shorter side) and
center-crops them to one size, scales them to 0..1 by their bit depth,
normalizes them as the model was trained, and batches them;
or hands each decoded image to a model's own preprocessing (a Hugging Face
image processor, through :class:`ImageProcessorTransform`). Calibration runs
batch normalization with batch statistics, which fails on batches of one
sample where a feature map is 1x1 (ASPP image pooling), so the loader insists
on batches of at least two, and never drops an image to get them.

Under ``torchrun`` each process calibrates on its own share of the batches
(:class:`BatchShard`: batch ``k`` goes to rank ``k % world_size``), and fxeq
merges the statistics of all ranks. The batches are the ones a single process
would form, so the merged statistics equal a single process's.

:func:`generate_images` writes synthetic multi-scale textures for ``fxeq demo``,
so that the demo runs with nothing downloaded. They exercise the pipeline; they
are no substitute for real training images.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .._text import plural
from .._torchvision import torchvision

__all__ = [
    "CHANNELS", "GENERATED_PREFIX", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "BatchShard",
    "CalibrationImageError", "ImageFiles", "ImageProcessorTransform", "UnreadableImageError", "calibration_loader",
    "default_normalization", "find_images", "generate_images",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNELS = {1: "grayscale", 3: "RGB", 4: "RGBA"}
"""The channel counts images are decoded as: the model's input channels."""
GENERATED_PREFIX = "generated-texture-"
_KINDS = "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
_CPP_LOCATION = re.compile(r"^.*\.cpp:\d+, ")  # torchvision prefixes its errors with the C++ source line


Preprocess = Callable[[torch.Tensor], torch.Tensor]
"""One decoded image, ``uint8`` of shape ``(3, H, W)``, → the model's input for it, ``(3, h, w)`` float."""


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The default mean and std for images of ``channels`` channels: ImageNet's, or None where there is none.

    RGB gets ImageNet's; grayscale ImageNet's averaged over R, G and B; RGBA
    none (no common convention for alpha: pass the training normalization).

    Example:
        >>> default_normalization(1), default_normalization(4)
        (((0.449,), (0.226,)), None)
    """
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        return (round(sum(IMAGENET_MEAN) / 3, 3),), (round(sum(IMAGENET_STD) / 3, 3),)
    return None


class CalibrationImageError(ValueError):
    """The calibration images cannot be used as they are: unreadable, or of different sizes once preprocessed."""


class UnreadableImageError(CalibrationImageError):
    """A calibration file is not an image that can be decoded."""


def find_images(folder: str | Path) -> list[Path]:
    """The image files under ``folder``, searched recursively, in sorted order.

    Files ending in one of :data:`IMAGE_SUFFIXES` (any case) count. Other
    files are skipped with a warning that counts them by extension.

    Raises:
        FileNotFoundError: ``folder`` is not an existing folder.
        ValueError: ``folder`` holds files, but none of them is an image.

    Example:
        >>> import tempfile, warnings
        >>> with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     for name in ("b.PNG", "a.jpg", "notes.txt"):
        ...         _ = (Path(d) / name).write_bytes(b"")
        ...     [p.name for p in find_images(d)], str(caught[0].message).split(": ")[1]
        (['a.jpg', 'b.PNG'], '1 .txt; to calibrate on images among them, convert them to png')
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--calib {root} does not exist or is not a folder; pass a folder of {_KINDS} images (searched "
            "recursively)"
        )
    files = _files_under(root)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = Counter(p.suffix.lower() or "(no extension)" for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
    if not others:
        return images
    found = ", ".join(f"{n} {suffix}" for suffix, n in sorted(others.items()))
    if not images:
        raise ValueError(
            f"--calib {root} holds no {_KINDS} image, only other files: {found}. Convert the images to {_KINDS}, "
            "or pass the folder that holds them"
        )
    warnings.warn(
        f"skipped {plural(others.total(), 'file')} in {root} whose extension is not {_KINDS}: {found}; "
        "to calibrate on images among them, convert them to png",
        stacklevel=2,
    )
    return images


def _files_under(root: Path) -> list[Path]:
    """Every file under ``root``, sorted, following linked folders once each (a link loop is read once)."""
    seen: set[str] = set()
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        for name in names:
            path = Path(folder, name)
            if path.is_file():
                files.setdefault(os.path.realpath(path), path)
    return sorted(files.values())


class ImageFiles(Dataset[torch.Tensor]):
    """Image files as normalized ``(channels, size, size)`` float tensors.

    Each image is turned upright by its EXIF orientation and decoded as
    ``channels`` channels (3: RGB, grayscale repeated and alpha dropped; 1:
    grayscale; 4: RGBA, opaque where the file has no alpha), resized so that
    its shorter side is ``size``, center-cropped to ``size`` x ``size``,
    scaled to 0..1 by its bit depth (a 16-bit PNG by 65535) and normalized
    with ``mean`` and ``std`` (per channel, on the 0..1 scale). With
    ``preprocess``, the decoded RGB image (scaled to ``uint8``) goes to it
    instead, and ``size``, ``mean``, ``std`` and ``channels`` are not used.

    Args:
        paths: the image files.
        size: output height and width. Default: 512.
        mean: per-channel mean. Default: ImageNet's.
        std: per-channel std. Default: ImageNet's.
        preprocess: the model's own preprocessing, e.g. an
            :class:`ImageProcessorTransform`. Default: None.
        channels: 1, 3 or 4 (:data:`CHANNELS`). Default: 3.

    Raises:
        UnreadableImageError: on indexing, when the file cannot be decoded.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     Image.new("RGB", (40, 30), (255, 0, 0)).save(Path(d) / "red.png")
        ...     x = ImageFiles(find_images(d), size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))[0]
        >>> x.shape, x[:, 0, 0].tolist()
        (torch.Size([3, 16, 16]), [1.0, -1.0, -1.0])
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        size: int = 512,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        preprocess: Preprocess | None = None,
        channels: int = 3,
    ) -> None:
        io, v2 = torchvision("io"), torchvision("transforms.v2")
        self.paths = list(paths)
        self.size = size
        modes = {1: io.ImageReadMode.GRAY, 3: io.ImageReadMode.RGB, 4: io.ImageReadMode.RGB_ALPHA}
        self.mode = modes[3 if preprocess is not None else channels]
        self.rgb, self.rgba = modes[3], modes[4]
        self.decode = io.decode_image
        self.transform: Preprocess
        if preprocess is not None:
            self.transform = v2.Compose([v2.ToDtype(torch.uint8, scale=True), preprocess])
        else:  # resize before the float conversion: the integer path keeps flat colours exact, and is faster
            self.transform = v2.Compose([
                v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                v2.CenterCrop(size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(mean), list(std)),
            ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        opaque = self.mode == self.rgba and path.suffix.lower() in (".jpg", ".jpeg")  # JPEG has no alpha to read
        try:
            image = self.decode(str(path), mode=self.rgb if opaque else self.mode, apply_exif_orientation=True)
        except (OSError, RuntimeError) as e:
            raise _unreadable(path, e) from e
        if opaque:
            image = torch.cat([image, torch.full_like(image[:1], torch.iinfo(image.dtype).max)])
        return self.transform(image)


class ImageProcessorTransform:
    """A Hugging Face image processor as a :data:`Preprocess`: one decoded image → its ``pixel_values``.

    The processor resizes, rescales and normalizes as the model's
    ``preprocessor_config.json`` says. Nothing here imports transformers: any
    object called as ``processor(images=image, return_tensors="pt",
    input_data_format="channels_first")`` that returns a mapping with a
    ``"pixel_values"`` batch works.

    Example:
        >>> class Halve:
        ...     def __call__(self, images, **kwargs):
        ...         return {"pixel_values": images[None].float() / 2}
        >>> ImageProcessorTransform(Halve())(torch.full((3, 2, 2), 8, dtype=torch.uint8))[:, 0, 0].tolist()
        [4.0, 4.0, 4.0]
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.processor(images=image, return_tensors="pt", input_data_format="channels_first")
        return out["pixel_values"][0]


@dataclass(frozen=True)
class BatchShard:
    """A batch sampler: one rank's share of the calibration batches.

    ``batches`` are every rank's batches (lists of image indices), formed as
    one process would form them; this rank iterates batch ``k`` for every
    ``k % world_size == rank``. Each image is on exactly one rank.

    Example:
        >>> shard = BatchShard(((0, 1), (2, 3), (4, 5, 6)), rank=1, world_size=2)
        >>> list(shard), len(shard)
        ([[2, 3]], 1)
    """

    batches: tuple[tuple[int, ...], ...]
    rank: int = 0
    world_size: int = 1

    def __iter__(self) -> Iterator[list[int]]:
        return (list(batch) for batch in self.batches[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(self.batches[self.rank::self.world_size])

    @property
    def images(self) -> int:
        """Images in all ranks' batches together."""
        return sum(map(len, self.batches))


def calibration_loader(
    folder: str | Path,
    *,
    size: int = 512,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 4,
    preprocess: Preprocess | None = None,
    num_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    channels: int = 3,
) -> DataLoader[torch.Tensor]:
    """Batches of the images under ``folder``, ready for calibration.

    Batches hold at least two images, because batch normalization with batch
    statistics needs two samples where a feature map is 1x1: a last image
    left on its own joins the batch before it (``batch_size + 1`` images), so
    that no image is dropped.

    Args:
        folder: searched recursively for :data:`IMAGE_SUFFIXES` files.
        size: images are resized (shorter side) and center-cropped to this.
            Default: 512.
        mean: per-channel normalization mean, 0..1 scale. Default: ImageNet's.
        std: per-channel normalization std. Default: ImageNet's.
        batch_size: images per batch, at least 2. Default: 4.
        preprocess: the model's own preprocessing instead of ``size``,
            ``mean`` and ``std`` (see :class:`ImageFiles`). Default: None.
        num_batches: use only the first this many batches (of all ranks
            together). Default: all.
        rank: this process's rank under ``torch.distributed``. Default: 0.
        world_size: the number of processes; each takes its share of the
            batches (:class:`BatchShard`). Default: 1.
        channels: decode the images as 1 (grayscale), 3 (RGB) or 4 (RGBA)
            channels; ``mean`` and ``std`` need as many values. Default: 3.

    Returns:
        A DataLoader of ``(batch, channels, size, size)`` tensors, in file order,
        whose ``batch_sampler`` is a :class:`BatchShard`.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: bad size, mean, std, batch size or rank, fewer than two
            images, or fewer batches than ranks.
        UnreadableImageError: a file whose header is not an image's; a file
            that fails to decode later raises it while iterating.
        CalibrationImageError: while iterating, when ``preprocess`` gives the
            images of one batch different sizes.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     for i in range(5):
        ...         Image.new("RGB", (24, 20)).save(Path(d) / f"{i}.png")
        ...     [tuple(b.shape) for b in calibration_loader(d, size=8, batch_size=2)]
        [(2, 3, 8, 8), (3, 3, 8, 8)]
    """
    if size < 1:
        raise ValueError(f"the image size must be a positive number of pixels, got {size}")
    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {', '.join(map(str, CHANNELS))} ({', '.join(CHANNELS.values())}), "
                         f"got {channels}")
    if preprocess is None and (len(mean) != channels or len(std) != channels or min(std) <= 0):
        raise ValueError(
            f"mean and std need {plural(channels, 'value')} ({CHANNELS[channels]}) and std must be positive; got "
            f"mean={tuple(mean)}, std={tuple(std)}. Use the normalization the model was trained with, e.g. "
            f"ImageNet's mean={IMAGENET_MEAN}, std={IMAGENET_STD} for RGB."
        )
    if batch_size < 2:
        raise ValueError(
            f"the batch size must be at least 2, got {batch_size}: calibration runs batch normalization "
            "with batch statistics (as in training), which needs 2 samples per batch where a feature map "
            "is 1x1 (e.g. ASPP image pooling). Use a batch size of 2 or more."
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    paths = find_images(folder)
    if len(paths) < 2:
        raise ValueError(
            f"found {plural(len(paths), 'image')} in --calib {folder}, need at least 2 (batch normalization with "
            f"batch statistics needs 2 samples per batch). Add {_KINDS} images from the training set; a few "
            "hundred give stable statistics."
        )
    batches = _batches(len(paths), batch_size)[:num_batches]
    if len(batches) < world_size:
        raise ValueError(
            f"found {plural(len(paths), 'image')} in --calib {folder}, which make "
            f"{plural(len(batches), 'batch', 'batches')} of up to {max(map(len, batches))}, fewer than the "
            f"{world_size} processes calibrating: each process calibrates on whole batches of its own. Add images, "
            f"lower --batch-size (at least 2), or start at most {plural(len(batches), 'process', 'processes')}."
        )
    for path in paths:  # fail before any work on a file that is not an image (reads headers only)
        _check_header(path)
    dataset = ImageFiles(paths, size=size, mean=mean, std=std, preprocess=preprocess, channels=channels)
    return DataLoader(dataset, batch_sampler=BatchShard(batches, rank, world_size), collate_fn=_stack)


def generate_images(folder: str | Path, count: int, *, size: int = 128, seed: int = 0) -> list[Path]:
    """Write ``count`` synthetic RGB textures as PNG files named ``generated-texture-NNN.png``.

    Each image sums smooth random noise at every scale from 2x2 cells up to
    the pixel grid, with amplitude falling with frequency (as in natural
    images), so that features at every level of a network see structure.
    They are generated, not real data: use them to try fxeq, not to
    calibrate a model you will train.

    Args:
        folder: created if missing.
        count: number of images.
        size: height and width. Default: 128.
        seed: random seed; the same seed gives the same images. Default: 0.

    Returns:
        The files written.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     files = generate_images(d, 2, size=32)
        ...     [p.name for p in files], Image.open(files[0]).size
        (['generated-texture-000.png', 'generated-texture-001.png'], (32, 32))
    """
    if count < 1 or size < 2:
        raise ValueError(f"need at least one image of at least 2x2 pixels, got count={count}, size={size}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    files = []
    for i in range(count):
        texture = torch.zeros(1, 3, size, size)
        for octave in range(1, int(math.log2(size)) + 1):
            cells = min(2**octave, size)
            noise = torch.randn(1, 3, cells, cells, generator=generator)
            texture += F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False) / cells**0.5
        texture = (texture - texture.mean()) / texture.std()
        pixels = (torch.sigmoid(1.5 * texture[0]) * 255).round().to(torch.uint8).permute(1, 2, 0)
        path = root / f"{GENERATED_PREFIX}{i:03d}.png"
        Image.fromarray(pixels.numpy()).save(path)
        files.append(path)
    return files


def _check_header(path: Path) -> None:
    """Refuse a file whose header is not an image's; a very large image is fine (torchvision decodes it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(path).close()
    except Image.DecompressionBombError:
        return  # PIL's guard against huge images: the header was read, and decode_image has no such limit
    except Exception as e:  # OSError; or what a patched Image.open raises instead (Ultralytics tries pi_heif)
        cause = e if isinstance(e, OSError) or not isinstance(e.__context__, OSError) else e.__context__
        raise _unreadable(path, cause) from e


def _batches(count: int, batch_size: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive batches of ``batch_size`` indices; a last index on its own joins the batch before it.

    Example:
        >>> _batches(5, 2), _batches(6, 4)
        (((0, 1), (2, 3, 4)), ((0, 1, 2, 3), (4, 5)))
    """
    batches = [tuple(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [batches[-2] + batches[-1]]
    return tuple(batches)


def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Collate preprocessed images into a batch; a clear error when their sizes differ."""
    shapes = [tuple(x.shape) for x in images]
    if len(set(shapes)) > 1:
        other = next(s for s in shapes if s != shapes[0])
        raise CalibrationImageError(
            f"the preprocessing gave the images of one batch different sizes ({_shape(shapes[0])} and "
            f"{_shape(other)}), so they cannot be batched; expected one size. Make the image processor resize to "
            'a fixed size (e.g. "size": {"height": 512, "width": 512} in preprocessor_config.json), or resize '
            "the images to one size first."
        )
    return torch.stack(list(images))


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _unreadable(path: Path, error: Exception) -> UnreadableImageError:
    lines = str(error).strip().splitlines()
    detail = _CPP_LOCATION.sub("", lines[0]) if lines else type(error).__name__
    return UnreadableImageError(
        f"calibration file {path} is not a readable image ({detail}); remove it, or save it again as {_KINDS}"
    )
