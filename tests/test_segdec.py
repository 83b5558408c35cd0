"""SegDecNet (competition.classifier.segdec): the loss schedule, distance weighting, mixed supervision
(weak positives reach the decision head only), learning to separate painted defects, a whole fold with
its map gallery, and dihedral TTA's invariance."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import config_with_folds
from torch.utils.data import DataLoader, Dataset

from competition.artifacts import read_json, run_dir
from competition.classifier.data import NORMAL, PAINTED, ImageStore, TrainDataset, fold_rows
from competition.classifier.segdec import (
    SegDecNet,
    distance_weights,
    loss_weights,
    segdec_losses,
    segmentation_loss,
)
from competition.classifier.train import predict_logits, train_fold
from competition.config import SegDecConfig
from competition.folds import load_index, read_folds
from competition.metrics import auroc

SMALL = SegDecConfig(width=8, kernel=3, volume_channels=16, volume_kernel=5)
SEGDEC = ["model.name=segdec", "model.image_size=32", "train.batch_size=8", "train.threads=1",
          "segdec.width=8", "segdec.kernel=3", "segdec.volume_channels=16", "segdec.volume_kernel=5"]


def test_losses_are_balanced_from_segmentation_to_decision():
    params = SegDecConfig(delta=0.5)
    assert loss_weights(0, 10, params) == (1.0, 0.0)
    assert loss_weights(5, 10, params) == pytest.approx((0.5, 0.25))
    assert loss_weights(9, 10, params) == pytest.approx((0.1, 0.45))
    assert loss_weights(5, 10, SegDecConfig(delta=0.5, dynamic_balance=False)) == (1.0, 0.5)


def test_distance_weights_favour_a_defect_core_over_its_rim():
    mask = np.zeros((1, 11, 11), bool)
    mask[0, 2:9, 2:9] = True  # a 7x7 defect: its centre is 4 pixels from the background
    weights = distance_weights(mask, max_weight=2.0, power=2.0)[0]
    assert weights[5, 5] == pytest.approx(2.0)  # the core: (d_max / d_max)^2 * 2
    assert weights[2, 5] == pytest.approx((1 / 4) ** 2 * 2.0)  # the rim, one pixel inside
    assert (weights[~mask[0]] == 1.0).all()  # background
    assert (distance_weights(np.zeros((1, 4, 4), bool), 2.0, 2.0) == 1.0).all()


def _batch(n: int = 4, size: int = 32, has_mask: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 1, size, size)
    masks[: n // 2, :, 8:16, 8:16] = 1.0
    return {"image": torch.randn(n, 3, size, size, generator=generator), "mask": masks,
            "label": (torch.arange(n) < n // 2).float(), "has_mask": torch.full((n,), has_mask)}


def test_the_decision_loss_does_not_reach_the_segmentation_network():
    torch.manual_seed(0)
    model = SegDecNet(SMALL)
    batch = _batch()
    output = model.forward_all(batch["image"])
    losses = segdec_losses(output, batch, torch.device("cpu"), epoch=9, epochs=10, params=SMALL)
    losses["class_loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.volume.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.segmentation.parameters())
    assert model.fc.weight.grad.abs().sum() > 0
    # without the adjustment it does
    free_params = SegDecConfig(**{**SMALL.__dict__, "gradient_adjustment": False})
    free = SegDecNet(free_params)
    free_losses = segdec_losses(free.forward_all(batch["image"]), batch, torch.device("cpu"), 9, 10, free_params)
    free_losses["class_loss"].backward()
    assert free.volume[0][0].weight.grad.abs().sum() > 0


def test_weak_positives_train_the_decision_head_only():
    torch.manual_seed(0)
    model = SegDecNet(SMALL)
    batch = _batch(has_mask=False)  # defects with image labels only
    output = model.forward_all(batch["image"])
    assert segmentation_loss(output.mask_logits, batch["mask"], batch["has_mask"], None, SMALL).item() == 0.0
    losses = segdec_losses(output, batch, torch.device("cpu"), epoch=5, epochs=10, params=SMALL)
    losses["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.volume.parameters())
    assert model.fc.weight.grad.abs().sum() > 0 and model.decision[1][0].weight.grad.abs().sum() > 0


@pytest.fixture
def segdec_cfg(tiny_data, tmp_path):
    return lambda name, *overrides: config_with_folds(tiny_data, tmp_path / name, *SEGDEC, *overrides)


def test_segdec_learns_to_separate_painted_defects(segdec_cfg):
    cfg = segdec_cfg("learn", "positives.ratio=1.0", "oversample.defect_ratio=0", "positives.curriculum=false",
                     "positives.severity=[0.0,0.3]", "positives.kinds=[scratch,hole,stain,cut]")
    train_rows, _ = fold_rows(read_folds(cfg), 0)
    dataset = TrainDataset(train_rows, cfg, ImageStore(32), with_masks=True)
    torch.manual_seed(0)
    model = SegDecNet(SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    epochs = 20
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        model.train()
        for batch in DataLoader(dataset, batch_size=16, drop_last=True):
            losses = segdec_losses(model.forward_all(batch["image"]), batch, torch.device("cpu"), epoch, epochs,
                                   SMALL)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
    dataset.set_epoch(50)  # fresh paintings on the same normals
    keep = np.flatnonzero(np.isin(dataset.plan_source, (NORMAL, PAINTED)))[:64]
    items = [dataset[int(i)] for i in keep]
    labels = np.array([float(it["label"]) for it in items])
    model.eval()
    with torch.no_grad():
        output = model.forward_all(torch.stack([it["image"] for it in items]))
    assert 0 < labels.sum() < len(labels)
    assert auroc(labels, output.logit.numpy()) > 0.8
    assert auroc(labels, output.mask_logits.amax(dim=(1, 2, 3)).numpy()) > 0.8


@pytest.mark.parametrize("geometry", [["model.resize=letterbox"],
                                      ["model.tiles.enabled=true", "model.tiles.size=24"],
                                      ["model.tiles.enabled=true", "model.tiles.size=24", "train.cpu_amp=bf16"]],
                         ids=["letterbox", "tiles", "tiles-cpu-bf16"])
def test_a_segdec_fold_writes_predictions_and_a_map_gallery(segdec_cfg, geometry):
    cfg = segdec_cfg("fold-" + geometry[0].split("=")[0], "train.epochs=1", "train.ema=true", *geometry)
    index = load_index(cfg)
    summary = train_fold(cfg, 0, read_folds(cfg, index), index[index["split"] == "test"], ImageStore(32),
                         torch.device("cpu"))
    out = run_dir(cfg.paths.work, cfg.experiment, "segdec", 0)
    for name in ("oof.csv", "test.csv", "best.pt", "maps.png", "summary.json"):
        assert (out / name).is_file(), name
    assert "segdec" in read_json(out / "summary.json")["config"] and summary["best_epoch"] == 1
    assert "mask_head" not in summary["config"]
    oof = pd.read_csv(out / "oof.csv")
    assert oof["score"].between(0, 1).all()


class _Images(Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], index

    def image_logits(self, logits: np.ndarray) -> np.ndarray:
        return logits


def test_dihedral_tta_is_invariant_to_turns_and_flips(tiny_cfg):
    torch.manual_seed(0)
    model = SegDecNet(SMALL).eval()
    images = torch.randn(3, 3, 32, 32)
    predict = lambda x, tta: predict_logits(model, DataLoader(_Images(x), batch_size=3), torch.device("cpu"),  # noqa: E731
                                            tiny_cfg, tta=tta)
    plain = predict(images, "dihedral")
    for turned in (torch.rot90(images, 1, dims=(2, 3)), images.flip(3), torch.rot90(images.flip(2), 3, dims=(2, 3))):
        np.testing.assert_allclose(predict(turned, "dihedral"), plain, rtol=1e-4, atol=1e-5)
    assert not np.allclose(predict(torch.rot90(images, 1, dims=(2, 3)), "none"), predict(images, "none"), atol=1e-5)
