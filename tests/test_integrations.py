"""Equalizing where training happens: the Hugging Face and Lightning callbacks, DDP, and optional imports.

Each callback runs inside a real one-step Trainer run on CPU. The weights the
optimizer steps from must be exactly what ``fxeq.transform`` writes on a copy
of the model with the same batches, and the optimizer's parameters must be the
same objects before and after the callback.
"""

from __future__ import annotations

import copy
import csv
import importlib
import itertools
import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import BNHead, Chained, TwoBranch, batches, state_of
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxeq
from fxeq.replay import apply

pytestmark = [
    # Lightning 2.6's own pytree helper on torch 2.14, and its note on resuming mid-epoch: not fxeq's
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.slow,
]


def _assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not different, f"not bitwise equal: {different}"


# ---------------------------------------------------------------------------
# Packaging: optional dependencies stay optional
# ---------------------------------------------------------------------------


def test_import_fxeq_imports_no_training_framework() -> None:
    code = ("import sys, fxeq, fxeq.replay, fxeq.integrations; "
            "assert 'transformers' not in sys.modules and 'lightning' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'lightning'))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("module, hidden, extra", [
    ("fxeq.integrations.transformers", ["transformers"], "hf"),
    ("fxeq.integrations.lightning", ["lightning", "lightning.pytorch"], "lightning"),
])
def test_integration_without_its_framework_names_the_extra(
    module: str, hidden: list[str], extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"{module} needs .*: pip install -e '\.\[{extra}\]'"):
        importlib.import_module(module)


# ---------------------------------------------------------------------------
# DDP: every rank calibrates its shard; merged statistics, identical weights
# ---------------------------------------------------------------------------


def _ddp_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"two-branch": TwoBranch(), "bn-head": BNHead(), "chained": Chained()}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = batches(n=4, seed=7)[rank::world]
        models = _ddp_models()
        written = {}
        for name in ("two-branch", "bn-head"):  # the README's recipe: equalize, then wrap
            fxeq.transform(models[name], shard, inplace=True, progress=False)
            written[name] = state_of(models[name])  # before DDP broadcasts rank 0's weights
            DDP(models[name])
        wrapped = DDP(models["chained"])  # as inside a Trainer: already wrapped; two passes, each merged
        fxeq.transform(wrapped, shard, inplace=True, progress=False)
        written["chained"] = state_of(models["chained"])
        torch.save(written, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_write_identical_weights_equal_to_the_union(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "weights")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    union = _ddp_models()
    originals = {name: state_of(model) for name, model in union.items()}
    for model in union.values():
        fxeq.transform(model, batches(n=4, seed=7), inplace=True, progress=False)
    for name, model in union.items():
        _assert_same(ranks[1][name], ranks[0][name])
        expected = state_of(model)
        assert any(not torch.equal(expected[k], originals[name][k]) for k in expected)
        for key in expected:
            torch.testing.assert_close(ranks[0][name][key], expected[key], msg=f"{name}: {key}")


# ---------------------------------------------------------------------------
# Shared recording callbacks
# ---------------------------------------------------------------------------


def _optimizer_ids(optimizer: torch.optim.Optimizer) -> list[int]:
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


# ---------------------------------------------------------------------------
# Hugging Face Trainer
# ---------------------------------------------------------------------------


def _hf_callback() -> Any:
    """ScaleEqualizationCallback, or a skip where transformers or accelerate (its Trainer's) is missing."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return importlib.import_module("fxeq.integrations.transformers").ScaleEqualizationCallback


def _segformer(seed: int) -> nn.Module:
    T = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = T.SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2],
                               decoder_hidden_size=32, num_labels=3)
    return T.SegformerForSemanticSegmentation(config)


def _hf_data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": torch.randint(0, 3, (32, 32), generator=g)}
            for _ in range(8)]


def _hf_trainer(model: nn.Module, output_dir: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    T = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    options = {"max_steps": 1, "save_strategy": "no", "disable_tqdm": True, "logging_strategy": "no", **kwargs}
    args = T.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, use_cpu=True,
                               report_to=[], learning_rate=0.1, **options)
    return T.Trainer(model=model, args=args, train_dataset=_hf_data(), callbacks=callbacks)


def _hf_equalizing(model: nn.Module, output_dir: Path, before: list[Any], after: list[Any],
                   num_batches: int = 2, **kwargs: Any) -> tuple[Any, Any]:
    """A Trainer whose callbacks are ``before``, the ScaleEqualizationCallback given it, then ``after``."""
    ScaleEqualizationCallback = _hf_callback()
    trainer = _hf_trainer(model, output_dir, before, **kwargs)
    callback = ScaleEqualizationCallback(num_batches=num_batches, trainer=trainer)
    trainer.add_callback(callback)
    for extra in after:
        trainer.add_callback(extra)
    return trainer, callback


def _hf_recorder() -> Any:
    T = pytest.importorskip("transformers")

    class Recorder(T.TrainerCallback):
        """Records, at on_train_begin, the random state, the weights and the optimizer's parameter ids; and logs."""

        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module, optimizer: Any,
                           train_dataloader: Any, **kwargs: Any) -> None:
            self.rng = torch.random.get_rng_state()
            self.state, self.ids = state_of(model), _optimizer_ids(optimizer)
            self.loader = train_dataloader

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            self.logs.append({**logs, "step": state.global_step, "model": kwargs.get("model") is not None})

    return Recorder()


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One Trainer step, saving checkpoint-1, with the callback between two recorders (the first where the Trainer
    puts its reporting integrations: before the callbacks given to it)."""
    out = tmp_path_factory.mktemp("hf")
    model = _segformer(seed=0)
    original = copy.deepcopy(model)
    before, after = _hf_recorder(), _hf_recorder()
    trainer, callback = _hf_equalizing(model, out, [before], [after], save_strategy="steps", save_steps=1)
    trainer.train()
    torch.random.set_rng_state(before.rng)  # the (shuffled) batches the callback drew
    reference = copy.deepcopy(original)
    fxeq.transform(reference, list(itertools.islice(before.loader, 2)), inplace=True, progress=False)
    return SimpleNamespace(out=out, model=model, original=original, reference=reference, before=before,
                           callback=callback, after=after, trainer=trainer)


def test_hf_callback_equalizes_before_the_first_step(hf_run: SimpleNamespace) -> None:
    _assert_same(hf_run.after.state, state_of(hf_run.reference))
    fuse = "decode_head.linear_fuse.weight"
    assert not torch.equal(hf_run.before.state[fuse], hf_run.after.state[fuse])
    assert hf_run.after.ids == hf_run.before.ids, "the optimizer must keep its parameter objects"
    assert id(hf_run.model.get_parameter(fuse)) in hf_run.after.ids
    assert not torch.equal(hf_run.model.get_parameter(fuse), hf_run.after.state[fuse]), "step 1 trains it"
    assert torch.equal(hf_run.after.rng, hf_run.before.rng), "calibration must leave the random state alone"


def test_hf_callback_writes_the_report(hf_run: SimpleNamespace) -> None:
    report = hf_run.callback.report
    assert [c.weight for s in report.search.sites for c in s.convs] == ["decode_head.linear_fuse.weight"]
    written = json.loads((hf_run.out / "fxeq.json").read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    assert written["trainer"] == {"framework": "transformers", "global_step": 0, "num_batches": 2, "world_size": 1}
    beside = hf_run.out / "checkpoint-1" / "fxeq.json"
    assert json.loads(beside.read_text()) == written
    assert not list(hf_run.out.glob(".*.tmp"))


def test_hf_report_replays_the_run(hf_run: SimpleNamespace) -> None:
    fresh = _segformer(seed=0)
    _assert_same(state_of(fresh), state_of(hf_run.original))
    apply(fresh, hf_run.out / "fxeq.json")
    _assert_same(state_of(fresh), hf_run.after.state)


def test_hf_callback_leaves_a_resumed_run_alone(hf_run: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import load_file

    checkpoint = hf_run.out / "checkpoint-1"
    before, after = _hf_recorder(), _hf_recorder()
    trainer, callback = _hf_equalizing(_segformer(seed=1), hf_run.out, [before], [after], max_steps=2,
                                       save_strategy="steps", save_steps=1)
    with caplog.at_level(logging.INFO, logger="fxeq"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert callback.report is None
    assert "training resumes at step 1, so the weights come from a checkpoint" in caplog.text
    _assert_same(after.state, before.state)
    # transformers 5 saves some keys under legacy names; the decoder's keep theirs
    saved = load_file(checkpoint / "model.safetensors")
    assert "decode_head.linear_fuse.weight" in saved
    _assert_same({k: after.state[k] for k in saved if k in after.state}, {k: saved[k] for k in saved
                                                                         if k in after.state})
    assert json.loads((hf_run.out / "checkpoint-2" / "fxeq.json").read_text())["sites"]


def test_hf_callback_warns_when_a_resumed_run_has_no_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ScaleEqualizationCallback = _hf_callback()
    args = SimpleNamespace(deepspeed=None, fsdp=None, output_dir=str(tmp_path), disable_tqdm=True, world_size=1)
    state = SimpleNamespace(global_step=5, is_world_process_zero=True)
    with caplog.at_level(logging.INFO, logger="fxeq"):
        ScaleEqualizationCallback().on_train_begin(args, state, None, model=TwoBranch(), train_dataloader=[])
    assert f"resuming at step 5 but {tmp_path / 'fxeq.json'} does not exist" in caplog.text


def test_hf_callback_leaves_an_equalized_model_alone(hf_run: SimpleNamespace, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    after = _hf_recorder()
    model = copy.deepcopy(hf_run.model)  # the mark survives deepcopy
    state = state_of(model)
    trainer, callback = _hf_equalizing(model, tmp_path, [], [after])
    with caplog.at_level(logging.INFO, logger="fxeq"):
        trainer.train()
    assert callback.report is None
    assert "not equalizing again: conv decode_head.linear_fuse was already equalized by fxeq" in caplog.text
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fxeq:")]
    assert len(printed) == 1 and printed[0].startswith("fxeq: not equalizing again: conv decode_head.linear_fuse")
    _assert_same(after.state, state)
    assert not (tmp_path / "fxeq.json").exists()


@pytest.mark.parametrize("engine, args", [
    ("DeepSpeed", {"deepspeed": "ds_config.json", "fsdp": None}),
    ("FSDP", {"deepspeed": None, "fsdp": ["full_shard"]}),
])
def test_hf_callback_refuses_sharded_training(engine: str, args: dict[str, Any]) -> None:
    ScaleEqualizationCallback = _hf_callback()
    with pytest.raises(ValueError, match=f"ScaleEqualizationCallback does not support {engine} training: the "
                       "optimizer holds its own copy or shards of the weights"):
        ScaleEqualizationCallback().on_train_begin(SimpleNamespace(**args), None, None, model=TwoBranch())


def test_hf_callback_needs_a_model_and_a_dataloader(tmp_path: Path) -> None:
    ScaleEqualizationCallback = _hf_callback()
    args = SimpleNamespace(deepspeed=None, fsdp=None, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"ScaleEqualizationCallback\.on_train_begin got no model"):
        ScaleEqualizationCallback().on_train_begin(args, None, None)
    with pytest.raises(ValueError, match=r"got no train_dataloader from the Trainer; expected the Trainer to pass it "
                       r"to every callback event\. Pass the batches yourself"):
        ScaleEqualizationCallback().on_train_begin(args, None, None, model=TwoBranch(), train_dataloader=None)


# ---------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------


def _lightning() -> Any:
    return pytest.importorskip("lightning.pytorch")


def _pl_callback() -> Any:
    """ScaleEqualization, or a skip where Lightning is missing."""
    _lightning()
    return importlib.import_module("fxeq.integrations.lightning").ScaleEqualization


def _seg_module(forward: bool = True, marks: bool = False) -> Any:
    """A LightningModule around models.Chained (two chained sites), its forward optional; with ``marks``, its
    on_load_checkpoint calls fxeq's mark_if_equalized."""
    pl = _lightning()
    mark_if_equalized = importlib.import_module("fxeq.integrations.lightning").mark_if_equalized

    class Seg(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Chained()
            self.first_batch: torch.Tensor | None = None

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.first_batch is None:
                self.first_batch = batch[0].clone()
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class SegWithForward(Seg):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    class SegMarking(SegWithForward):
        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            mark_if_equalized(self, checkpoint)

    return SegMarking() if marks else SegWithForward() if forward else Seg()


def _pl_loader() -> DataLoader:
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 3, (16, 8, 8), generator=g))
    return DataLoader(data, batch_size=4, shuffle=True)


def _pl_trainer(root: Path, callbacks: list[Any], max_steps: int = 1) -> Any:
    pl = _lightning()
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                      callbacks=callbacks)


def _pl_recorder() -> Any:
    pl = _lightning()

    class Recorder(pl.Callback):
        """Records, at on_train_start, the random state, the weights and the optimizer's parameter ids."""

        def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
            self.rng = torch.random.get_rng_state()
            self.state, self.ids = state_of(pl_module), _optimizer_ids(trainer.optimizers[0])
            self.loader = trainer.train_dataloader

    return Recorder()


@pytest.fixture(scope="module")
def pl_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One Lightning step with the callback between two recorders, on a shuffling loader."""
    ScaleEqualization = _pl_callback()
    root = tmp_path_factory.mktemp("pl")
    torch.manual_seed(0)
    module = _seg_module()
    original = copy.deepcopy(module)
    before, callback, after = _pl_recorder(), ScaleEqualization(num_batches=2), _pl_recorder()
    trainer = _pl_trainer(root, [before, callback, after])
    torch.manual_seed(123)
    trainer.fit(module, _pl_loader())
    torch.random.set_rng_state(before.rng)  # the batches the callback drew, in its passes
    reference = copy.deepcopy(original)
    fxeq.transform(reference, list(itertools.islice(before.loader, 2)), inplace=True, progress=False)
    return SimpleNamespace(root=root, module=module, reference=reference, before=before, callback=callback,
                           after=after, trainer=trainer)


def test_lightning_callback_equalizes_before_the_first_step(pl_run: SimpleNamespace) -> None:
    _assert_same(pl_run.after.state, state_of(pl_run.reference))
    for fuse in ("net.fuse1.weight", "net.fuse2.weight"):
        assert not torch.equal(pl_run.before.state[fuse], pl_run.after.state[fuse])
        assert not torch.equal(pl_run.module.get_parameter(fuse), pl_run.after.state[fuse]), "step 1 trains it"
    assert pl_run.after.ids == pl_run.before.ids, "the optimizer must keep its parameter objects"
    assert torch.equal(pl_run.after.rng, pl_run.before.rng), "calibration must leave the random state alone"


def test_lightning_training_sees_the_batches_it_would_see_without_fxeq(pl_run: SimpleNamespace,
                                                                        tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _seg_module()
    torch.manual_seed(123)
    _pl_trainer(tmp_path, []).fit(module, _pl_loader())
    assert torch.equal(module.first_batch, pl_run.module.first_batch)


def test_lightning_callback_writes_the_report(pl_run: SimpleNamespace) -> None:
    report = pl_run.callback.report
    assert [c.weight for s in report.search.sites for c in s.convs] == ["net.fuse1.weight", "net.fuse2.weight"]
    written = json.loads((pl_run.root / "fxeq.json").read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    assert written["trainer"]["framework"] == "lightning" and written["calibration"]["passes"] == 2
    assert pl_run.callback.state_dict() == {"report": written}


def test_lightning_callback_leaves_a_resumed_run_alone(pl_run: SimpleNamespace, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    ScaleEqualization = _pl_callback()
    checkpoint = tmp_path / "step1.ckpt"
    pl_run.trainer.save_checkpoint(checkpoint)
    callback, after = ScaleEqualization(num_batches=2), _pl_recorder()
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="fxeq"):
        _pl_trainer(tmp_path, [callback, after], max_steps=2).fit(_seg_module(), _pl_loader(), ckpt_path=checkpoint)
    assert callback.report is None
    assert "training resumes at step 1, so the weights come from a checkpoint" in caplog.text
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    _assert_same(after.state, saved)
    assert callback.state_dict()["report"] == pl_run.callback.state_dict()["report"]


def test_lightning_callback_leaves_an_equalized_model_alone(pl_run: SimpleNamespace, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    ScaleEqualization = _pl_callback()
    module = copy.deepcopy(pl_run.module)
    state = state_of(module)
    callback, after = ScaleEqualization(num_batches=2), _pl_recorder()
    with caplog.at_level(logging.INFO, logger="fxeq"):
        _pl_trainer(tmp_path, [callback, after]).fit(module, _pl_loader())
    assert callback.report is None
    assert "not equalizing again: conv net.fuse1 was already equalized by fxeq" in caplog.text
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fxeq:")]
    assert len(printed) == 1 and printed[0].startswith("fxeq: not equalizing again: conv net.fuse1")
    _assert_same(after.state, state)


def test_lightning_callback_state_from_a_checkpoint_is_enough(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    ScaleEqualization = _pl_callback()
    callback = ScaleEqualization(calib_loader=batches(size=16))
    callback.load_state_dict({"report": {"sites": []}})
    module = _seg_module()
    state = state_of(module)
    with caplog.at_level(logging.INFO, logger="fxeq"):
        callback.on_train_start(_fake_trainer(tmp_path), module)
    assert callback.report is None
    assert "the checkpoint being resumed records fxeq's report; not equalizing again" in caplog.text
    _assert_same(state_of(module), state)
    callback.on_train_start(_fake_trainer(tmp_path), module)  # the same callback in a new run, on a new model
    assert callback.report is not None


def _fake_trainer(tmp_path: Path, **kwargs: Any) -> SimpleNamespace:
    """What ScaleEqualization reads from a Trainer at on_train_start."""
    fields = {"strategy": None, "train_dataloader": None, "global_step": 0, "is_global_zero": True,
              "world_size": 1, "checkpoint_callback": None, "default_root_dir": str(tmp_path)}
    return SimpleNamespace(**{**fields, **kwargs})


def test_lightning_submodule(tmp_path: Path) -> None:
    ScaleEqualization = _pl_callback()
    module = _seg_module(forward=False)
    callback = ScaleEqualization(submodule="net", calib_loader=batches(size=16))
    callback.on_train_start(_fake_trainer(tmp_path), module)
    assert [c.weight for s in callback.report.search.sites for c in s.convs] == ["fuse1.weight", "fuse2.weight"]
    assert json.loads((tmp_path / "fxeq.json").read_text())["trainer"]["submodule"] == "net"


def test_lightning_module_without_forward_suggests_a_submodule(tmp_path: Path) -> None:
    ScaleEqualization = _pl_callback()
    callback = ScaleEqualization(calib_loader=batches(size=16))
    with pytest.raises(fxeq.CaptureError, match=r"ScaleEqualization captures Seg.forward on a training batch\. If "
                       r"the segmentation network is a submodule whose forward differs, pass its name: "
                       r"ScaleEqualization\(submodule='net'\)"):
        callback.on_train_start(_fake_trainer(tmp_path), _seg_module(forward=False))


def test_lightning_unknown_submodule(tmp_path: Path) -> None:
    ScaleEqualization = _pl_callback()
    with pytest.raises(ValueError, match=r"ScaleEqualization\(submodule='decoder'\): SegWithForward has no such "
                       r"submodule; expected a module path such as one of \['net'\]"):
        ScaleEqualization(submodule="decoder").on_train_start(_fake_trainer(tmp_path), _seg_module())


def test_lightning_needs_one_train_dataloader(tmp_path: Path) -> None:
    ScaleEqualization = _pl_callback()
    with pytest.raises(ValueError, match="ScaleEqualization found no train dataloader on the trainer at "
                       "on_train_start"):
        ScaleEqualization().on_train_start(_fake_trainer(tmp_path), _seg_module())
    loaders = {"a": _pl_loader(), "b": _pl_loader()}
    with pytest.raises(ValueError, match=r"ScaleEqualization found 2 train dataloaders; it calibrates on one\. "
                       r"Pass the one that feeds the segmentation network"):
        ScaleEqualization().on_train_start(_fake_trainer(tmp_path, train_dataloader=loaders), _seg_module())


def test_lightning_refuses_sharded_training(tmp_path: Path) -> None:
    ScaleEqualization = _pl_callback()
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = _fake_trainer(tmp_path, strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="ScaleEqualization does not support FSDPStrategy: the optimizer holds its "
                       "own copy or shards of the weights"):
        ScaleEqualization().on_train_start(trainer, _seg_module())


def test_lightning_remote_checkpoint_folder_keeps_the_report_in_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ScaleEqualization = _pl_callback()
    callback = ScaleEqualization(calib_loader=batches(size=16))
    trainer = _fake_trainer(tmp_path, checkpoint_callback=SimpleNamespace(dirpath="s3://bucket/run"))
    callback.on_train_start(trainer, _seg_module())
    _assert_one_summary_line(capsys.readouterr().out, callback.state_dict()["report"],
                             "in the checkpoints only (callback state 'ScaleEqualization'): the checkpoint folder "
                             "s3://bucket/run is not a local path")
    assert callback.state_dict()["report"]["sites"]
    assert not list(tmp_path.iterdir())


def test_lightning_report_path(tmp_path: Path) -> None:
    ScaleEqualization = _pl_callback()
    path = tmp_path / "deep" / "run.fxeq.json"
    callback = ScaleEqualization(calib_loader=batches(size=16), report_path=path)
    callback.on_train_start(_fake_trainer(tmp_path / "unused"), _seg_module())
    assert json.loads(path.read_text())["sites"]


# ---------------------------------------------------------------------------
# Arguments of both callbacks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["transformers", "lightning"])
def test_callbacks_check_their_arguments(framework: str) -> None:
    pytest.importorskip(framework)
    module = importlib.import_module(f"fxeq.integrations.{framework}")
    name = {"transformers": "ScaleEqualizationCallback", "lightning": "ScaleEqualization"}[framework]
    callback = getattr(module, name)
    with pytest.raises(ValueError, match="num_batches must be a whole number of at least 1, or None for all; got 0"):
        callback(num_batches=0)
    with pytest.raises(ValueError, match="mode must be one of 'init', 'reparam', 'explicit'; got 'fold'"):
        callback(mode="fold")
    with pytest.raises(ValueError, match="keep_norm=True applies to mode='init' only, got mode='reparam'"):
        callback(mode="reparam", keep_norm=True)
    assert callback(num_batches=None).num_batches is None


# ---------------------------------------------------------------------------
# One convention for "equalized"
# ---------------------------------------------------------------------------


def test_an_equalized_trainer_checkpoint_is_not_converted_again(hf_run: SimpleNamespace, tmp_path: Path) -> None:
    from cli_models import assert_fails, run_main

    from fxeq.cli.images import generate_images

    generate_images(tmp_path / "images", 4, size=32)
    checkpoint = hf_run.out / "checkpoint-1"
    result = run_main("convert", checkpoint, "--calib", tmp_path / "images", "--size", "32", "-o", tmp_path / "again")
    assert_fails(result, 2, f"{checkpoint} was already equalized by fxeq ({checkpoint / 'fxeq.json'} lies in it)",
                 "twice")
    assert not (tmp_path / "again").exists()


def test_a_model_loaded_from_an_equalized_folder_is_refused(hf_run: SimpleNamespace) -> None:
    T = pytest.importorskip("transformers")
    checkpoint = hf_run.out / "checkpoint-1"
    model = T.SegformerForSemanticSegmentation.from_pretrained(checkpoint, local_files_only=True)
    with pytest.raises(fxeq.AlreadyEqualizedError, match=rf"SegformerForSemanticSegmentation was loaded from "
                                                         rf"{checkpoint}, which fxeq already equalized"):
        fxeq.transform(model, [{"pixel_values": torch.randn(2, 3, 32, 32)}])


def test_an_equalized_lightning_checkpoint_is_not_converted_again(pl_run: SimpleNamespace, tmp_path: Path) -> None:
    from cli_models import assert_fails, run_main

    from fxeq.cli.checkpoints import read_checkpoint
    from fxeq.cli.images import generate_images

    checkpoint = tmp_path / "step1.ckpt"
    pl_run.trainer.save_checkpoint(checkpoint)
    assert read_checkpoint(checkpoint).report is not None
    generate_images(tmp_path / "images", 4, size=16)
    result = run_main("convert", checkpoint, "--model", "models:Chained", "--calib", tmp_path / "images",
                      "--size", "16", "--batch-size", "2", "-o", tmp_path / "again.pt")
    assert_fails(result, 2, f"{checkpoint} was already equalized by fxeq: it holds the report of fxeq's "
                 "ScaleEqualization callback")
    assert not (tmp_path / "again.pt").exists()


# ---------------------------------------------------------------------------
# Where the weights come from: what fxeq can and cannot tell
# ---------------------------------------------------------------------------


def _hf_begin(callback: Any, model: nn.Module, output_dir: Path, **args: Any) -> SimpleNamespace:
    """Call on_train_begin as a Trainer would at step 0, with the arguments the callback reads; the state."""
    options = {"deepspeed": None, "fsdp": None, "output_dir": str(output_dir), "disable_tqdm": True,
               "world_size": 1, "report_to": [], **args}
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[])
    callback.on_train_begin(SimpleNamespace(**options), state, None, model=model,
                            train_dataloader=[{"pixel_values": torch.randn(2, 3, 32, 32)} for _ in range(2)])
    return state


def test_hf_callback_warns_when_it_cannot_look_where_the_weights_come_from(
    hf_run: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    T = pytest.importorskip("transformers")
    ScaleEqualizationCallback = _hf_callback()
    monkeypatch.chdir(hf_run.out)
    model = T.SegformerForSemanticSegmentation.from_pretrained("checkpoint-1", local_files_only=True)
    assert model.name_or_path == "checkpoint-1"
    callback = ScaleEqualizationCallback()
    with caplog.at_level(logging.INFO, logger="fxeq"):
        _hf_begin(callback, model, tmp_path / "here")
    assert callback.report is None, "from where the relative path resolves, its fxeq.json is found"
    assert "not equalizing again: SegformerForSemanticSegmentation was loaded from checkpoint-1, which fxeq " \
           "already equalized" in caplog.text
    caplog.clear()

    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="fxeq"):
        _hf_begin(callback, model, tmp_path / "elsewhere")
    assert callback.report is not None, "fxeq cannot tell: it equalizes, saying so"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        f"fxeq: SegformerForSemanticSegmentation was loaded from 'checkpoint-1', which is not a folder here (a Hub "
        f"id, or a relative path that does not resolve from {tmp_path}), so fxeq cannot tell whether these "
        "weights were already equalized: only a local folder holding fxeq.json says so. Equalizing them now. If "
        "they come from a folder that fxeq or this callback equalized, their fusing convs end up divided twice: "
        "load them from that folder by a path that resolves, or train without ScaleEqualizationCallback."
    )


@pytest.mark.parametrize("source, warns", [
    ("nvidia/mit-b0", True),  # a Hub id
    ("", False),  # built from a config
    ("plain", False),  # a local folder that fxeq never equalized
])
def test_hf_callback_warns_only_where_the_origin_is_unknown(source: str, warns: bool, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    ScaleEqualizationCallback = _hf_callback()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").mkdir()
    model = _segformer(seed=0)
    model.name_or_path = source
    callback = ScaleEqualizationCallback()
    with caplog.at_level(logging.WARNING, logger="fxeq"):
        _hf_begin(callback, model, tmp_path / "out")
    assert callback.report is not None
    assert ("cannot tell whether these weights were already equalized" in caplog.text) == warns
    if warns:
        assert f"was loaded from {source!r}, which is not a folder here" in caplog.text


def test_lightning_module_marked_on_load_is_not_equalized_again(pl_run: SimpleNamespace, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    ScaleEqualization = _pl_callback()
    checkpoint = tmp_path / "step1.ckpt"
    pl_run.trainer.save_checkpoint(checkpoint)
    module = type(_seg_module(marks=True)).load_from_checkpoint(checkpoint)  # on_load_checkpoint marks it
    state = state_of(module)
    callback, after = ScaleEqualization(num_batches=2), _pl_recorder()
    with caplog.at_level(logging.INFO, logger="fxeq"):
        _pl_trainer(tmp_path / "fresh", [callback, after]).fit(module, _pl_loader())  # no ckpt_path
    assert callback.report is None
    assert "not equalizing again: conv net.fuse1 was already equalized by fxeq" in caplog.text
    _assert_same(after.state, state)


@pytest.mark.parametrize("earlier_report", [True, False])
def test_lightning_module_loaded_without_the_mark_is_equalized_again(
    earlier_report: bool, pl_run: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """load_from_checkpoint leaves no trace in the weights: equalized again, with a warning where an earlier
    report lies where this run writes its own (the negative twin: nothing to suspect, no warning)."""
    ScaleEqualization = _pl_callback()
    checkpoint = tmp_path / "step1.ckpt"
    pl_run.trainer.save_checkpoint(checkpoint)
    module = type(_seg_module()).load_from_checkpoint(checkpoint)
    root = tmp_path / "run"
    root.mkdir()
    if earlier_report:
        (root / "fxeq.json").write_text((pl_run.root / "fxeq.json").read_text())
    callback = ScaleEqualization(num_batches=2)
    with caplog.at_level(logging.INFO, logger="fxeq"):
        _pl_trainer(root, [callback]).fit(module, _pl_loader())
    assert callback.report is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if not earlier_report:
        assert warnings == []
        return
    assert warnings == [
        f"fxeq: {root / 'fxeq.json'} holds the report of an earlier equalization, and fxeq cannot tell from the "
        "weights alone whether this module's were already equalized: a module that load_from_checkpoint built "
        "from an equalized checkpoint carries no mark. Equalizing it now and replacing that report. If its "
        "weights come from such a checkpoint, resume that run with trainer.fit(..., ckpt_path=...) instead, or "
        "call fxeq.integrations.lightning.mark_if_equalized(self, checkpoint) in the module's on_load_checkpoint."
    ]
    assert json.loads((root / "fxeq.json").read_text()) == callback.state_dict()["report"]


def test_mark_if_equalized_marks_the_convs_the_report_names(tmp_path: Path) -> None:
    ScaleEqualization = _pl_callback()
    from fxeq.integrations.lightning import mark_if_equalized

    assert mark_if_equalized(_seg_module(), {"state_dict": {}}) is False
    callback = ScaleEqualization(submodule="net", calib_loader=batches(size=16))
    callback.on_train_start(_fake_trainer(tmp_path), _seg_module(forward=False))
    checkpoint = {"state_dict": {}, "callbacks": {callback.state_key: callback.state_dict()}}
    fresh = _seg_module(forward=False)
    assert mark_if_equalized(fresh, checkpoint) is True
    with pytest.raises(fxeq.AlreadyEqualizedError, match="conv fuse1 was already equalized by fxeq"):
        fxeq.transform(fresh.net, batches(size=16))
    with pytest.raises(ValueError, match=r"the checkpoint holds fxeq's report for fusing convs that Module lacks: "
                       r"net\.fuse1, net\.fuse2; expected the module the checkpoint was saved from\. Call "
                       r"mark_if_equalized\(self, checkpoint\) from that LightningModule's on_load_checkpoint"):
        mark_if_equalized(nn.Module(), checkpoint)


# ---------------------------------------------------------------------------
# The statistics in the training loggers, and one line on the console
# ---------------------------------------------------------------------------


def _expected_scalars(report: dict[str, Any]) -> dict[str, float]:
    """From the JSON report: per site (its first fusing conv), max/min input std and each input's std."""
    expected: dict[str, float] = {}
    for site in report["sites"]:
        name = f"fxeq/{site['convs'][0]['module']}"
        stds = [inp["std"] for inp in site["inputs"]]
        expected[f"{name}/std_max_over_min"] = max(stds) / min(stds)
        expected.update({f"{name}/input_{inp['index']}_std": inp["std"] for inp in site["inputs"]})
    return expected


def _assert_one_summary_line(text: str, report: dict[str, Any], where: str | Path) -> None:
    """Exactly one console line mentions fxeq: the summary, with the largest std ratio of the JSON report."""
    lines = [line for line in text.splitlines() if "fxeq" in line]
    assert len(lines) == 1, lines
    ratios = {}
    for site in report["sites"]:
        stds = [inp["std"] for inp in site["inputs"]]
        ratios[site["convs"][0]["module"]] = max(stds) / min(stds)
    worst = max(ratios, key=lambda conv: ratios[conv])
    sites = len(report["sites"])
    pattern = (rf"fxeq: equalized {sites} fusion sites? in \d+\.\d s before the first optimizer step \(mode init\); "
               rf"largest/smallest input std before: {ratios[worst]:.2f} \({re.escape(worst)}\); "
               rf"report: {re.escape(str(where))}")
    assert re.fullmatch(pattern, lines[0]), lines[0]


class _PixelNet(nn.Module):
    """A Trainer-ready two-branch net: ``fuse(cat(a(x), up(b(pool(x)))))``, loss when given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fuse = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 3, 1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        b = F.interpolate(self.b(F.avg_pool2d(pixel_values, 2)), scale_factor=2.0)
        logits = self.fuse(torch.cat([self.a(pixel_values), b], 1))
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels)}


def test_hf_callback_statistics_reach_the_reporting_callbacks_and_the_log_history(hf_run: SimpleNamespace) -> None:
    expected = _expected_scalars(json.loads((hf_run.out / "fxeq.json").read_text()))
    assert len(expected) == 5  # Segformer: one site, four inputs
    for recorder in (hf_run.before, hf_run.after):  # a reporting integration sits before the callback
        logged = [entry for entry in recorder.logs if any(key.startswith("fxeq/") for key in entry)]
        assert logged == [{**expected, "step": 0, "model": True}]
    assert hf_run.trainer.state.log_history[0] == {**expected, "step": 0}
    saved = json.loads((hf_run.out / "checkpoint-1" / "trainer_state.json").read_text())
    assert saved["log_history"][0] == {**expected, "step": 0}


@pytest.mark.parametrize("disable_tqdm", [True, False], ids=["PrinterCallback", "ProgressCallback"])
def test_hf_callback_prints_one_line(disable_tqdm: bool, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    recorder = _hf_recorder()
    trainer, callback = _hf_equalizing(_PixelNet(), tmp_path, [recorder], [], disable_tqdm=disable_tqdm,
                                       logging_strategy="steps", logging_steps=1)
    trainer.train()
    out, err = capfd.readouterr()
    report = json.loads((tmp_path / "fxeq.json").read_text())
    _assert_one_summary_line(out + err, report, tmp_path / "fxeq.json")
    assert "'loss'" in out, "the console printer still prints the Trainer's own logs"
    assert [entry for entry in recorder.logs if "fxeq/fuse/std_max_over_min" in entry]


@pytest.mark.parametrize("report_to, warns", [(["tensorboard", "wandb"], True), ([], False)])
def test_hf_callback_without_its_trainer_logs_to_the_history_only(report_to: list[str], warns: bool, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    ScaleEqualizationCallback = _hf_callback()
    callback = ScaleEqualizationCallback()
    with caplog.at_level(logging.WARNING, logger="fxeq"):
        state = _hf_begin(callback, _PixelNet(), tmp_path, report_to=report_to)
    expected = _expected_scalars(json.loads((tmp_path / "fxeq.json").read_text()))
    assert state.log_history == [{**expected, "step": 0}]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ([
        "fxeq: ScaleEqualizationCallback was built without trainer=, so its statistics are in state.log_history "
        "(trainer_state.json) but did not reach the reporting integrations ['tensorboard', 'wandb']. Build it as "
        "trainer.add_callback(ScaleEqualizationCallback(trainer=trainer, ...))."
    ] if warns else [])


def test_hf_callback_takes_the_trainer_that_runs_it(tmp_path: Path) -> None:
    ScaleEqualizationCallback = _hf_callback()
    with pytest.raises(TypeError, match=r"ScaleEqualizationCallback\(trainer=\.\.\.\) takes the transformers\.Trainer "
                       r"that runs it; got SimpleNamespace\. Build the Trainer first"):
        ScaleEqualizationCallback(trainer=SimpleNamespace())
    other = _hf_trainer(_PixelNet(), tmp_path / "other", [])
    trainer = _hf_trainer(_PixelNet(), tmp_path / "run", [])
    trainer.add_callback(ScaleEqualizationCallback(trainer=other))
    with pytest.raises(ValueError, match=r"ScaleEqualizationCallback\(trainer=\.\.\.\) was given a Trainer that does "
                       r"not run this callback.*trainer\.add_callback\(ScaleEqualizationCallback\(trainer=trainer\)\)"):
        trainer.train()


def test_lightning_callback_statistics_reach_a_csv_logger(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pl = _lightning()
    from lightning.pytorch.loggers import CSVLogger

    ScaleEqualization = _pl_callback()
    logger = CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         log_every_n_steps=1, callbacks=[ScaleEqualization(num_batches=2)])
    trainer.fit(_seg_module(), _pl_loader())
    report = json.loads((tmp_path / "fxeq.json").read_text())
    expected = _expected_scalars(report)
    assert len(expected) == 6  # Chained: two sites of two inputs
    with (Path(logger.log_dir) / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    [logged] = [row for row in rows if row["fxeq/net.fuse1/std_max_over_min"]]
    assert {key for key in logged if key.startswith("fxeq/")} == expected.keys()
    assert {key: float(logged[key]) for key in expected} == expected
    assert logged["step"] == "0"
    out, err = capfd.readouterr()
    _assert_one_summary_line(out + err, report, tmp_path / "fxeq.json")


def test_first_batches_have_a_length_where_the_loader_has_one() -> None:
    from fxeq.integrations import _FirstBatches

    assert len(_FirstBatches([1, 2, 3], 2)) == 2 and len(_FirstBatches([1], None)) == 1
    with pytest.raises(TypeError, match=r"list_iterator has no len\(\)"):
        len(_FirstBatches(iter([1, 2]), 2))
    assert list(_FirstBatches(iter([1, 2, 3]), 2)) == [1, 2]
