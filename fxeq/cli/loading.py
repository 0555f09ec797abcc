"""What a command works on: the model with its checkpoint, the calibration images, the device.

Everything here is the user's input, so every failure is a usage error
(exit code 2) naming the flag or file to fix.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from .._text import plural
from . import checkpoints, hf
from .errors import UsageError, bad_input
from .images import (
    CHANNELS,
    BatchShard,
    ImageProcessorTransform,
    Preprocess,
    calibration_loader,
    default_normalization,
)
from .parser import AUTO_MODEL, DEFAULT_SIZE
from .torchrun import launched, note, ranks

__all__ = ["Loaded", "describe_calibration", "device", "is_folder", "load", "load_model", "model_record"]


@dataclass(frozen=True)
class Loaded:
    """A model ready for calibration, with what the report records about its input.

    Attributes:
        model: the model, with the checkpoint loaded, on ``device``.
        state: a checkpoint file's state_dict (its dtypes); empty for a folder.
        report: fxeq's report, if the checkpoint file holds one (a Lightning callback's state).
        loader: this process's calibration batches.
        preprocessing: what the report records about how images became inputs.
        device: where calibration runs.
    """

    model: nn.Module
    state: dict[str, torch.Tensor]
    report: dict[str, Any] | None
    loader: DataLoader[torch.Tensor]
    preprocessing: dict[str, Any]
    device: torch.device


def is_folder(args: argparse.Namespace) -> bool:
    """Whether CHECKPOINT is a Hugging Face save_pretrained folder."""
    return args.checkpoint is not None and hf.is_pretrained_folder(args.checkpoint)


def load(args: argparse.Namespace) -> Loaded:
    """The model (with the checkpoint loaded, on the device), its state and this process's calibration batches."""
    preprocess, preprocessing = _preprocessing(args)
    rank, world = ranks()
    with bad_input(), warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        loader = calibration_loader(
            args.calib, size=preprocessing.get("size", DEFAULT_SIZE), mean=preprocessing.get("mean", ()),
            std=preprocessing.get("std", ()), batch_size=args.batch_size, preprocess=preprocess,
            num_batches=args.num_batches, rank=rank, world_size=world, channels=preprocessing.get("channels", 3),
        )
    for warning in skipped:  # files in --calib that are not images: a warning, shown with --quiet too
        note(f"warning: {warning.message}")
    where = device(args.device)
    model, state, report = load_model(args)
    return Loaded(model.to(where), state, report, loader, preprocessing, where)


def load_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any] | None]:
    """The model with the checkpoint loaded, the checkpoint file's state_dict (empty for a folder), and the fxeq
    report the file holds (a Lightning checkpoint equalized by the callback), if any."""
    if is_folder(args):
        model_class = _resolve(args.model) if args.model else None
        with bad_input():
            return hf.load_pretrained(args.checkpoint, model_class, **args.model_kwargs), {}, None
    found = checkpoints.Checkpoint({})
    if args.checkpoint:
        with bad_input():
            found = checkpoints.read_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
    model = _build_model(args.model, args.model_kwargs)
    state = found.state
    if args.checkpoint:
        with bad_input():
            state = checkpoints.load_into(model, state)
    return model, state, found.report


def _preprocessing(args: argparse.Namespace) -> tuple[Preprocess | None, dict[str, Any]]:
    """How calibration images become inputs: the folder's image processor if it has one, else --size, --channels,
    --mean and --std.

    Returns:
        The image processor as a :data:`~fxeq.cli.images.Preprocess` (None for
        fxeq's own resize, crop and normalization), and what the report
        records about it.
    """
    processor = None
    if is_folder(args):
        with bad_input():
            processor = hf.load_image_processor(args.checkpoint)
    if processor is None:
        channels = args.channels or 3
        defaults = default_normalization(channels)
        for flag in ("--mean", "--std"):
            given = getattr(args, flag[2:])
            if given is None and defaults is None:
                raise UsageError(f"{flag}: --channels {channels} ({CHANNELS[channels]}) has no default "
                                 f"normalization; pass --mean and --std with {channels} values each, as the model "
                                 "was trained")
            if given is not None and len(given) != channels:
                raise UsageError(f"{flag} {','.join(f'{v:g}' for v in given)}: expected {plural(channels, 'value')}, "
                                 f"one per channel of --channels {channels} ({CHANNELS[channels]})")
        if args.std is not None and min(args.std) <= 0:
            raise UsageError(f"--std {','.join(f'{v:g}' for v in args.std)}: every std must be positive")
        mean = args.mean or (defaults[0] if defaults else ())
        std = args.std or (defaults[1] if defaults else ())
        return None, {
            "kind": "resize the shorter side, center crop, normalize", "size": args.size or DEFAULT_SIZE,
            "channels": channels, "mean": list(mean), "std": list(std),
        }
    config = args.checkpoint / hf.PREPROCESSOR_CONFIG
    given = [flag for flag in ("--size", "--mean", "--std", "--channels") if getattr(args, flag[2:]) is not None]
    if given:
        raise UsageError(
            f"{' and '.join(given)}: {config} holds the model's image processor, which resizes and normalizes "
            "the calibration images as the model expects, so fxeq does not; edit that file in a copy of the "
            "folder to calibrate at another size"
        )
    return ImageProcessorTransform(processor), {
        "kind": "image processor", "class": type(processor).__name__, "file": str(config.resolve()),
        "settings": json.loads(processor.to_json_string()),
    }


def _resolve(spec: str) -> Any:
    """Import MODULE and find CALLABLE in it."""
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as e:  # any import failure is the --model argument's
        raise UsageError(
            f"--model {spec}: could not import {module_name!r} ({type(e).__name__}: {e}); install it, or run "
            "fxeq from the folder that holds it"
        ) from e
    for part in attr.split("."):
        if not hasattr(target, part):
            close = difflib.get_close_matches(part, dir(target), n=3)
            raise UsageError(
                f"--model {spec}: {getattr(target, '__name__', module_name)} has no attribute {part!r}"
                + (f"; did you mean {' or '.join(close)}?" if close else "")
            )
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"--model {spec}: {attr} is a {type(target).__name__}, not a class or function")
    return target


def _build_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """Import MODULE, find CALLABLE in it and call it with ``kwargs``."""
    build = _resolve(spec)
    try:
        model = build(**kwargs)
    except Exception as e:  # whatever the builder raises is about --model-kwargs
        raise UsageError(
            f"--model {spec} with --model-kwargs {json.dumps(kwargs)} failed ({type(e).__name__}: {e}); check "
            "the keyword arguments (weights must be null: fxeq never downloads them)"
        ) from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def device(name: str) -> torch.device:
    """The device to calibrate on; under torchrun, ``cuda`` is each process's ``cuda:LOCAL_RANK``."""
    if name == "cuda" and launched():
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as e:  # torch raises RuntimeError or AssertionError here
        raise UsageError(f"--device {name}: not usable here ({e}); use --device cpu or an available device") from e
    return device


def describe_calibration(args: argparse.Namespace, loaded: Loaded) -> str:
    """What calibration runs on, e.g. ``5 images from calib/ (64x64 RGB, 2 batches of up to 3, cpu)``."""
    shard = cast(BatchShard, loaded.loader.batch_sampler)
    found = len(cast(Any, loaded.loader.dataset))
    images = plural(shard.images, "image") + (f" of the {found}" if shard.images < found else "")
    pre = loaded.preprocessing
    how = (f"{pre['class']} from {pre['file']}" if "class" in pre
           else f"{pre['size']}x{pre['size']} {CHANNELS[pre['channels']]}")
    batches = plural(len(shard.batches), "batch", "batches") + f" of up to {max(map(len, shard.batches))}"
    processes = f"; {shard.world_size} processes, batch k on rank k % {shard.world_size}" if shard.world_size > 1 else ""
    return f"{images} from {args.calib} ({how}, {batches}, {loaded.device}{processes})"


def model_spec(args: argparse.Namespace) -> str:
    """The --model given, or the class a save_pretrained folder is loaded with."""
    return cast(str, args.model or AUTO_MODEL)


def model_record(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """What the report records about the model: how it was built, and its class."""
    cls = type(model)
    return {"spec": model_spec(args), "kwargs": args.model_kwargs, "class": f"{cls.__module__}.{cls.__qualname__}"}
