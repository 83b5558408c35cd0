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

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
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

from competition.artifacts import load_checkpoint, read_json, save_figure, write_csv, write_json, write_yaml
from competition.config import Config, PretrainConfig
from competition.metrics import auroc
from competition.runtime import autocast, configure_threads, seed_everything, select_device, to_device_images
from competition.training import load_training_state, save_training_state, warmup_cosine_schedule
from competition.weights import load_local_weights, write_state_dict

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- where the outputs go

def pretrain_dir(work: str | Path) -> Path:
    """`<paths.work>/pretrain`: a weights folder holding `<backbone>.safetensors`."""
    return Path(work) / "pretrain"


def pretrained_weights_path(work: str | Path, backbone: str) -> Path:
    """Where `competition pretrain` writes (and the zoo's ssl entries look for) a backbone's weights."""
    return pretrain_dir(work) / f"{backbone}.safetensors"


def backbone_name(cfg: Config) -> str:
    return cfg.pretrain.backbone or cfg.model.name


# ---------------------------------------------------------------- images and views

def hold_image(image: np.ndarray, hold_size: int) -> np.ndarray:
    """Shrink (never enlarge) so the shorter side is at most `hold_size`: crops come from this copy."""
    import cv2

    height, width = image.shape[:2]
    short = min(height, width)
    if short <= hold_size:
        return image
    scale = hold_size / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def load_held_images(paths: list[str], hold_size: int, progress: bool = True) -> list[np.ndarray]:
    from competition.data.images import read_image

    return [hold_image(read_image(p), hold_size)
            for p in tqdm(paths, desc="pretrain: reading images", disable=not progress, leave=False)]


def build_albumentations(specs: list[dict[str, Any]], key: str) -> list[A.BasicTransform]:
    """`[{name: HorizontalFlip, p: 0.5}, ...]` -> albumentations transforms; errors name `key[i]`."""
    transforms = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name = spec.pop("name", None)
        cls = getattr(A, str(name), None)
        if not isinstance(cls, type):
            raise ValueError(f"{key}[{i}]: albumentations has no transform named {name!r} "
                             "(give the class name, e.g. HorizontalFlip)")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        try:
            transforms.append(cls(**kwargs))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{key}[{i}] ({name}): {exc}") from None
    return transforms


def view_augmentation(p: PretrainConfig) -> A.Compose:
    """One random view (uint8): a resized crop at a random scale, then the configured augmentations."""
    crop = A.RandomResizedCrop(size=(p.image_size, p.image_size), scale=tuple(p.crop_scale))
    return A.Compose([crop, *build_albumentations(p.augment, "pretrain.augment")])


def normalisation(mean: list[float], std: list[float]) -> A.Compose:
    return A.Compose([A.Normalize(mean=mean, std=std), ToTensorV2()])


def whole_image_transform(image_size: int, mean: list[float], std: list[float]) -> A.Compose:
    """The whole image, resized and normalised: how the monitor (and downstream models) see it."""
    return A.Compose([A.Resize(image_size, image_size), A.Normalize(mean=mean, std=std), ToTensorV2()])


PAINT_ATTEMPTS = 5  # a painter may find nothing visible to change (a flat crop); then another draw


def paint_anomaly(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """`random_anomaly` of the painters, redrawn when a draw changes nothing visible; None if none did."""
    from competition.data.painters import random_anomaly

    for _ in range(PAINT_ATTEMPTS):
        try:
            return random_anomaly(image, rng)[0]
        except RuntimeError:
            continue
    return None


class PretrainViews(Dataset):
    """Item i: two random views of image i (NT-Xent's positive pair), i itself, and, when
    `painted`, a third view with an artificial defect painted in (the painters of
    `competition.data.painters`; `painted_valid` is False where no painter could change the view,
    e.g. a flat crop, and objectives skip it). Randomness is seeded by (epoch seed, i): an epoch is the same
    whatever the order, the worker count, or a resume."""

    def __init__(self, images: list[np.ndarray], augmentation: A.Compose, normalise: A.Compose,
                 painted: bool = False):
        self.images, self.augmentation, self.normalise, self.painted = images, augmentation, normalise, painted
        self.epoch_seed = 0

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
            painted = paint_anomaly(clean, rng)
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

    def features(self, model: "PretrainNet") -> dict[str, torch.Tensor]:
        if self._features is None:
            names = list(self.views)
            pooled = model.backbone(torch.cat([self.views[n] for n in names]))
            self._features = dict(zip(names, pooled.chunk(len(names))))
        return self._features


# ---------------------------------------------------------------- model and objectives

class PretrainNet(nn.Module):
    """A timm backbone (`num_classes=0`: pooled features), SimCLR's MLP projection head, and the
    heads objectives ask for. Only the backbone is kept: the heads exist so the losses do not
    have to shape the features used downstream (SimCLR: the layer before the head transfers better).
    """

    def __init__(self, backbone: str, projection_dim: int, hidden_dim: int,
                 heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
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

    def __init__(self, p: PretrainConfig):
        self.criterion = nn.BCEWithLogitsLoss()  # over the clean views and the valid painted ones

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
    to_tensor = whole_image_transform(p.image_size, mean, std)

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


# ---------------------------------------------------------------- one epoch

def train_one_epoch(model: PretrainNet, loader: DataLoader, objectives: list[tuple[float, Objective]],
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                    device: torch.device, amp: bool, channels_last: bool, desc: str) -> dict[str, float]:
    """Mean total loss (and each objective's) over the epoch's steps."""
    model.train()
    totals = {"loss": 0.0, **{f"loss_{o.name}": 0.0 for _, o in objectives}}
    steps = 0
    bar = tqdm(loader, desc=desc, leave=False)
    for item in bar:
        views = {k: to_device_images(v, device, channels_last) for k, v in item.items() if v.ndim == 4}
        extras = {k: v.to(device) for k, v in item.items() if v.ndim != 4 and k != "index"}
        batch = ViewBatch(views, item["index"].to(device), extras)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            parts = [(weight, objective, objective.loss(batch, model)) for weight, objective in objectives]
            loss = sum(weight * part for weight, _, part in parts)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        steps += 1
        totals["loss"] += float(loss.detach())
        for _, objective, part in parts:
            totals[f"loss_{objective.name}"] += float(part.detach())
        bar.set_postfix(loss=f"{totals['loss'] / steps:.4f}")
    return {k: v / max(steps, 1) for k, v in totals.items()}


# ---------------------------------------------------------------- records

def pretrain_settings(cfg: Config) -> dict[str, Any]:
    """Everything that shapes the weights: a resumed or finished run must have been made with these."""
    settings = {
        "backbone": backbone_name(cfg),
        **{k: v for k, v in asdict(cfg.pretrain).items() if k != "backbone"},
        "data": str(Path(cfg.paths.data).resolve()),
        "layout": cfg.data.layout,
        "category": cfg.data.category,
        "seed": cfg.seed,
        "mean": list(cfg.augment.mean),
        "std": list(cfg.augment.std),
    }
    return json.loads(json.dumps(settings))  # the form it takes after a JSON round trip


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def plot_curves(history: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.6))
    trained = history[history["epoch"] > 0]
    ax_loss.plot(trained["epoch"], trained["loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="loss (weighted sum)", title="pretraining loss")
    ax_auc.plot(history["epoch"], history["monitor_auroc"], marker="o", color="tab:green")
    ax_auc.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax_auc.set(xlabel="epoch (0 = before training)", ylabel="AUROC", ylim=(0.0, 1.0),
               title="k-NN monitor: normal vs painted")
    for ax in (ax_loss, ax_auc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return save_figure(fig, path)


def write_records(log_dir: Path, history: list[dict[str, float]], summary: dict[str, Any], title: str) -> None:
    frame = pd.DataFrame(history)
    write_csv(frame, log_dir / "history.csv")
    plot_curves(frame, log_dir / "curves.png", title)
    # strict JSON: NaN (no monitor, no epoch yet) becomes null
    write_json({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()},
               log_dir / "summary.json")


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
    last_path = log_dir / "last.pt"
    summary_path = log_dir / "summary.json"
    settings = pretrain_settings(cfg)

    if force:
        for stale in (last_path, weights_path, summary_path):
            stale.unlink(missing_ok=True)
    elif weights_path.exists() and summary_path.exists():
        done = read_json(summary_path)
        if done.get("finished"):
            changed = _differences(done.get("settings", {}), settings)
            if changed:
                raise ValueError(f"{weights_path} was pretrained with other settings ({'; '.join(changed)}); "
                                 "run `python -m competition pretrain --force` to pretrain again")
            print(f"{weights_path} is already pretrained ({done.get('epochs_done')} epochs); --force pretrains again")
            print(weights_path)
            return weights_path

    configure_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    amp = cfg.train.amp and device.type == "cuda"
    channels_last = cfg.train.channels_last

    index = load_index(cfg)
    rows = index[(index["split"] == "train") | (p.include_test & (index["split"] == "test"))]
    images = load_held_images(rows["path"].tolist(), p.hold_size)
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
    dataset = PretrainViews(images, view_augmentation(p), normalisation(cfg.augment.mean, cfg.augment.std),
                            painted=needs_painted)
    batch_size = min(p.batch_size, len(dataset))
    model = build_pretrain_net(name, p, objectives)
    if p.init_weights:
        load_local_weights(model.backbone, p.init_weights, name)
    model.to(device)
    if device.type == "cuda" and channels_last:
        model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(dataset) // batch_size  # drop_last: BatchNorm and NT-Xent want full batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, round(p.warmup_epochs * steps_per_epoch),
                                       p.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    history: list[dict[str, float]] = []
    start = 0
    if last_path.exists():
        saved = load_checkpoint(last_path).get("extra", {})
        changed = _differences(saved.get("settings", {}), settings)
        if changed:
            raise ValueError(f"{last_path} was written with other settings ({'; '.join(changed)}); "
                             "run `python -m competition pretrain --force` to start again")
        resumed = load_training_state(last_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                      scaler=scaler, map_location=device)
        start, history = resumed.next_epoch, list(resumed.extra["history"])
        print(f"resuming pretraining of {name} after epoch {start} of {p.epochs} ({last_path})")
    write_yaml(cfg.to_dict(), log_dir / "config.yaml")
    title = f"{name}: {len(images)} images, {p.image_size}px, batch {batch_size}"
    nan = float("nan")

    def summary(finished: bool) -> dict[str, Any]:
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
            "final_loss": trained[-1]["loss"] if trained else nan,
            "seconds_per_epoch": float(np.mean([r["seconds"] for r in trained])) if trained else nan,
            "settings": settings,
        }

    def measure() -> float:
        return nan if monitor is None else monitor_auroc(model.backbone, monitor, device, channels_last)

    if start == 0 and not history:
        initial = measure()
        history.append({"epoch": 0, "loss": nan, **{f"loss_{o.name}": nan for _, o in objectives},
                        "monitor_auroc": initial, "lr": nan, "seconds": 0.0})
        print(f"pretrain {name}: {len(images)} images ({counts}), {steps_per_epoch} steps/epoch on {device}; "
              f"monitor AUROC before training {initial:.4f}")

    for epoch in range(start, p.epochs):
        # Per-epoch seeds for shuffling and augmentation: a resumed run sees the same epochs.
        dataset.set_epoch_seed(cfg.seed + epoch)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        began = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        losses = train_one_epoch(model, loader, objectives, optimizer, scheduler, scaler, device, amp,
                                 channels_last, desc=f"pretrain epoch {epoch + 1}/{p.epochs}")
        seconds = time.perf_counter() - began
        value = measure()
        history.append({"epoch": epoch + 1, **losses, "monitor_auroc": value, "lr": lr, "seconds": seconds})
        save_training_state(last_path, epoch=epoch, model=model, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, extra={"history": history, "settings": settings})
        write_records(log_dir, history, summary(finished=False), title)
        print(f"pretrain epoch {epoch + 1}/{p.epochs}: loss {losses['loss']:.4f}  "
              f"monitor AUROC {value:.4f}  ({seconds:.0f}s)")

    write_state_dict(model.backbone.state_dict(), weights_path)
    write_records(log_dir, history, summary(finished=True), title)
    print(weights_path)
    return weights_path
