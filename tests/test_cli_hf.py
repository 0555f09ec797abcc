"""The command line on Hugging Face save_pretrained folders: convert, inspect, apply, and what they refuse.

A tiny random Segformer is built from its config classes and saved with
``save_pretrained`` (nothing is downloaded), with an image processor that
resizes to 64x64. The runs call :func:`fxeq.cli.main` in this process (each
capture of the model costs seconds), one successful conversion per module.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_models import assert_fails, run_main
from PIL import Image

import fxeq
from fxeq.cli import outputs
from fxeq.cli.images import find_images, generate_images
from fxeq.report import FOLDER_REPORT

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

CALIB = ["--batch-size", "2"]


def _segformer() -> Any:
    config = T.SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2],
                               decoder_hidden_size=32, num_labels=3)
    return T.SegformerForSemanticSegmentation(config)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A save_pretrained folder, 4 images, and one ``fxeq convert FOLDER -o OUTDIR`` of it."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    folder = root / "segformer"
    _segformer().save_pretrained(folder)
    T.SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    images = root / "images"
    generate_images(images, 4, size=64, seed=3)
    output = root / "segformer-fxeq"
    result = run_main("convert", folder, "--calib", images, *CALIB, "-o", output)
    return {"folder": folder, "images": images, "output": output, "result": result, "root": root}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    model, info = T.AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True,
                                                                     output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.state_dict()


def test_convert_writes_a_folder_that_from_pretrained_loads(hf: dict[str, Any]) -> None:
    result, output = hf["result"], hf["output"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "Writing model shards" not in result.stderr and "Loading weights" not in result.stderr  # quiet
    assert "site cat -> decode_head.linear_fuse" in result.stdout
    assert f"wrote {output} (rescaled decode_head.linear_fuse;" in result.stdout
    assert f"wrote {output / 'fxeq.json'}" in result.stdout
    assert "SegformerImageProcessor from " in result.stderr  # how the images were prepared
    names = sorted(p.name for p in output.iterdir())
    assert names == ["config.json", "fxeq.json", "model.safetensors", "preprocessor_config.json"]
    assert sorted(p.name for p in hf["root"].iterdir()) == ["images", "segformer", "segformer-fxeq"]  # no temp left
    assert json.loads((output / "config.json").read_text())["architectures"] == ["SegformerForSemanticSegmentation"]
    processor = "preprocessor_config.json"
    assert (output / processor).read_bytes() == (hf["folder"] / processor).read_bytes()
    before, after = _weights(hf["folder"]), _weights(output)  # no missing or unexpected keys
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["decode_head.linear_fuse.weight"]  # no bias: the mean is not folded


def test_the_weights_are_those_of_transform_on_the_processors_batches(hf: dict[str, Any]) -> None:
    """The reference: the image processor called on the images, in file order, in batches of 2."""
    model = T.AutoModelForSemanticSegmentation.from_pretrained(hf["folder"], local_files_only=True)
    processor = T.AutoImageProcessor.from_pretrained(hf["folder"], local_files_only=True)
    files = find_images(hf["images"])
    batches = [processor(images=[Image.open(f).convert("RGB") for f in files[i:i + 2]],
                         return_tensors="pt")["pixel_values"] for i in range(0, len(files), 2)]
    fxeq.transform(model, batches, inplace=True, progress=False)
    expected, written = model.state_dict(), _weights(hf["output"])
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_the_report_says_which_preprocessing_was_used(hf: dict[str, Any]) -> None:
    report = json.loads((hf["output"] / "fxeq.json").read_text())
    preprocessing = report["preprocessing"]
    assert preprocessing["kind"] == "image processor" and preprocessing["class"] == "SegformerImageProcessor"
    assert preprocessing["file"] == str((hf["folder"] / "preprocessor_config.json").resolve())
    assert preprocessing["settings"]["size"] == {"height": 64, "width": 64}
    assert report["checkpoint"] == {"path": str(hf["folder"].resolve()), "sha256": outputs.digest(hf["folder"])}
    assert report["output"] == {"path": str(hf["output"].resolve()), "sha256": outputs.digest(hf["output"])}
    assert report["model"] == {"spec": "transformers:AutoModelForSemanticSegmentation", "kwargs": {},
                               "class": "transformers.models.segformer.modeling_segformer."
                                        "SegformerForSemanticSegmentation"}
    assert report["versions"]["transformers"] == T.__version__
    assert report["calibration_data"]["images"] == 4 and report["calibration"]["batches"] == 2


def test_a_converted_folder_is_not_converted_again(hf: dict[str, Any], tmp_path: Path) -> None:
    """from_pretrained loses fxeq's mark on the model; the report inside the folder keeps it."""
    result = run_main("convert", hf["output"], "--calib", hf["images"], *CALIB, "-o", tmp_path / "twice")
    assert_fails(result, 2, "segformer-fxeq was already equalized by fxeq", "fxeq.json lies in it", "twice")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_folder_needs_force(hf: dict[str, Any]) -> None:
    result = run_main("convert", hf["folder"], "--calib", hf["images"], *CALIB, "-o", hf["output"])
    assert_fails(result, 2, "segformer-fxeq exists; pass --force to replace it")


def test_the_output_may_not_be_the_input_folder(hf: dict[str, Any]) -> None:
    before = outputs.digest(hf["folder"])
    result = run_main("convert", hf["folder"], "--calib", hf["images"], *CALIB, "-o", hf["folder"], "--force")
    assert_fails(result, 2, "is the input", "fxeq never overwrites its input, even with --force")
    assert outputs.digest(hf["folder"]) == before


def test_size_mean_and_std_are_refused_with_an_image_processor(hf: dict[str, Any], tmp_path: Path) -> None:
    result = run_main("convert", hf["folder"], "--calib", hf["images"], *CALIB, "--size", "128", "--std", "1,1,1",
                      "-o", tmp_path / "out")
    assert_fails(result, 2, "--size and --std: ", "preprocessor_config.json holds the model's image processor",
                 "edit that file in a copy of the folder")


def test_inspect_a_folder_without_an_image_processor_uses_size_mean_and_std(hf: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "no-processor"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf["folder"] / name, folder / name)
    result = run_main("inspect", folder, "--calib", hf["images"], *CALIB, "--size", "64", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["preprocessing"] == {"kind": "resize the shorter side, center crop, normalize", "size": 64,
                                       "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert [s["convs"][0]["module"] for s in report["sites"]] == ["decode_head.linear_fuse"]
    assert report["folded"] is False and report["sites"][0]["inputs"][0]["samples"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_apply_on_the_folder_gives_the_converted_folder(hf: dict[str, Any], tmp_path: Path) -> None:
    output = tmp_path / "applied"
    result = run_main("apply", hf["folder"], "--report", hf["output"], "-o", output)
    assert result.returncode == 0, result.stderr
    expected, written = _weights(hf["output"]), _weights(output)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert (output / "preprocessor_config.json").is_file()
    report = json.loads((output / "fxeq.json").read_text())
    assert report["replayed"]["report"] == str((hf["output"] / "fxeq.json").resolve())


def test_model_names_another_class(hf: dict[str, Any], tmp_path: Path) -> None:
    """--model picks the class whose from_pretrained loads the folder; a class that does not fit is refused."""
    result = run_main("apply", hf["folder"], "--report", hf["output"], "-o", tmp_path / "out",
                      "--model", "transformers:SegformerForImageClassification")
    assert_fails(result, 2, "do not fit SegformerForImageClassification: missing keys: 2 (classifier.bias, "
                 "classifier.weight); unexpected keys: ", "decode_head.", "initialize the missing ones at random")
    result = run_main("apply", hf["folder"], "--report", hf["output"], "-o", tmp_path / "out",
                      "--model", "transformers:SegformerForSemanticSegmentation")
    assert result.returncode == 0, result.stderr


def test_weights_that_do_not_fit_the_config_are_refused(hf: dict[str, Any], tmp_path: Path) -> None:
    """A backbone saved alone: from_pretrained would initialize the decoder at random."""
    torch.manual_seed(0)
    T.SegformerModel(_segformer().config).save_pretrained(tmp_path / "backbone")
    result = run_main("convert", tmp_path / "backbone", "--calib", hf["images"], *CALIB, "-o", tmp_path / "out")
    assert_fails(result, 2, "the weights in ", "backbone do not fit SegformerForSemanticSegmentation: missing keys: ",
                 "decode_head.", "config.json")


def test_a_folder_without_transformers_names_the_extra_to_install(
    hf: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    for command in (["convert", hf["folder"], "--calib", hf["images"], "-o", tmp_path / "out"],
                    ["inspect", hf["folder"], "--calib", hf["images"]]):
        result = run_main(*command)
        assert_fails(result, 2, "segformer is a Hugging Face save_pretrained folder (it holds config.json)",
                     "needs the transformers package, which is not installed", "pip install -e '.[hf]'")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Equalized folders: inspect measures them as they are; convert and apply refuse them
# ---------------------------------------------------------------------------

def _stds(report: dict[str, Any]) -> list[float]:
    return [i["std"] for site in report["sites"] for i in site["inputs"]]


@pytest.fixture(scope="module")
def original_stds(hf: dict[str, Any]) -> list[float]:
    result = run_main("inspect", hf["folder"], "--calib", hf["images"], *CALIB, "--json")
    assert result.returncode == 0, result.stderr
    return _stds(json.loads(result.stdout))


def _trainer_checkpoint(hf: dict[str, Any], folder: Path) -> Path:
    """A Trainer's checkpoint-N folder saved after fxeq's callback equalized the model: its fxeq.json marks it."""
    checkpoint = folder / "checkpoint-10"
    shutil.copytree(hf["output"], checkpoint)
    report = json.loads((checkpoint / FOLDER_REPORT).read_text())
    for key in ("checkpoint", "command", "output"):
        report.pop(key)
    report["trainer"] = {"framework": "transformers", "global_step": 0, "num_batches": 2, "world_size": 1}
    (checkpoint / FOLDER_REPORT).write_text(json.dumps(report))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    return checkpoint


@pytest.mark.parametrize("kind", ["converted", "trainer-checkpoint"])
def test_inspect_of_an_equalized_folder_measures_it_as_it_is(
    kind: str, hf: dict[str, Any], original_stds: list[float], tmp_path: Path
) -> None:
    """The fold rescales the conv, not its inputs: the inputs' stds are the original's (README, fxeq inspect)."""
    folder = hf["output"] if kind == "converted" else _trainer_checkpoint(hf, tmp_path)
    before = outputs.digest(folder), (folder / FOLDER_REPORT).read_bytes()
    result = run_main("inspect", folder, "--calib", hf["images"], *CALIB, "--json")
    assert result.returncode == 0, result.stderr
    assert f"fxeq: {folder} is a checkpoint equalized by fxeq ({folder / FOLDER_REPORT} lies in it)" in result.stderr
    if kind == "converted":
        assert f"  converted from {hf['folder'].resolve()}\n" in result.stderr
    else:
        assert "  equalized during training by fxeq's transformers callback at step 0\n" in result.stderr
    assert "  site cat -> decode_head.linear_fuse; std max/min " in result.stderr
    assert "already equalized" not in result.stderr
    report = json.loads(result.stdout)
    assert report["folded"] is False and report["calibration"]["passes"] == 1
    assert _stds(report) == pytest.approx(original_stds, rel=1e-4)
    assert (outputs.digest(folder), (folder / FOLDER_REPORT).read_bytes()) == before  # nothing written


def test_apply_refuses_an_equalized_folder(hf: dict[str, Any], tmp_path: Path) -> None:
    result = run_main("apply", hf["output"], "--report", hf["output"], "-o", tmp_path / "twice")
    assert_fails(result, 2, f"{hf['output']} was already equalized by fxeq ({hf['output'] / FOLDER_REPORT} lies in "
                 "it); equalizing it again would divide the fusing convs' weights twice",
                 "Convert the original checkpoint instead")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_the_legacy_report_name_is_refused(hf: dict[str, Any], tmp_path: Path) -> None:
    """Training callbacks before fxeq 0.3 wrote the report as model.safetensors.fxeq.json."""
    folder = tmp_path / "old-run"
    shutil.copytree(hf["output"], folder)
    (folder / FOLDER_REPORT).rename(folder / "model.safetensors.fxeq.json")
    result = run_main("convert", folder, "--calib", hf["images"], *CALIB, "-o", tmp_path / "twice")
    assert_fails(result, 2, f"{folder} was already equalized by fxeq ({folder / 'model.safetensors.fxeq.json'} lies "
                 "in it)", "twice")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old-run"]


def test_a_plot_inside_the_input_folder_is_refused(hf: dict[str, Any], tmp_path: Path) -> None:
    """It would change the folder, and with it the digest the report records."""
    plot = hf["folder"] / "plot.png"
    result = run_main("convert", hf["folder"], "--calib", hf["images"], *CALIB, "--plot", plot, "-o", tmp_path / "o")
    assert_fails(result, 2, f"--plot {plot} is inside {hf['folder']}, an input or output of this command")
    assert not plot.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Folders and classes from_pretrained cannot use
# ---------------------------------------------------------------------------

def test_a_class_without_from_pretrained_is_refused(hf: dict[str, Any]) -> None:
    result = run_main("inspect", hf["folder"], "--model", "cli_models:TinyFuse", "--calib", hf["images"], *CALIB)
    assert_fails(result, 2, f"TinyFuse has no from_pretrained method, so it cannot load the save_pretrained folder "
                 f"{hf['folder']}; name a transformers model class such as "
                 "transformers:SegformerForSemanticSegmentation")


def test_a_folder_from_pretrained_cannot_load(hf: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no-such-model"}')
    result = run_main("inspect", folder, "--calib", hf["images"], *CALIB, "--size", "64")
    assert_fails(result, 2, f"could not load {folder} with AutoModelForSemanticSegmentation.from_pretrained (",
                 "expected a folder written by save_pretrained for a model of that class",
                 "Name the model's class with --model")


def test_an_unreadable_image_processor_is_refused(hf: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "segformer"
    shutil.copytree(hf["folder"], folder)
    (folder / "preprocessor_config.json").write_text("{not json")
    result = run_main("inspect", folder, "--calib", hf["images"], *CALIB)
    assert_fails(result, 2, f"could not read the image processor in {folder / 'preprocessor_config.json'} (",
                 "expected a file written by an image processor's save_pretrained")
