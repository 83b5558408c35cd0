"""Self-supervised pretraining: a timm backbone learns from the competition's own images.

Without downloadable weights every backbone starts from random init, which leaves both the
classifier and the anomaly zoo near chance on real data. SimCLR (Chen et al., ICML 2020) needs no
labels: two augmented views of each image are pulled together and pushed away from the other
images' views (NT-Xent). Every image of the dataset takes part (training normals, training
defects and, by default, the unlabeled test images).

Output: `<paths.work>/pretrain/<backbone>.safetensors`, the backbone built with `num_classes=0`,
which `model.pretrained` (classifier, head re-initialised) and `zoo.backbone_weights`
(`features_only` extractor) load as any local weights; the folder `<paths.work>/pretrain` works
too. Beside it, `<paths.work>/pretrain/<backbone>/` holds last.pt (resume), history.csv,
curves.png, config.yaml and summary.json.

Monitor (no labels needed): each epoch, held-out normal training images and the same images with
painted defects are scored by the k-NN distance of their pooled backbone features to the other
normals' features; the AUROC separating the two says whether the features see defects.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import albumentations as A
import numpy as np
import pandas as pd
import timm
import torch
from albumentations.pytorch import ToTensorV2
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from competition.artifacts import pretrain_dir, pretrained_weights_path, write_csv, write_json, write_yaml
from competition.config import POSITIVE_KINDS, Config, PretrainConfig
from competition.data.transplant import NormalPool
from competition.metrics import auroc
from competition.plots import plot_pretraining_curves
from competition.preprocess import Geometry, build_albumentations, fit_to_canvas
from competition.runtime import (
    autocast,
    configure_threads,
    seed_everything,
    select_device,
    to_channels_last,
    to_device_images,
)
from competition.stage import RunFolder, results_config
from competition.training import EngineConfig, fit, warmup_cosine_schedule
from competition.weights import load_local_weights, write_state_dict

log = logging.getLogger(__name__)

# The second way out of a refusal: the weights live in <paths.work>/pretrain, shared by every experiment.
OTHER_WORK_FOLDER = "use another paths.work to keep both"


# ---------------------------------------------------------------- where the outputs go

def backbone_name(cfg: Config) -> str:
    return cfg.pretrain.backbone or cfg.model.name


# ---------------------------------------------------------------- images and views

def hold_image(image: np.ndarray, hold_size: int, resize: str = "square") -> np.ndarray:
    """The copy crops come from. "square": shrunk (never enlarged) so the shorter side is at most
    `hold_size`. "letterbox": on a square canvas of side min(hold_size, longer side), aspect kept and
    padding mirrored (`preprocess.fit_to_canvas`), so a view of the whole canvas is what a letterboxing
    model sees."""
    import cv2

    height, width = image.shape[:2]
    if resize == "letterbox":
        return fit_to_canvas(image, Geometry(image_size=min(hold_size, max(height, width)), resize=resize))[0]
    if resize != "square":
        raise ValueError(f"pretrain.resize must be square or letterbox, got {resize!r}")
    short = min(height, width)
    if short <= hold_size:
        return image
    scale = hold_size / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def load_held_images(paths: list[str], hold_size: int, progress: bool = True,
                     resize: str = "square") -> list[np.ndarray]:
    from competition.data.images import read_image

    return [hold_image(read_image(p), hold_size, resize)
            for p in tqdm(paths, desc="pretrain: reading images", disable=not progress, leave=False)]


def view_augmentation(p: PretrainConfig) -> A.Compose:
    """One random view (uint8): a resized crop at a random scale, then the configured augmentations."""
    crop = A.RandomResizedCrop(size=(p.image_size, p.image_size), scale=tuple(p.crop_scale))
    return A.Compose([crop, *build_albumentations(p.augment, "pretrain.augment")])


def normalisation(mean: list[float], std: list[float]) -> A.Compose:
    return A.Compose([A.Normalize(mean=mean, std=std), ToTensorV2()])


def whole_image_transform(image_size: int, mean: list[float], std: list[float], resize: str = "square") -> A.Compose:
    """The whole image fitted to the square by `resize` (a stretch, or a letterbox as `preprocess.fit_to_canvas`)
    and normalised: how the monitor (and downstream models) see it."""
    if resize == "square":
        fit = A.Resize(image_size, image_size)
    else:
        fit = A.Lambda(image=partial(_fitted_to_canvas, geometry=Geometry(image_size=image_size, resize=resize)))
    return A.Compose([fit, A.Normalize(mean=mean, std=std), ToTensorV2()])


def _fitted_to_canvas(image: np.ndarray, geometry: Geometry, **_: Any) -> np.ndarray:
    return fit_to_canvas(image, geometry)[0]


PAINT_ATTEMPTS = 5  # a painter may find nothing visible to change (a flat crop); then another draw


def paint_anomaly(image: np.ndarray, rng: np.random.Generator, kinds: list[str] | None = None,
                  pool: NormalPool | None = None, exclude: str | None = None) -> np.ndarray | None:
    """`random_anomaly` of the painters over `kinds` (None: the painters' mix; nsa reads `pool`), redrawn
    when a draw changes nothing visible; None if none did."""
    from competition.data.anomalies import random_anomaly

    for _ in range(PAINT_ATTEMPTS):
        try:
            return random_anomaly(image, rng, kinds=kinds, pool=pool, exclude=exclude)[0]
        except RuntimeError:
            continue
    return None


class PretrainViews(Dataset):
    """Item i: two random views of image i (NT-Xent's positive pair), i itself, and, when
    `painted`, a third view with an artificial defect painted in (the painters of
    `competition.data.painters`; `painted_valid` is False where no painter could change the view,
    e.g. a flat crop, and objectives skip it). Randomness is seeded by (epoch seed, i): an epoch is the same
    whatever the order, the worker count, or a resume. `painted_kinds` as in `paint_anomaly`; nsa cuts
    its patches from random views of the images at `normal_indices` (the training normals)."""

    def __init__(self, images: list[np.ndarray], augmentation: A.Compose, normalise: A.Compose,
                 painted: bool = False, painted_kinds: list[str] | None = None, normal_indices=()):
        self.images, self.augmentation, self.normalise, self.painted = images, augmentation, normalise, painted
        self.painted_kinds = painted_kinds
        self.normal_pool = (NormalPool([str(int(j)) for j in normal_indices], self._view_of)
                            if painted_kinds is not None and "nsa" in painted_kinds else None)
        self.epoch_seed = 0

    def _view_of(self, image_id: str) -> np.ndarray:
        """A random view of image `image_id`: nsa's patches come at the scale of the view they go into."""
        return self.augmentation(image=self.images[int(image_id)])["image"]

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = int(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        rng = np.random.default_rng([self.epoch_seed, i])
        self.augmentation.set_random_seed(int(rng.integers(2**31)))
        image = self.images[i]

        def view() -> np.ndarray:
            return self.augmentation(image=image)["image"]

        item: dict[str, torch.Tensor | int] = {
            "view1": self.normalise(image=view())["image"],
            "view2": self.normalise(image=view())["image"],
            "index": i,
        }
        if self.painted:
            clean = view()
            painted = paint_anomaly(clean, rng, self.painted_kinds, self.normal_pool, exclude=str(i))
            item["painted"] = self.normalise(image=clean if painted is None else painted)["image"]
            item["painted_valid"] = painted is not None
        return item


class ViewBatch:
    """One step's views; `features(model)` runs the backbone once over all of them, shared by
    every objective (and so batch-norm statistics see the whole batch, as in SimCLR)."""

    def __init__(self, views: dict[str, torch.Tensor], index: torch.Tensor,
                 extras: dict[str, torch.Tensor] | None = None):
        self.views = views  # name -> (B, C, H, W): view1, view2 (same images), painted (optional)
        self.index = index  # (B,) image indices: equal index = positive pair
        self.extras = extras or {}  # per-image values that are not views, e.g. painted_valid
        self._features: dict[str, torch.Tensor] | None = None

    def features(self, model: PretrainNet) -> dict[str, torch.Tensor]:
        if self._features is None:
            names = list(self.views)
            pooled = model.backbone(torch.cat([self.views[n] for n in names]))
            self._features = dict(zip(names, pooled.chunk(len(names))))
        return self._features


# ---------------------------------------------------------------- model and objectives

def pretrain_backbone(name: str) -> nn.Module:
    """timm `name` with pooled features (`num_classes=0`). Vision transformers are built with
    `dynamic_img_size` (position embeddings resampled to each input's patch grid) and `dynamic_img_pad`
    (a side that is no multiple of the patch size padded), so they pretrain at any `pretrain.image_size`;
    neither changes the weights' shapes, so the file loads into a model of the same name built at its
    default size (Dinomaly's encoder). Families without these options are built as they are."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True)
    except TypeError as exc:  # not a vision transformer: the constructor refuses the options before building
        if "dynamic_img" not in str(exc):
            raise
    return timm.create_model(name, pretrained=False, num_classes=0)


class PretrainNet(nn.Module):
    """A timm backbone (`num_classes=0`: pooled features), SimCLR's MLP projection head, and the
    heads objectives ask for. Only the backbone is kept: the heads exist so the losses do not
    have to shape the features used downstream (SimCLR: the layer before the head transfers better).
    """

    def __init__(self, backbone: str, projection_dim: int, hidden_dim: int,
                 heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.backbone = pretrain_backbone(backbone)
        features = self.backbone.num_features
        self.projection = nn.Sequential(
            nn.Linear(features, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim))
        self.heads = nn.ModuleDict(heads or {})


class Objective(Protocol):
    """A pretraining loss; `pretrain.objectives` weighs and sums them.

    `views`: the batch views it reads (the dataset makes the union); `head(num_features)`: a
    module of its own trained alongside (None if it needs none), reachable as `model.heads[name]`.
    """
    name: str
    views: tuple[str, ...]

    def head(self, num_features: int) -> nn.Module | None: ...

    def loss(self, batch: ViewBatch, model: PretrainNet) -> torch.Tensor: ...


class NTXentObjective:
    """SimCLR's NT-Xent: the two views of an image are positives, every other view a negative."""
    name = "ntxent"
    views = ("view1", "view2")

    def __init__(self, p: PretrainConfig, temperature: float | None = None):
        from pytorch_metric_learning.losses import NTXentLoss

        self.criterion = NTXentLoss(temperature=p.temperature if temperature is None else temperature)

    def head(self, num_features: int) -> None:
        return None  # the projection head is PretrainNet's own

    def loss(self, batch: ViewBatch, model: PretrainNet) -> torch.Tensor:
        features = batch.features(model)
        projections = model.projection(torch.cat([features["view1"], features["view2"]]))
        labels = torch.cat([batch.index, batch.index])
        return self.criterion(projections.float(), labels)


class PaintedObjective:
    """CutPaste-style (Li et al., CVPR 2021) self-supervision: a linear head on the pooled features
    tells clean views from views with a painted defect, so the features notice local defects
    that NT-Xent's augmentation invariances would otherwise teach them to ignore."""
    name = "painted"
    views = ("view1", "painted")

    def __init__(self, p: PretrainConfig, kinds: list[str] | None = None):
        self.criterion = nn.BCEWithLogitsLoss()  # over the clean views and the valid painted ones
        self.kinds = None if kinds is None else list(kinds)  # None: the painters' mix
        if self.kinds is not None:
            unknown = [k for k in self.kinds if k not in POSITIVE_KINDS or k == "transplant"]
            if unknown or not self.kinds:
                allowed = ", ".join(k for k in POSITIVE_KINDS if k != "transplant")
                raise ValueError(f"pretrain.objectives painted: kinds {unknown or self.kinds} not allowed; choose "
                                 f"among {allowed} (transplant would put every fold's real defects, validation "
                                 "ones included, into weights that every fold uses)")

    def head(self, num_features: int) -> nn.Module:
        return nn.Linear(num_features, 1)

    def loss(self, batch: ViewBatch, model: PretrainNet) -> torch.Tensor:
        features = batch.features(model)
        valid = batch.extras.get("painted_valid", torch.ones(len(batch.index), dtype=torch.bool))
        valid = valid.to(features["painted"].device)
        logits = model.heads[self.name](torch.cat([features["view1"], features["painted"][valid]])).squeeze(1)
        targets = torch.cat([torch.zeros(len(batch.index)), torch.ones(int(valid.sum()))]).to(logits.device)
        return self.criterion(logits.float(), targets)


OBJECTIVES: dict[str, type] = {"ntxent": NTXentObjective, "painted": PaintedObjective}


def build_objectives(p: PretrainConfig) -> list[tuple[float, Objective]]:
    """`pretrain.objectives` -> [(weight, objective)]; errors name the entry and what is allowed."""
    if not p.objectives:
        raise ValueError(f"pretrain.objectives is empty; give at least one of {', '.join(OBJECTIVES)}")
    built = []
    for i, spec in enumerate(p.objectives):
        options = dict(spec)
        name = options.pop("name", None)
        weight = options.pop("weight", 1.0)
        if name not in OBJECTIVES:
            raise ValueError(f"pretrain.objectives[{i}]: unknown objective {name!r}; "
                             f"known: {', '.join(OBJECTIVES)}")
        if any(name == other.get("name") for other in p.objectives[:i]):
            raise ValueError(f"pretrain.objectives[{i}]: {name} is listed twice")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"pretrain.objectives[{i}] ({name}): weight must be a positive number, got {weight!r}")
        try:
            built.append((float(weight), OBJECTIVES[name](p, **options)))
        except TypeError as exc:
            raise ValueError(f"pretrain.objectives[{i}] ({name}): bad options {options}: {exc}") from None
    return built


def build_pretrain_net(backbone: str, p: PretrainConfig, objectives: list[tuple[float, Objective]]) -> PretrainNet:
    net = PretrainNet(backbone, p.projection_dim, p.projection_hidden_dim)
    for _, objective in objectives:
        head = objective.head(net.backbone.num_features)
        if head is not None:
            net.heads[objective.name] = head
    return net


# ---------------------------------------------------------------- the label-free monitor

@dataclass
class MonitorSet:
    """Normalised whole images: k-NN reference normals, held-out normals, and those painted."""
    reference: torch.Tensor
    clean: torch.Tensor
    painted: torch.Tensor
    k: int

    def __len__(self) -> int:
        return len(self.clean)


def build_monitor_set(normals: list[np.ndarray], p: PretrainConfig, mean: list[float], std: list[float],
                      seed: int) -> MonitorSet | None:
    """Hold out `monitor_images` normals (fixed seed), paint one defect on a copy of each; the rest
    (at most `monitor_reference`) form the reference. None when there are too few normals."""
    rng = np.random.default_rng(seed)
    n_held = min(p.monitor_images, len(normals) // 2)
    if n_held < 2 or len(normals) - n_held < p.monitor_k:
        log.warning("pretrain monitor off: %d normal training images are too few", len(normals))
        return None
    order = rng.permutation(len(normals))
    held = [normals[i] for i in order[:n_held]]
    reference = [normals[i] for i in order[n_held:n_held + p.monitor_reference]]
    painted = [paint_anomaly(image, rng) for image in held]
    held, painted = [h for h, q in zip(held, painted) if q is not None], [q for q in painted if q is not None]
    if len(held) < 2:
        log.warning("pretrain monitor off: no painter could change the held-out normals")
        return None
    to_tensor = whole_image_transform(p.image_size, mean, std, p.resize)

    def stack(images: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([to_tensor(image=image)["image"] for image in images])

    return MonitorSet(reference=stack(reference), clean=stack(held), painted=stack(painted), k=p.monitor_k)


@torch.no_grad()
def pooled_features(backbone: nn.Module, images: torch.Tensor, device: torch.device,
                    batch_size: int = 64, channels_last: bool = True) -> torch.Tensor:
    """L2-normalised pooled features (eval mode), on the CPU."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_device_images(images[start:start + batch_size], device, channels_last)
        with autocast(device):
            out.append(backbone(batch).float().cpu())
    backbone.train(was_training)
    return nn.functional.normalize(torch.cat(out), dim=1)


def knn_distance(reference: torch.Tensor, queries: torch.Tensor, k: int) -> np.ndarray:
    """Mean distance from each query to its `k` nearest reference rows."""
    from sklearn.neighbors import NearestNeighbors

    nn_index = NearestNeighbors(n_neighbors=k).fit(reference.numpy())
    distances, _ = nn_index.kneighbors(queries.numpy())
    return distances.mean(axis=1)


def monitor_auroc(backbone: nn.Module, monitor: MonitorSet, device: torch.device,
                  channels_last: bool = True) -> float:
    """AUROC of the k-NN score separating the held-out normals (0) from their painted copies (1)."""
    reference = pooled_features(backbone, monitor.reference, device, channels_last=channels_last)
    queries = pooled_features(backbone, torch.cat([monitor.clean, monitor.painted]), device,
                              channels_last=channels_last)
    scores = knn_distance(reference, queries, monitor.k)
    labels = np.r_[np.zeros(len(monitor)), np.ones(len(monitor))]
    return float(auroc(labels, scores))


# ---------------------------------------------------------------- one step

def pretraining_step(model: PretrainNet, objectives: list[tuple[float, Objective]], device: torch.device,
                     channels_last: bool):
    """The engine's training step: the weighted sum of the objectives ("loss") and each one apart."""

    def step(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = {k: to_device_images(v, device, channels_last) for k, v in item.items() if v.ndim == 4}
        extras = {k: v.to(device) for k, v in item.items() if v.ndim != 4 and k != "index"}
        batch = ViewBatch(views, item["index"].to(device), extras)
        parts = {objective.name: (weight, objective.loss(batch, model)) for weight, objective in objectives}
        return {"loss": sum(weight * part for weight, part in parts.values()),
                **{name: part for name, (_, part) in parts.items()}}

    return step


# ---------------------------------------------------------------- records

# The config a pretraining run's weights depend on (less `stage.NEUTRAL_KEYS`); the backbone is
# resolved, since `pretrain.backbone: null` means `model.name`.
# The images are in the record as their fingerprint (`folds.images_fingerprint`), not as `paths.data`: a
# dataset moved elsewhere keeps its weights, a changed one is refused.
RESULTS_KEYS = ("seed", "data", "augment.mean", "augment.std", "pretrain")


def pretrain_rows(cfg: Config, index: pd.DataFrame) -> pd.DataFrame:
    """The images pretraining learns from: the training images, and the test images with `include_test`."""
    return index[(index["split"] == "train") | (cfg.pretrain.include_test & (index["split"] == "test"))]


def pretrain_record(cfg: Config, index: pd.DataFrame) -> dict[str, Any]:
    """Everything that shapes the weights: a resumed or finished run must have been made with these."""
    from competition.folds import images_fingerprint

    record = results_config(cfg, RESULTS_KEYS)
    record["pretrain"]["backbone"] = backbone_name(cfg)
    record["inputs"] = {"images": images_fingerprint(pretrain_rows(cfg, index))}
    return record


def write_records(log_dir: Path, history: list[dict[str, float]], summary: dict[str, Any], title: str) -> None:
    frame = pd.DataFrame(history)
    write_csv(frame, log_dir / "history.csv")
    plot_pretraining_curves(frame, log_dir / "curves.png", title)
    write_json(summary, log_dir / "summary.json")


def _best(history: list[dict[str, float]]) -> tuple[int | None, float | None]:
    scored = [(row["monitor_auroc"], int(row["epoch"])) for row in history
              if not math.isnan(row["monitor_auroc"])]
    if not scored:
        return None, None
    value, epoch = max(scored, key=lambda t: (t[0], t[1]))
    return epoch, value


# ---------------------------------------------------------------- entry point

def main(cfg: Config, force: bool = False) -> Path:
    """Pretrain (or resume, or find finished) and print the weights path as the last line."""
    from competition.folds import load_index

    p = cfg.pretrain
    name = backbone_name(cfg)
    weights_path = pretrained_weights_path(cfg.paths.work, name)
    log_dir = pretrain_dir(cfg.paths.work) / name
    index = load_index(cfg)
    record = pretrain_record(cfg, index)
    folder = RunFolder(marker=log_dir / "summary.json", required=(weights_path,),
                       outputs=(weights_path, log_dir / "last.pt", log_dir / "history.csv"),
                       redo="pretrain again", elsewhere=OTHER_WORK_FOLDER)
    done = folder.prepare(record, force)
    if done is not None:
        print(f"{weights_path} is already pretrained ({done.get('epochs_done')} epochs); --force pretrains again")
        print(weights_path)
        return weights_path

    configure_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    channels_last = cfg.train.channels_last

    rows = pretrain_rows(cfg, index)
    images = load_held_images(rows["path"].tolist(), p.hold_size, resize=p.resize)
    if len(images) < 2:
        raise ValueError(f"pretraining needs at least 2 images; {cfg.paths.data} gave {len(images)}")
    is_normal = ((rows["split"] == "train") & (rows["label"] == 0)).fillna(False).to_numpy()
    counts = {
        "train_normal": int(is_normal.sum()),
        "train_defect": int(((rows["split"] == "train") & (rows["label"] == 1)).fillna(False).sum()),
        "test": int((rows["split"] == "test").sum()),
    }
    monitor = build_monitor_set([im for im, normal in zip(images, is_normal) if normal], p,
                                cfg.augment.mean, cfg.augment.std, cfg.seed)

    objectives = build_objectives(p)
    needs_painted = any("painted" in objective.views for _, objective in objectives)
    painted_kinds = next((o.kinds for _, o in objectives if isinstance(o, PaintedObjective)), None)
    dataset = PretrainViews(images, view_augmentation(p), normalisation(cfg.augment.mean, cfg.augment.std),
                            painted=needs_painted, painted_kinds=painted_kinds,
                            normal_indices=np.flatnonzero(is_normal))
    batch_size = min(p.batch_size, len(dataset))
    model = build_pretrain_net(name, p, objectives)
    if p.init_weights:
        load_local_weights(model.backbone, p.init_weights, name, "pretrain.init_weights")
    to_channels_last(model.to(device), channels_last)
    steps_per_epoch = len(dataset) // batch_size  # drop_last: BatchNorm and NT-Xent want full batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, round(p.warmup_epochs * steps_per_epoch),
                                       p.epochs * steps_per_epoch)
    write_yaml(cfg.to_dict(), log_dir / "config.yaml")
    title = f"{name}: {len(images)} images, {p.image_size}px, batch {batch_size}"
    nan = float("nan")

    def summary(history: list[dict[str, Any]], finished: bool) -> dict[str, Any]:
        best_epoch, best_value = _best(history)
        trained = [row for row in history if row["epoch"] > 0]
        return {
            "backbone": name, "weights": str(weights_path), "finished": finished,
            "epochs_done": len(trained), "epochs": p.epochs, "images": counts, "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch, "device": str(device),
            "monitor_images": 0 if monitor is None else len(monitor),
            "monitor_reference": 0 if monitor is None else len(monitor.reference),
            "monitor_auroc_init": history[0]["monitor_auroc"] if history else nan,
            "monitor_auroc_final": history[-1]["monitor_auroc"] if history else nan,
            "monitor_auroc_best": best_value, "monitor_best_epoch": best_epoch,
            "final_loss": trained[-1]["train_loss"] if trained else nan,
            "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in trained])) if trained else nan,
            "config": record,
        }

    def validate() -> dict[str, float]:
        return {"monitor_auroc": nan if monitor is None else monitor_auroc(model.backbone, monitor, device,
                                                                           channels_last)}

    def epoch_batches(epoch: int) -> DataLoader:
        # Per-epoch seeds for shuffling and augmentation: a resumed run sees the same epochs.
        dataset.set_epoch_seed(cfg.seed + epoch)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                          num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda",
                          generator=torch.Generator().manual_seed(cfg.seed + epoch))

    print(f"pretrain {name}: {len(images)} images ({counts}), {steps_per_epoch} steps/epoch on {device}")
    engine = EngineConfig(epochs=p.epochs, name="pretrain", amp=cfg.train.amp, out=log_dir, record=record,
                          elsewhere=OTHER_WORK_FOLDER, validate_first=True, shown_metrics=("monitor_auroc",))
    result = fit(model, optimizer, epoch_batches, pretraining_step(model, objectives, device, channels_last),
                 engine, device=device, validate=validate, scheduler=scheduler,
                 after_epoch=lambda history: write_records(log_dir, history, summary(history, False), title))
    write_state_dict(model.backbone.state_dict(), weights_path)
    write_records(log_dir, result.history, summary(result.history, finished=True), title)
    print(weights_path)
    return weights_path
