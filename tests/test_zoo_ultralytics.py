"""Ultralytics YOLO necks and RT-DETR: the sites the yaml describes, and weights against an oracle.

Models are built from their yaml with random weights (``YOLO_OFFLINE=1`` and a temporary settings folder; nothing
downloads, nothing is written to the user's config). In each neck (the yaml's ``head:``),
``nn.Upsample(None, 2, "nearest")`` feeds a ``Concat`` (ultralytics/nn/modules/conv.py, ``Concat.forward``:
``torch.cat(x, self.d)``, line 643) whose output the next block's ``cv1`` reads (``C2f.forward`` and ``C3k2``,
a C2f: nn/modules/block.py:311-315; ``RepC3.forward`` reads it with ``cv1`` and ``cv2``: block.py:389-391). Two
such cats on the n-size models; the PAN cats that follow read a stride-2 Conv, no upsampling, and are no sites.
Line numbers are Ultralytics 8.4.190's. The weights are checked against :func:`models.reference_equalize`,
which shares no code with fxeq.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from models import reference_equalize

import fxeq

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="fxeq-ultralytics-"))
tasks = pytest.importorskip("ultralytics.nn.tasks")
pytestmark = pytest.mark.slow

CASES = [
    # cfg/models/v8/yolov8.yaml, head 33-39: Upsample, Concat [-1, 6], C2f (12); Upsample, Concat [-1, 4], C2f (15)
    pytest.param("DetectionModel", "yolov8n.yaml", ["model.12.cv1.conv", "model.15.cv1.conv"], id="yolov8n"),
    # v8/yolov8-seg.yaml 33-39: the same neck, a Segment head
    pytest.param("SegmentationModel", "yolov8n-seg.yaml", ["model.12.cv1.conv", "model.15.cv1.conv"],
                 id="yolov8n-seg"),
    # v8/yolov8-pose.yaml 34-40: the same neck, a Pose head (PoseModel, nn/tasks.py:793)
    pytest.param("PoseModel", "yolov8n-pose.yaml", ["model.12.cv1.conv", "model.15.cv1.conv"], id="yolov8n-pose"),
    # 11/yolo11.yaml 34-40: Upsample, Concat [-1, 6], C3k2 (13); Upsample, Concat [-1, 4], C3k2 (16)
    pytest.param("DetectionModel", "yolo11n.yaml", ["model.13.cv1.conv", "model.16.cv1.conv"], id="yolo11n"),
    # 11/yolo11-seg.yaml 34-40
    pytest.param("SegmentationModel", "yolo11n-seg.yaml", ["model.13.cv1.conv", "model.16.cv1.conv"],
                 id="yolo11n-seg"),
    # 11/yolo11-obb.yaml 34-40: the same neck, an OBB head (OBBModel, nn/tasks.py:656)
    pytest.param("OBBModel", "yolo11n-obb.yaml", ["model.13.cv1.conv", "model.16.cv1.conv"], id="yolo11n-obb"),
    # 26/yolo26.yaml 36-42: Upsample, Concat [-1, 6], C3k2 (13); Upsample, Concat [-1, 4], C3k2 (16); end2end head
    pytest.param("DetectionModel", "yolo26n.yaml", ["model.13.cv1.conv", "model.16.cv1.conv"], id="yolo26n"),
    # rt-detr/rtdetr-l.yaml 34-43: Upsample, Conv (input_proj), Concat [-2, -1], RepC3 (16); again, RepC3 (21)
    pytest.param("RTDETRDetectionModel", "rtdetr-l.yaml",
                 ["model.16.cv1.conv", "model.16.cv2.conv", "model.21.cv1.conv", "model.21.cv2.conv"], id="rtdetr-l"),
]


@pytest.mark.parametrize(("task", "yaml", "convs"), CASES)
def test_neck_sites_and_weights(task: str, yaml: str, convs: list[str]) -> None:
    torch.manual_seed(0)
    model = getattr(tasks, task)(yaml, verbose=False).eval()  # built in train mode
    original = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [torch.rand(2, 3, 32, 32, generator=g) for _ in range(2)]  # stride 32: the smallest
    report = fxeq.transform(model, data, inplace=True, progress=False).fxeq_report
    assert report.frontend == "export"  # fx cannot iterate C2f's chunk
    assert sorted(c.module for s in report.search.sites for c in s.convs) == convs
    assert all([i.upsample for i in s.inputs] == ["nearest", None] for s in report.search.sites)
    sites = [([c.module for c in s.convs], [i.channels for i in s.inputs]) for s in report.search.sites]
    expected = reference_equalize(original, sites, data).state_dict()
    folded = {n for s in report.search.sites for c in s.convs for n in (c.weight, c.bias) if n}
    for key, value in model.state_dict().items():
        if key in folded:
            torch.testing.assert_close(value, expected[key], rtol=2e-4, atol=1e-6, msg=key)
        else:
            assert torch.equal(value, original.state_dict()[key]), key
    with torch.no_grad():  # the equalized model still runs as a detector
        out = model(data[0])
    first = out[0][0] if isinstance(out[0], (tuple, list)) else out[0]  # -seg: ((boxes, protos), ...)
    assert first.shape[0] == 2
