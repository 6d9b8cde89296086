"""ppml.detection: boxes and GIoU against hand-computed values and torchvision, the matcher against brute force, the
set loss, the COCO loader against the json and pycocotools, the owner's encryption/decoding (RS membership decoded
with the keys gives the plain boxes back; the PE-free detector is permutation-equivariant), COCOeval wiring, and an
end-to-end run on the built-in data: train, stop, resume (exactly), eval, the CLI and two DDP ranks."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("scipy")
pytest.importorskip("pycocotools")
tv_ops = pytest.importorskip("torchvision.ops")

import ppml  # noqa: E402
from ppml.detection import (  # noqa: E402
    CocoDetection,
    DetectConfig,
    HungarianMatcher,
    Owner,
    SetCriterion,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    build_detector,
    coco_evaluate,
    evaluate_run,
    generalized_box_iou,
    linear_assignment,
    make_synthetic_coco,
    membership_targets,
    membership_to_boxes,
    prepare_image,
    resolve_coco,
    train,
)
from ppml.detection.data import Augment  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _random_boxes(n: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * 10
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * 5 + 0.1
    return torch.cat([xy, xy + wh], dim=1)


# ---- boxes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7 - 2 / 9),  # overlap: inter 1, union 7, hull 3x3
        ([0, 0, 1, 1], [2, 0, 3, 1], -1 / 3),  # disjoint side by side: union 2, hull 3
        ([0, 0, 1, 1], [9, 9, 10, 10], -98 / 100),  # far apart: union 2, hull 10x10
        ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16),  # nested: IoU 1/16, hull = the outer box
        ([1, 2, 3, 5], [1, 2, 3, 5], 1.0),  # identical
        ([0, 0, 2, 1], [1, 0, 3, 1], 1 / 3),  # half overlap in x: IoU 1/3, hull = union
    ],
)
def test_giou_hand_computed(a, b, expected):
    A, B = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert generalized_box_iou(A, B).item() == pytest.approx(expected, abs=1e-12)
    assert generalized_box_iou(B, A).item() == pytest.approx(expected, abs=1e-12)  # symmetric
    assert generalized_box_iou(A, B, pairwise=False).item() == pytest.approx(expected, abs=1e-12)


def test_giou_and_iou_match_torchvision():
    gen = torch.Generator().manual_seed(0)
    a, b = _random_boxes(7, gen), _random_boxes(5, gen)
    torch.testing.assert_close(generalized_box_iou(a, b), tv_ops.generalized_box_iou(a, b), rtol=0, atol=1e-12)
    torch.testing.assert_close(box_iou(a, b), tv_ops.box_iou(a, b), rtol=0, atol=1e-12)
    c = _random_boxes(7, gen)
    torch.testing.assert_close(generalized_box_iou(a, c, pairwise=False), tv_ops.generalized_box_iou(a, c).diagonal())
    # the loss differentiates through it
    a32 = a.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: generalized_box_iou(x, c, pairwise=False), (a32,))


def test_box_conversions_round_trip_and_errors():
    gen = torch.Generator().manual_seed(1)
    xyxy = _random_boxes(6, gen)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    with pytest.raises(ValueError, match=r"generalized_box_iou: boxes1 must be xyxy with x1 >= x0"):
        generalized_box_iou(torch.tensor([[2.0, 0, 1, 1]]), xyxy)
    with pytest.raises(ValueError, match=r"box_iou: boxes2 must be a float tensor \[\.\.\., 4\], got int64 \[3\]"):
        box_iou(xyxy, torch.tensor([1, 2, 3]))


def _py_iou_giou(a: list[float], b: list[float]) -> tuple[float, float]:
    """IoU and GIoU of two xyxy boxes in plain Python floats, from the definitions (Rezatofighi et al., 2019)."""
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


def test_boxes_match_a_plain_python_reference():
    """boxes.py takes its arithmetic from torchvision, so the torchvision comparison above no longer checks it
    independently: here every pair, conversion and dtype is checked against definitions written out in Python."""
    gen = torch.Generator().manual_seed(5)
    a, b = _random_boxes(9, gen), _random_boxes(6, gen)
    b[0] = a[0]  # identical boxes: IoU 1
    b[1] = torch.tensor([30.0, 30.0, 31.0, 32.0], dtype=torch.float64)  # disjoint from every box of a
    iou, giou, giou_elem = box_iou(a, b), generalized_box_iou(a, b), generalized_box_iou(a[:6], b, pairwise=False)
    for i, j in itertools.product(range(9), range(6)):
        ref_iou, ref_giou = _py_iou_giou(a[i].tolist(), b[j].tolist())
        assert iou[i, j].item() == pytest.approx(ref_iou, abs=1e-12)
        assert giou[i, j].item() == pytest.approx(ref_giou, abs=1e-12)
        if i == j:
            assert giou_elem[i].item() == pytest.approx(ref_giou, abs=1e-12)
    assert iou[0, 0].item() == pytest.approx(1.0) and (iou[:, 1] == 0).all() and (giou[:, 1] < 0).all()
    # conversions, from their definitions
    x0, y0, x1, y1 = a.unbind(-1)
    torch.testing.assert_close(box_xyxy_to_cxcywh(a), torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), 1))
    cx, cy, w, h = b.unbind(-1)
    torch.testing.assert_close(box_cxcywh_to_xyxy(b), torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 1))
    torch.testing.assert_close(ppml.detection.box_xywh_to_xyxy(b), torch.stack((cx, cy, cx + w, cy + h), 1))
    torch.testing.assert_close(ppml.detection.box_area(a), (x1 - x0) * (y1 - y0))
    assert ppml.detection.box_area(torch.tensor([[2.0, 0, 1, 1]])).item() == 0  # negative extents count as 0
    # the result keeps the inputs' dtype (torchvision computes half precision in float32); batched elementwise form
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ad, bd = a.to(dtype), b.to(dtype)
        for got in (box_iou(ad, bd), generalized_box_iou(ad, bd), generalized_box_iou(ad[:6], bd, pairwise=False)):
            assert got.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(generalized_box_iou(ad, bd).double(), giou, rtol=0, atol=tol)
    batched = generalized_box_iou(a[:6].view(2, 3, 4), b.view(2, 3, 4), pairwise=False)
    torch.testing.assert_close(batched, giou_elem.view(2, 3))
    with pytest.raises(ValueError, match=r"generalized_box_iou: boxes1 must be a float tensor \[N, 4\], got float64"):
        generalized_box_iou(a.view(3, 3, 4), b)


def test_box_ops_need_torchvision_only_when_called(monkeypatch):
    """`import ppml.detection` (and so `ppml --help`) loads no torchvision; a box op without it names the extra."""
    code = "import sys, ppml.detection; assert 'torchvision' not in sys.modules, 'torchvision was imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "torchvision.ops", None)  # what an environment without torchvision gives
    with pytest.raises(ImportError, match=r'box ops need torchvision.*pip install "ppml\[detect\]"'):
        box_iou(torch.zeros(1, 4), torch.zeros(1, 4))


# ---- matcher -----------------------------------------------------------------------------------------------------


def _brute_force(cost: torch.Tensor) -> tuple[float, list[tuple[int, int]]]:
    """Minimum over every injective map from the smaller side to the larger one."""
    Q, K = cost.shape
    best, arg = float("inf"), None
    if K <= Q:
        for rows in itertools.permutations(range(Q), K):
            c = sum(cost[r, k].item() for k, r in enumerate(rows))
            if c < best:
                best, arg = c, sorted((r, k) for k, r in enumerate(rows))
    else:
        for cols in itertools.permutations(range(K), Q):
            c = sum(cost[q, k].item() for q, k in enumerate(cols))
            if c < best:
                best, arg = c, sorted(enumerate(cols))
    return best, arg


@pytest.mark.parametrize("Q,K", [(1, 1), (3, 1), (4, 2), (5, 3), (5, 5), (6, 4), (2, 4)])
def test_linear_assignment_equals_brute_force(Q, K):
    gen = torch.Generator().manual_seed(10 * Q + K)
    for _ in range(5):
        cost = torch.randn(Q, K, generator=gen, dtype=torch.float64)
        rows, cols = linear_assignment(cost)
        best, pairs = _brute_force(cost)
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-12)
        # continuous random costs: the optimum is unique
        assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == pairs


def test_hungarian_matcher_matches_brute_force_on_an_independent_cost():
    """The matcher's assignment minimises DETR's cost computed here with torchvision's GIoU (box head) and with
    plain per-pair BCE/dice (membership head)."""
    gen = torch.Generator().manual_seed(3)
    B, Q, C = 3, 5, 4
    logits = torch.randn(B, Q, C + 1, generator=gen)
    boxes = box_xyxy_to_cxcywh(_random_boxes(B * Q, gen, torch.float32) / 16).view(B, Q, 4)
    targets = []
    for k in (1, 3, 5):
        targets.append({"labels": torch.randint(0, C, (k,), generator=gen),
                        "boxes": box_xyxy_to_cxcywh(_random_boxes(k, gen, torch.float32) / 16)})
    targets.append({"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)})
    logits = torch.cat([logits, torch.randn(1, Q, C + 1, generator=gen)])
    boxes = torch.cat([boxes, boxes[:1]])
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    got = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for b, t in enumerate(targets):
        p, j = got[b]
        if not len(t["labels"]):
            assert p.numel() == 0 and j.numel() == 0
            continue
        prob = logits[b].softmax(-1)
        cost = torch.empty(Q, len(t["labels"]), dtype=torch.float64)
        for q, k in itertools.product(range(Q), range(len(t["labels"]))):
            giou = tv_ops.generalized_box_iou(tv_ops.box_convert(boxes[b, q : q + 1], "cxcywh", "xyxy"),
                                              tv_ops.box_convert(t["boxes"][k : k + 1], "cxcywh", "xyxy"))
            cost[q, k] = (-prob[q, t["labels"][k]] + 5 * (boxes[b, q] - t["boxes"][k]).abs().sum() - 2 * giou).item()
        best, pairs = _brute_force(cost)
        assert sorted(zip(p.tolist(), j.tolist(), strict=True)) == pairs
    # membership head: BCE and dice per pair, one at a time
    masks_pred = torch.randn(1, Q, 12, generator=gen)
    t = {"labels": torch.tensor([0, 2, 1]), "masks": (torch.rand(3, 12, generator=gen) > 0.5).float()}
    (p, j), = HungarianMatcher(cost_mask=5, cost_dice=2)({"pred_logits": logits[:1], "pred_masks": masks_pred}, [t])
    cost = torch.empty(Q, 3, dtype=torch.float64)
    for q, k in itertools.product(range(Q), range(3)):
        x, m = masks_pred[0, q], t["masks"][k]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(x, m)
        dice = 1 - (2 * (x.sigmoid() * m).sum() + 1) / (x.sigmoid().sum() + m.sum() + 1)
        cost[q, k] = (-logits[0, q].softmax(-1)[t["labels"][k]] + 5 * bce + 2 * dice).item()
    assert sorted(zip(p.tolist(), j.tolist(), strict=True)) == _brute_force(cost)[1]


def test_linear_assignment_rejects_bad_costs():
    with pytest.raises(ValueError, match=r"linear_assignment: cost must be a float tensor \[Q, K\], got int64 \[3\]"):
        linear_assignment(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cost must be finite"):
        linear_assignment(torch.tensor([[float("nan"), 1.0]]))


# ---- loss --------------------------------------------------------------------------------------------------------


def test_set_criterion_terms():
    """Predictions that are the targets in another order: L1 = 0, 1 − GIoU = 0 after matching; a shifted box gives
    exactly the L1 and GIoU terms computed by hand; CE weighs 'no object' by eos_coef."""
    gen = torch.Generator().manual_seed(5)
    C, Q = 3, 4
    tgt = box_xyxy_to_cxcywh(torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.8]]))
    labels = torch.tensor([2, 0])
    pred_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], *tgt.flip(0).tolist(), [0.3, 0.3, 0.1, 0.1]])[None]
    logits = torch.randn(1, Q, C + 1, generator=gen)
    crit = SetCriterion(C, eos_coef=0.1)
    out = crit({"pred_logits": logits, "pred_boxes": pred_boxes}, [{"labels": labels, "boxes": tgt}])
    assert out["loss_bbox"].item() == pytest.approx(0, abs=1e-7)
    assert out["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    # CE by hand: slots 1, 2 hold targets 1, 0 (labels 0, 2), slots 0, 3 are 'no object' (index C) with weight 0.1
    tc = torch.tensor([C, 0, 2, C])
    w = torch.where(tc == C, torch.tensor(0.1), torch.tensor(1.0))
    nll = -logits[0].log_softmax(-1)[torch.arange(Q), tc]
    assert out["loss_ce"].item() == pytest.approx(((w * nll).sum() / w.sum()).item(), rel=1e-6)
    shifted = tgt.clone()
    shifted[:, 0] += 0.05
    out = crit({"pred_logits": logits[:, :2], "pred_boxes": shifted[None]}, [{"labels": labels, "boxes": tgt}])
    assert out["loss_bbox"].item() == pytest.approx(2 * 0.05 / 2, rel=1e-5)
    giou = tv_ops.generalized_box_iou(box_cxcywh_to_xyxy(shifted), box_cxcywh_to_xyxy(tgt)).diagonal()
    assert out["loss_giou"].item() == pytest.approx(((1 - giou).sum() / 2).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(
        (out["loss_ce"] + 5 * out["loss_bbox"] + 2 * out["loss_giou"]).item(), rel=1e-6)


# ---- COCO loader -------------------------------------------------------------------------------------------------


def _write_coco(root, gen: torch.Generator) -> dict:
    from PIL import Image

    os.makedirs(root / "train")
    os.makedirs(root / "annotations")
    images, anns = [], []
    sizes = [(40, 30), (24, 48), (32, 32)]
    for i, (w, h) in enumerate(sizes):
        arr = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / "train" / f"img{i}.png")
        images.append({"id": 10 + i, "file_name": f"img{i}.png", "width": w, "height": h})
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2.5, 3.0, 10.0, 12.25], "area": 100.0, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20.0, 1.0, 15.0, 20.0], "area": 250.0, "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 7, "bbox": [0.0, 0.0, 24.0, 48.0], "area": 900.0, "iscrowd": 0},
        {"id": 4, "image_id": 11, "category_id": 3, "bbox": [1.0, 1.0, 5.0, 5.0], "area": 20.0, "iscrowd": 1},
        {"id": 5, "image_id": 11, "category_id": 3, "bbox": [4.0, 4.0, 0.0, 5.0], "area": 0.0, "iscrowd": 0},
    ]  # image 12 has no object; a crowd box and an empty box are left out
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]}
    with open(root / "annotations" / "instances_train.json", "w") as fh:
        json.dump(coco, fh)
    return coco


def test_coco_loader_round_trips_the_json(tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    coco = _write_coco(tmp_path, torch.Generator().manual_seed(0))
    images_dir, ann = resolve_coco(str(tmp_path), "train")
    ds = CocoDetection(images_dir, ann)
    assert len(ds) == 3 and ds.categories == [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    back = ds.coco_dict()
    assert back["images"] == coco["images"] and back["categories"] == ds.categories
    kept = [a for a in coco["annotations"] if a["id"] in (1, 2, 3)]
    assert back["annotations"] == kept
    gt = COCO(ann)  # an independent reader of the same file
    for i in range(len(ds)):
        img, t = ds[i]
        info = ds.images[i]
        with Image.open(images_dir + "/" + info["file_name"]) as im:
            assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(np.array(im.convert("RGB"))))
        ref = gt.loadAnns(gt.getAnnIds(imgIds=info["id"], iscrowd=False))
        ref = [a for a in ref if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in ref)]
        assert t["boxes"].tolist() == xyxy and t["image_id"] == info["id"]
        assert [ds.categories[k]["id"] for k in t["labels"].tolist()] == [a["category_id"] for a in ref]
        assert t["orig_size"] == (info["height"], info["width"])
    with pytest.raises(FileNotFoundError, match="no COCO split 'val'"):
        resolve_coco(str(tmp_path), "val")


def test_prepare_image_boxes_map_back_and_augment(tmp_path):
    img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t = {"boxes": torch.tensor([[2.0, 3.0, 12.0, 15.0], [20.0, 1.0, 40.0, 30.0]]), "labels": torch.tensor([1, 0])}
    canvas, out = prepare_image(img, t, 32)
    assert canvas.shape == (3, 32, 32) and out["scale"] == (32 / 40, 24 / 30)
    assert (canvas[:, 24:] == 0).all()  # padding below the 32x24 resized image
    sx, sy = out["scale"]
    back = box_cxcywh_to_xyxy(out["boxes"]) * 32 / torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(back, t["boxes"])
    # a certain flip with no crop and no rescale: the boxes mirror, the pixels mirror
    flip = Augment(hflip=1.0, crop=0.0, scale_min=1.0)
    canvas_f, out_f = prepare_image(img, t, 32, augment=flip, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(canvas_f[:, :24, :32], canvas[:, :24, :32].flip(-1), atol=1e-5, rtol=0)
    exp = box_cxcywh_to_xyxy(out["boxes"])
    exp = torch.stack([1 - exp[:, 2], exp[:, 1], 1 - exp[:, 0], exp[:, 3]], 1)
    torch.testing.assert_close(box_cxcywh_to_xyxy(out_f["boxes"]), exp)
    # crops keep only boxes that stay in the crop; boxes stay inside the canvas
    crop = Augment(hflip=0.0, crop=1.0, crop_min=0.3)
    for s in range(10):
        _, o = prepare_image(img, t, 32, augment=crop, generator=torch.Generator().manual_seed(s))
        xyxy = box_cxcywh_to_xyxy(o["boxes"])
        assert len(o["labels"]) == len(xyxy) and ((xyxy >= -1e-6) & (xyxy <= 1 + 1e-6)).all()


# ---- the owner's side: encryption, RS membership, decoding -------------------------------------------------------


def test_membership_decoded_with_the_keys_gives_the_plain_boxes():
    """Perfect membership predictions in RS token order, decoded by the owner with the keys, are the plain boxes."""
    gen = torch.Generator().manual_seed(0)
    owner = Owner("rs", 8, 32, head="membership")
    boxes = box_xyxy_to_cxcywh(torch.tensor([[0.1, 0.2, 0.45, 0.9], [0.5, 0.05, 0.97, 0.3], [0.3, 0.3, 0.32, 0.33]]))
    canvases = torch.randn(2, 3, 32, 32, generator=gen)
    targets = [{"labels": torch.tensor([0, 1, 1]), "boxes": boxes}, {"labels": torch.tensor([1]), "boxes": boxes[:1]}]
    x, trainer_targets, keys = owner.encrypt(canvases, targets, generator=gen)
    assert torch.equal(x, ppml.shuffle_patches(canvases, 8, keys)[0]) and "boxes" not in trainer_targets[0]
    # the trainer's targets are the plain-grid ones, moved with the tokens
    masks, ext = membership_targets(boxes, (4, 4))
    assert torch.equal(trainer_targets[0]["masks"], masks[:, keys[0]])
    Q = 3
    pm = torch.full((2, Q, 16), -20.0)
    pe = torch.zeros(2, Q, 16, 4)
    for b, t in enumerate(trainer_targets):
        k = len(t["labels"])
        pm[b, :k] = t["masks"] * 40 - 20
        pe[b, :k] = t["extents"]
    logits = torch.full((2, Q, 3), -10.0)
    logits[0, :, 0] = 10
    scores, labels, dec = owner.detections({"pred_logits": logits, "pred_masks": pm, "pred_extents": pe}, keys)
    torch.testing.assert_close(dec[0], box_cxcywh_to_xyxy(boxes), atol=1e-6, rtol=0)
    torch.testing.assert_close(dec[1, 0], box_cxcywh_to_xyxy(boxes[0]), atol=1e-6, rtol=0)
    # without the keys the same predictions decode to other boxes (the layout stays with the owner)
    _, _, wrong = owner.detections({"pred_logits": logits, "pred_masks": pm, "pred_extents": pe}, None)
    assert not torch.allclose(wrong[0], dec[0], atol=0.05)
    # unshuffled tokens (no keys) decode directly
    b2, _ = membership_to_boxes((masks * 40 - 20)[None], ext[None], (4, 4))
    torch.testing.assert_close(b2[0], boxes, atol=1e-6, rtol=0)


def test_rs_detector_is_permutation_equivariant():
    """pevit + membership head: shuffling the input's patches permutes the per-token outputs the same way and leaves
    the class scores unchanged — so the owner's decoded boxes do not depend on the key."""
    torch.manual_seed(0)
    model = build_detector(3, encryption="rs", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                           num_det_tokens=4).eval()
    x = torch.randn(2, 3, 32, 32)
    perm = ppml.random_permutations(2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), model(ppml.shuffle_patches(x, 8, perm)[0])
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"], atol=1e-5, rtol=0)
    idx = perm[:, None, :].expand(-1, 4, -1)
    torch.testing.assert_close(b["pred_masks"], a["pred_masks"].gather(2, idx), atol=1e-5, rtol=0)
    owner = Owner("rs", 8, 32, head="membership")
    torch.testing.assert_close(owner.detections(b, perm)[2], owner.detections(a, None)[2], atol=1e-5, rtol=0)


def test_mi_detector_takes_the_ciphertext():
    model = build_detector(2, encryption="mi", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                           num_det_tokens=3)
    x, _, keys = Owner("mi", 8, 32).encrypt(torch.randn(2, 3, 32, 32), [], None)
    assert x.shape == (2, 3, 16, 16) and keys is None
    out = model(x)
    assert out["pred_logits"].shape == (2, 3, 3) and out["pred_boxes"].shape == (2, 3, 4)
    with pytest.raises(ValueError, match="MIViT: input must be the MI ciphertext"):
        model(torch.randn(2, 3, 32, 32))


# ---- COCOeval wiring ---------------------------------------------------------------------------------------------


def test_coco_evaluate_perfect_and_shifted(tmp_path):
    coco = _write_coco(tmp_path, torch.Generator().manual_seed(0))
    coco["annotations"] = [a for a in coco["annotations"] if a["id"] != 5]  # no zero-width box: a perfect AP is 1
    ann = str(tmp_path / "gt.json")
    with open(ann, "w") as fh:
        json.dump(coco, fh)
    gt = [a for a in coco["annotations"] if not a["iscrowd"]]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt]
    stats = coco_evaluate(ann, perfect, log=False)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    # every box moved by half its width: IoU 1/3 < 0.5, so nothing counts
    half = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] / 2, *r["bbox"][1:]]) for r in perfect]
    assert coco_evaluate(ann, half, log=False)["AP50"] == pytest.approx(0.0)
    assert coco_evaluate(ann, [], log=False) == dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), 0.0)


# ---- built-in data and end-to-end ----------------------------------------------------------------------------------

TINY = dict(synthetic_train=40, synthetic_val=12, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
            num_det_tokens=5, batch_size=16, epochs=2, lr=1e-3, warmup_epochs=0.5, eval_every=0)


@pytest.fixture
def one_thread():
    """The tiny models train several times faster on one thread than on two oversubscribed cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("det") / "synthetic")
    make_synthetic_coco(root, 40, 12)
    return root


def test_synthetic_set_is_deterministic_and_exact(synthetic_root, tmp_path):
    from pycocotools.coco import COCO

    other = str(tmp_path / "again")
    make_synthetic_coco(other, 40, 12)
    for split in ("train", "val"):
        a = open(os.path.join(synthetic_root, "annotations", f"instances_{split}.json")).read()
        assert a == open(os.path.join(other, "annotations", f"instances_{split}.json")).read()
    for name in ("000000.png", "000007.png"):
        assert open(os.path.join(synthetic_root, "train", name), "rb").read() == \
            open(os.path.join(other, "train", name), "rb").read()
    assert make_synthetic_coco(synthetic_root, 40, 12)["root"] == synthetic_root  # reused, not rewritten
    with pytest.raises(FileExistsError, match="other settings"):
        make_synthetic_coco(synthetic_root, 41, 12)
    gt = COCO(os.path.join(synthetic_root, "annotations", "instances_train.json"))
    assert len(gt.getImgIds()) == 40 and sorted(gt.getCatIds()) == [1, 2, 3]
    for img_id in gt.getImgIds():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 4
        for a in anns:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 192 and y + h <= 144 and 0 < a["area"] <= w * h



def test_synthetic_set_made_by_two_processes_at_once(tmp_path, monkeypatch):
    """Two runs started together on one folder: the one that finishes second uses the first one's set (it used to
    fail with 'Directory not empty'); a set with other settings is still refused."""
    import ppml.detection.synthetic as synthetic

    root = str(tmp_path / "shared")
    draw, raced = synthetic._draw_image, []

    def draw_while_another_process_finishes(*args, **kwargs):
        if not raced:
            raced.append(True)
            monkeypatch.setattr(synthetic, "_draw_image", draw)
            make_synthetic_coco(root, 6, 2)  # the other process: starts later, finishes first
            monkeypatch.setattr(synthetic, "_draw_image", draw_while_another_process_finishes)
        return draw(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_draw_image", draw_while_another_process_finishes)
    assert make_synthetic_coco(root, 6, 2)["root"] == root and raced
    assert sorted(os.listdir(tmp_path)) == ["shared"]  # no temporary folder left behind
    assert len(os.listdir(os.path.join(root, "train"))) == 6
    raced.clear()
    other = str(tmp_path / "other")

    def draw_while_a_different_set_lands(*args, **kwargs):
        if not raced:
            raced.append(True)
            monkeypatch.setattr(synthetic, "_draw_image", draw)
            make_synthetic_coco(other, 5, 2)
            monkeypatch.setattr(synthetic, "_draw_image", draw_while_a_different_set_lands)
        return draw(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_draw_image", draw_while_a_different_set_lands)
    with pytest.raises(OSError):
        make_synthetic_coco(other, 6, 2)
    assert sorted(os.listdir(tmp_path)) == ["other", "shared"]


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ---- the spatial prior on the [DET] tokens ----------------------------------------------------------------------


def _prior_model(depth: int = 2, **kw):
    torch.manual_seed(0)
    model = build_detector(3, encryption="none", img_size=32, patch_size=8, embed_dim=24, depth=depth, num_heads=3,
                           num_det_tokens=5, **kw).eval()
    with torch.no_grad():  # away from the initial grid and scales, so an index mix-up cannot hide
        model.det_reference.normal_(0, 1)
        model.det_prior_scale.normal_(2, 1)
    return model


def test_det_attention_bias_matches_a_loop():
    model = _prior_model()
    bias = model.det_attention_bias()
    gh, gw = model.grid_size
    n, q, heads = gh * gw, model.num_det_tokens, 3
    assert bias.shape == (heads, n + q, n + q)
    expected = torch.zeros(heads, n + q, n + q)
    ref = torch.sigmoid(model.det_reference.detach())
    scale = torch.log1p(torch.exp(model.det_prior_scale.detach()))  # softplus, written out
    for h in range(heads):
        for j in range(q):
            for tile in range(n):
                cx, cy = (tile % gw + 0.5) / gw, (tile // gw + 0.5) / gh
                expected[h, n + j, tile] = -scale[h] * ((ref[j, 0] - cx) ** 2 + (ref[j, 1] - cy) ** 2)
    torch.testing.assert_close(bias.detach(), expected)
    assert model.det_attention_bias().requires_grad  # reference points and scales are learned


def test_det_prior_attention_against_a_hand_written_block():
    """One block, recomputed by hand from its weights (attention softmax(q k^T / sqrt(d) + bias) v, pre-norm MLP):
    the bias reaches the [DET] rows of the attention and nothing else."""
    model = _prior_model(depth=1)
    x = torch.randn(2, 3, 32, 32)
    bb = model.backbone
    with torch.no_grad():
        patches, det = model.forward_tokens(x)
        t = bb._pos_embed(bb.patch_embed(x))
        t = torch.cat([t, (model.det_token + model.det_pos_embed).expand(2, -1, -1)], dim=1)
        blk = bb.blocks[0]
        a = blk.norm1(t)
        heads, d = blk.attn.num_heads, t.shape[-1] // blk.attn.num_heads
        qkv = torch.nn.functional.linear(a, blk.attn.qkv.weight, blk.attn.qkv.bias)
        qkv = qkv.reshape(2, -1, 3, heads, d).permute(2, 0, 3, 1, 4)
        logits = qkv[0] @ qkv[1].transpose(-1, -2) / d**0.5 + model.det_attention_bias()[None]
        att = (logits.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(2, -1, heads * d)
        t = t + torch.nn.functional.linear(att, blk.attn.proj.weight, blk.attn.proj.bias)
        t = t + blk.mlp(blk.norm2(t))
        t = bb.norm(t)
    n = patches.shape[1]
    torch.testing.assert_close(patches, t[:, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(det, t[:, n:], rtol=1e-4, atol=1e-5)


def test_det_prior_none_is_yolos_and_box_centres_are_relative():
    """With the scales at ~0 the biased blocks compute what plain YOLOS computes; the box centre is then the plain
    model's raw output shifted by the slot's reference logit."""
    prior = _prior_model()
    plain = build_detector(3, encryption="none", img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3,
                           num_det_tokens=5, det_prior="none").eval()
    state = {k: v for k, v in prior.state_dict().items() if not k.startswith("det_")} | {
        "det_token": prior.det_token, "det_pos_embed": prior.det_pos_embed}
    plain.load_state_dict(state)
    with torch.no_grad():
        prior.det_prior_scale.fill_(-60.0)  # softplus(-60) ~ 1e-26
        x = torch.randn(2, 3, 32, 32)
        a, b = prior(x), plain(x)
        raw = torch.logit(b["pred_boxes"].double())
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["pred_boxes"][..., 2:], b["pred_boxes"][..., 2:], rtol=1e-5, atol=1e-6)
    centre = torch.sigmoid(raw[..., :2] + prior.det_reference.detach().double())
    torch.testing.assert_close(a["pred_boxes"][..., :2].double(), centre, rtol=1e-4, atol=1e-5)


def test_det_prior_defaults_and_errors():
    from ppml.detection import YOLOS
    from ppml.detection.engine import saved_config

    common = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3, num_det_tokens=4)
    assert build_detector(3, encryption="none", **common).det_prior == "gaussian"
    assert build_detector(3, encryption="mi", **common).det_prior == "gaussian"
    assert build_detector(3, encryption="none", head="membership", **common).det_prior == "none"
    assert build_detector(3, encryption="rs", **common).det_prior == "none"
    assert build_detector(3, encryption="rs", head="box", **common).det_prior == "none"
    with pytest.raises(ValueError, match="det_prior='gaussian'.*position embeddings"):
        build_detector(3, encryption="rs", head="box", det_prior="gaussian", **common)
    with pytest.raises(ValueError, match="det_prior must be one of gaussian, none, got 'grid'"):
        YOLOS(build_detector(3, **common).backbone, 3, 4, det_prior="grid")
    with pytest.raises(ValueError, match="--det-prior must be one of gaussian, none"):
        DetectConfig(det_prior="grid").check()
    with pytest.raises(ValueError, match="has no bias"):
        build_detector(3, det_prior="none", **common).det_attention_bias()
    # checkpoints from before the prior existed are plain YOLOS; newer ones keep their setting
    assert saved_config({"config": {"encryption": "none"}})["det_prior"] == "none"
    assert saved_config({"config": {"det_prior": None}})["det_prior"] is None


@pytest.mark.parametrize("encryption,det_prior", [("none", "gaussian"), ("mi", "gaussian"), ("none", "none"),
                                                   ("mi", "none")])
def test_box_head_overfits_a_batch(synthetic_root, encryption, det_prior, one_thread):
    """The fastest check that targets, matcher, loss, gradients and decoding fit together: a small box-head detector
    memorises 8 built-in images (their canvases as the trainer gets them) to a near-zero set loss, and the owner's
    decoded detections then land on the ground-truth boxes with the right labels."""
    images = CocoDetection(*resolve_coco(synthetic_root, "train"))
    items = [prepare_image(*images[i], 32) for i in range(8)]
    owner = Owner(encryption, 8, 32)
    x, targets, keys = owner.encrypt(torch.stack([c for c, _ in items]), [t for _, t in items])
    torch.manual_seed(0)
    model = build_detector(images.num_classes, encryption=encryption, img_size=32, patch_size=8, embed_dim=48,
                           depth=2, num_heads=3, num_det_tokens=6, det_prior=det_prior)
    assert model.det_prior == det_prior
    crit = SetCriterion(images.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):  # the smallest objects' boxes need ~400 steps to reach IoU > 0.5 with the prior on MI
        losses = crit(model(x), targets)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert losses["loss_ce"].item() < 0.1 and losses["loss_bbox"].item() < 0.05 and losses["loss_giou"].item() < 0.25
    model.eval()
    with torch.no_grad():
        scores, labels, boxes = owner.detections(model(x), keys)
    for b, t in enumerate(targets):
        top = scores[b].argsort(descending=True)[: len(t["labels"])]
        iou = box_iou(boxes[b, top], box_cxcywh_to_xyxy(t["boxes"]))
        best = iou.max(0)
        assert bool((best.values > 0.5).all()), (b, iou)
        assert labels[b, top][best.indices].tolist() == t["labels"].tolist()


@pytest.mark.parametrize("encryption", ["none", "rs"])
def test_train_stop_resume_eval(synthetic_root, tmp_path, encryption, one_thread):
    """2 epochs of 3 steps; stopped after 4 steps (mid-epoch 2) and resumed, the run ends with exactly the parameters
    and metrics of the uninterrupted one (RS: keys from --key-seed); eval reproduces the final AP."""
    common = dict(TINY, encryption=encryption, key_seed=7, synthetic_root=synthetic_root)
    ref = train(DetectConfig(out=str(tmp_path / "ref"), **common))
    assert ref["final"] and set(ref) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    cfg = DetectConfig(out=str(tmp_path / "cut"), **common)
    stopped = train(cfg, stop_after=4)
    assert stopped["stopped"] and (stopped["epoch"], stopped["step"]) == (2, 1)
    resumed = train(cfg, resume=True)
    assert resumed["param_digests"] == ref["param_digests"]
    assert resumed["AP"] == ref["AP"] and resumed["train_loss"] == ref["train_loss"]
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731
    assert untimed(_metrics(cfg.out)) == untimed(_metrics(str(tmp_path / "ref")))
    assert [r["epoch"] for r in _metrics(cfg.out)] == [1, 2]
    ev = evaluate_run(cfg.out)
    assert ev["AP"] == ref["AP"] and ev["images"] == 12
    assert json.load(open(os.path.join(cfg.out, "eval.json")))["AP50"] == ref["AP50"]
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        train(DetectConfig(out=cfg.out, **dict(common, lr=2e-3)), resume=True)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(DetectConfig(out=cfg.out, **common))


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=TESTS_DIR,
                          env={**os.environ, **(env or {})})


def test_cli_errors_and_help(tmp_path, capsys):
    from ppml.cli import main

    assert main(["detect", "train", "--img-size", "30", "--patch-size", "8", "--out", str(tmp_path / "x")]) == 2
    assert "ppml detect: --patch-size must divide --img-size" in capsys.readouterr().err
    assert main(["detect", "eval", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["detect", "train", "--help"])
    assert "--num-det-tokens" in capsys.readouterr().out


def test_ddp_two_cpu_ranks_and_cli_eval(synthetic_root, tmp_path, capsys, one_thread):
    """torchrun, 2 gloo processes, MI: both ranks hold the same parameters at every checkpoint; `ppml detect eval`
    on the result prints the AP line and writes eval.json."""
    out = str(tmp_path / "ddp")
    flags = ["--encryption", "mi", "--synthetic-root", synthetic_root, "--synthetic-train", "40", "--synthetic-val",
             "12", "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
             "--num-det-tokens", "5", "--batch-size", "8", "--epochs", "1", "--out", out]
    res = _cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ppml", "detect", "train",
               *flags, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["final"] and len(summary["param_digests"]) == 2
    assert summary["param_digests"][0] == summary["param_digests"][1]
    assert _metrics(out)[0]["world_size"] == 2
    from ppml.cli import main

    capsys.readouterr()
    assert main(["detect", "eval", "--out", out]) == 0  # one process evaluates what two trained
    res = capsys.readouterr()
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in res.err
    ev = json.loads(res.out.strip().splitlines()[-1])
    assert ev["AP"] == pytest.approx(summary["AP"], abs=1e-3) and os.path.exists(os.path.join(out, "eval.json"))


# ---- CUDA set-up, checked without a GPU (torch.cuda and the process-group set-up mocked: conftest's fake_cuda) ----
TORCHRUN_RANK1 = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}


@pytest.mark.parametrize("device,env,expected", [("cuda", {}, 0), ("auto", {}, 0), ("cuda:1", {}, 1),
                                                 ("cuda", TORCHRUN_RANK1, 1)])
def test_detect_cuda_setup_gets_a_device_with_an_index(fake_cuda, monkeypatch, tmp_path, device, env, expected):
    from conftest import backend_device_types

    from ppml.detection.engine import _DetectRun

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = _DetectRun(DetectConfig(device=device, out=str(tmp_path / "run"), **TINY))
    assert fake_cuda.set_device == [expected]
    assert r.device == torch.device("cuda", expected) and r.amp
    if env:  # the epoch's loss sums are all-reduced as a CPU tensor: the group must take CPU tensors too
        (backend,) = fake_cuda.backends
        assert backend_device_types(backend) >= {"cpu", "cuda"}
    else:
        assert fake_cuda.backends == []


def test_detect_eval_cuda_setup_gets_a_device_with_an_index(fake_cuda, monkeypatch, tmp_path):
    """`ppml detect eval --device cuda` goes through the same set-up (stopped right after it)."""
    import dataclasses

    from ppml.detection import engine

    path = str(tmp_path / "checkpoint.pt")
    torch.save({"config": dataclasses.asdict(DetectConfig(out=str(tmp_path), **TINY))}, path)

    def stop(*args, **kwargs):
        raise RuntimeError("stop after the device set-up")

    monkeypatch.setattr(engine, "load_splits", stop)
    with pytest.raises(RuntimeError, match="stop after the device set-up"):
        evaluate_run(str(tmp_path), device="cuda")
    assert fake_cuda.set_device == [0]
    for k, v in TORCHRUN_RANK1.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="ppml detect eval: --device cuda:0 under torchrun"):
        evaluate_run(str(tmp_path), device="cuda:0")
    assert fake_cuda.set_device == [0]


def test_detect_cuda_setup_refuses_an_index_other_than_local_rank(fake_cuda, monkeypatch, tmp_path):
    from ppml.detection.engine import _DetectRun

    for k, v in TORCHRUN_RANK1.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="ppml detect: --device cuda:0 under torchrun"):
        _DetectRun(DetectConfig(device="cuda:0", out=str(tmp_path / "run"), **TINY))
    assert fake_cuda.set_device == [] and fake_cuda.backends == []
