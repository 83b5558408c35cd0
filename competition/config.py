"""Typed configuration: YAML files with `_base_` inheritance and `--set dotted.key=value` overrides.

Every key lives in a small dataclass below; loading validates names, types and allowed values and
names the file (or `--set`) that set a wrong key. Sections belong to the stage that reads them.
"""
from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

# The repository's configs/default.yaml, wherever the command runs from (an installed copy without the
# repository's configs/ gets a ConfigError saying to pass --config).
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key, the source and what is allowed."""


def cpu_amp_mode(value: str | bool) -> str:
    """`train.cpu_amp` / `zoo.cpu_amp` as off | bf16 | auto: YAML 1.1 reads a bare off as false, so false and
    true mean off and auto."""
    return ("auto" if value else "off") if isinstance(value, bool) else value


@dataclass
class PathsConfig:
    data: str = "input/synthetic"  # dataset root (competition layout unless data.layout says otherwise)
    work: str = "runs"  # folds.csv and every run's outputs
    submissions: str = "submissions"  # submission CSVs, leaderboard


@dataclass
class DataConfig:
    layout: Literal["competition", "mvtec", "btad", "visa", "folder"] = "competition"
    category: str | None = None  # object category for mvtec/btad/visa
    skip_unreadable_train: bool = False  # drop unreadable training images with a warning (test: never)
    resize_mismatched_masks: bool = False  # a mask of another size than its image: resize it with a warning


@dataclass
class FoldsConfig:
    n_splits: int = 5

    def __post_init__(self) -> None:
        if self.n_splits < 2:
            raise ValueError(f"n_splits must be >= 2, got {self.n_splits}")


# `model.pretrained` value meaning <paths.work>/pretrain, where `competition pretrain` writes.
SSL_WEIGHTS = "ssl"


@dataclass
class ModelConfig:
    name: str = "efficientnet_b0"  # any timm model name, or segdec (SegDecNet, the `segdec` section)
    pretrained: bool | str = False  # false, a local weights file / folder holding <name>.*, or ssl
    image_size: int = 96  # square input side; 96 keeps 5 CPU folds within make all's budget
    resize: Literal["square", "letterbox"] = "square"  # stretch to the square, or keep the aspect and pad
    # overlapping tiles, each fitted to the image_size canvas; image score = max or top-k mean over tiles
    tiles: TilesConfig = field(default_factory=lambda: TilesConfig())  # (TilesConfig is defined below)
    drop_rate: float = 0.2
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.pretrained is True:
            raise ValueError("pretrained: true would need a download; give false or a local weights path")


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 3.0e-3
    weight_decay: float = 1.0e-2
    warmup_epochs: float = 1.0
    grad_clip: float = 5.0  # max grad norm; 0 disables
    accumulate_steps: int = 1
    pos_weight: float = 1.0  # BCE positive-class weight
    label_smoothing: float = 0.0
    patience: int = 0  # early stopping on macro-F1; 0 disables
    validate_from: int = 1  # first epoch (from 1) validated and eligible for best.pt; the last always is
    num_workers: int = 0  # DataLoader workers; 0 = in the main process
    threads: int = 0  # torch CPU threads; 0 = all cores
    amp: bool = True  # mixed precision, CUDA only
    # bfloat16 autocast on the CPU: off | bf16 | auto (on where the CPU has bfloat16 hardware, AMX or AVX-512 BF16;
    # SegDecNet trains 2-5x faster there; EfficientNet trains slower in bfloat16, other CPUs emulate it slowly).
    # YAML reads a bare off as false: false / true are read as off / auto
    cpu_amp: Literal["off", "bf16", "auto"] | bool = "off"
    channels_last: bool = True  # NHWC tensors, on CUDA and CPU
    # test-time augmentation (oof.csv and test.csv alike): none | flips (4 views) | dihedral (8: flips and turns)
    # (true / false, the older switch, read as flips / none)
    tta: Literal["none", "flips", "dihedral"] | bool = "none"
    # best.pt follows this validation metric (ties broken by the lower validation loss):
    # val_macro_f1 at the fold's best threshold, val_macro_f1_at_05 at 0.5, or val_auroc
    monitor: Literal["val_macro_f1", "val_macro_f1_at_05", "val_auroc"] = "val_macro_f1"
    # exponential moving average of the weights (timm ModelEmaV3, decay warmed up from 0): the average is the
    # model validated, checkpointed and predicting; the trained weights ride along in last.pt for resuming
    ema: bool = False
    ema_decay: float = 0.995  # the decay the warmup rises to (0.995: a memory of about 200 optimizer steps)
    cache_images: bool = True  # keep decoded, resized images in memory (size^2 * 3 bytes each)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.accumulate_steps < 1:
            raise ValueError(f"epochs, batch_size and accumulate_steps must be >= 1, got "
                             f"{self.epochs}, {self.batch_size}, {self.accumulate_steps}")
        if isinstance(self.tta, bool):
            self.tta = "flips" if self.tta else "none"
        self.cpu_amp = cpu_amp_mode(self.cpu_amp)
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")


@dataclass
class AugmentConfig:
    # albumentations transforms by class name with their keyword arguments, applied in training only
    train: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "VerticalFlip", "p": 0.5},
        {"name": "RandomRotate90", "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.15, "contrast_limit": 0.15, "p": 0.5},
        {"name": "GaussianBlur", "blur_limit": [3, 3], "p": 0.1},
    ])
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class OversampleConfig:
    defect_ratio: float = 0.5  # defect:normal ratio per epoch inside the training folds (0 disables)
    angle_step: int = 10  # rotation angles 0, step, 2*step, ... for the expanded defect copies
    flips: bool = True
    mode: Literal["online", "cached"] = "online"  # rotate on the fly, or make every copy once at the start
    normal_tiles: int = 1  # with model.tiles: tiles of each training normal per epoch, drawn from its grid; 0 = all
    # share of the training normals (with tiles: of the normal tiles an epoch holds) shown per epoch; below 1
    # they are chosen by frequency of use (least shown first), so every normal is seen before any repeats
    normals_per_epoch: float = 1.0

    def __post_init__(self) -> None:
        if self.normal_tiles < 0:
            raise ValueError(f"normal_tiles must be >= 0 (0 = every tile), got {self.normal_tiles}")
        if not 0.0 < self.normals_per_epoch <= 1.0:
            raise ValueError(f"normals_per_epoch is a share in (0, 1], got {self.normals_per_epoch}")
        if self.defect_ratio < 0 or not 0 < self.angle_step <= 360:
            raise ValueError(f"defect_ratio must be >= 0 and angle_step in 1..360, got "
                             f"{self.defect_ratio} and {self.angle_step}")


PAINTED_KINDS = ("scratch", "crack", "hole", "stain", "cut", "missing_pattern", "cutpaste", "cutpaste_scar",
                 "perlin")
# Every kind `positives.kinds` and `zoo.painted_kinds` accept: the painted ones, plus two opt-in kinds that
# read other training-fold images (competition/data/transplant.py): real defects moved through their
# masks, and NSA patches of other normals.
POSITIVE_KINDS = PAINTED_KINDS + ("transplant", "nsa")


@dataclass
class PositivesConfig:
    """Synthetic positives: the training fold's own normals with a defect painted in."""
    ratio: float = 0.25  # painted positives per training normal per epoch (0 disables)
    # drawn uniformly; any of POSITIVE_KINDS. transplant first: it won on small and bsdata_tiles (default.yaml)
    kinds: list[str] = field(default_factory=lambda: ["transplant", *PAINTED_KINDS])
    severity: list[float] = field(default_factory=lambda: [0.0, 1.0])  # range, 0 obvious .. 1 subtle
    curriculum: bool = True  # widen the severity range from obvious to subtle over the epochs
    texture_source: Literal["dataset", "synthetic"] = "dataset"  # perlin: another training normal, or a texture

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in POSITIVE_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds {unknown or self.kinds} not allowed; choose among {', '.join(POSITIVE_KINDS)}")
        if len(self.severity) != 2 or not 0.0 <= self.severity[0] <= self.severity[1] <= 1.0:
            raise ValueError(f"severity must be [low, high] with 0 <= low <= high <= 1, got {self.severity}")
        if self.ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {self.ratio}")


@dataclass
class MaskHeadConfig:
    """Mask supervision: a light decoder over the backbone's intermediate maps."""
    enabled: bool = True
    loss_weight: float = 1.0  # segmentation loss (BCE + Dice) weight beside the image BCE
    channels: int = 32  # decoder width
    score_weight: float = 0.5  # image logit = (1 - w) * class logit + w * pooled map logit
    pool_top: float = 0.02  # pooled map logit = mean of the top share of map pixels

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_weight <= 1.0 or not 0.0 < self.pool_top <= 1.0:
            raise ValueError(f"score_weight must lie in [0, 1] and pool_top in (0, 1], got "
                             f"{self.score_weight} and {self.pool_top}")


# `model.name` that selects the segmentation-decision network (competition.classifier.segdec) instead of timm.
SEGDEC_NAME = "segdec"


@dataclass
class SegDecConfig:
    """SegDecNet (model.name: segdec): widths and the mixed-supervision recipe (Božič et al. 2021)."""
    width: int = 16  # first block's channels; the next seven blocks have twice as many (paper: 32)
    kernel: int = 5  # conv kernel of the eight segmentation blocks (paper: 5)
    volume_channels: int = 64  # channels of the last, large-kernel block (paper: 1024)
    volume_kernel: int = 7  # its kernel (paper: 15)
    delta: float = 1.0  # decision-loss weight (paper, with SGD: 0.01-1; Adam normalises it away)
    dynamic_balance: bool = True  # epoch n of N: segmentation loss x (1 - n/N), decision loss x delta n/N
    gradient_adjustment: bool = True  # the decision loss does not reach the segmentation sub-network
    weight_max: float = 1.0  # distance-transform weighting inside masks: (d / d_max)^weight_power * weight_max
    weight_power: float = 2.0
    mask_dilate: int = 0  # grow masks by this many pixels before the loss (thin or under-drawn masks)

    def __post_init__(self) -> None:
        if min(self.width, self.kernel, self.volume_channels, self.volume_kernel) < 1 or self.kernel % 2 == 0 \
                or self.volume_kernel % 2 == 0:
            raise ValueError(f"segdec widths must be >= 1 and kernels odd; got width {self.width}, kernel "
                             f"{self.kernel}, volume_channels {self.volume_channels}, "
                             f"volume_kernel {self.volume_kernel}")
        if self.delta <= 0 or self.weight_max < 0 or self.weight_power < 0 or self.mask_dilate < 0:
            raise ValueError("segdec: delta must be > 0 and weight_max, weight_power, mask_dilate >= 0")


@dataclass
class TilesConfig:
    """Overlapping tiles cut from each image (competition.preprocess.Geometry): small defects keep their pixels."""
    enabled: bool = False
    size: int = 160  # tile side, in pixels of the image scaled by `scale`
    overlap: float = 0.25  # least fraction of a tile shared with its neighbour
    scale: float = 1.0  # the image is scaled by this before tiling; 1.0 = native pixels
    reduce: Literal["max", "topk_mean"] = "max"  # an image's score from its tiles' scores
    topk: int = 3  # tiles averaged by reduce: topk_mean
    # The overlap of the tiles that score oof.csv, test.csv and new images; None: `overlap`. Training tiles and
    # each epoch's validation keep `overlap`, so the checkpoint is chosen on the training grid (as with TTA) and
    # only the finished fold's predictions pay for the denser grid: a defect cut by one tile's edge lies whole in
    # a shifted tile.
    predict_overlap: float | None = None

    def __post_init__(self) -> None:
        overlaps = [self.overlap] + ([] if self.predict_overlap is None else [self.predict_overlap])
        if self.size < 1 or not all(0.0 <= o < 1.0 for o in overlaps) or self.scale <= 0 or self.topk < 1:
            raise ValueError(f"tiles need size >= 1, overlap and predict_overlap in [0, 1), scale > 0 and topk >= 1; "
                             f"got size {self.size}, overlap {self.overlap}, predict_overlap {self.predict_overlap}, "
                             f"scale {self.scale}, topk {self.topk}")


@dataclass
class ZooConfig:
    models: list[str] = field(default_factory=lambda: ["patchcore-resnet18", "padim-resnet18"])
    backbone_weights: bool | str = False  # false or local weights (file or folder) for zoo backbones
    # without weights: healthy (live residual branches, BatchNorm statistics of the fit images) | timm
    backbone_init: Literal["healthy", "timm"] = "timm"
    # how the backbones' convolutions pad the image border: zeros (as trained) | reflect (a random network then
    # sees a border speck against mirrored texture, not against a dark frame)
    backbone_padding: Literal["zeros", "reflect"] = "zeros"
    # where a healthy backbone estimates its BatchNorm statistics: fit (each fold's fit normals) | test (the
    # unlabeled test images, one set for every fold, so the folds share one network and one feature cache)
    batchnorm_images: Literal["fit", "test"] = "fit"
    image_size: int = 128  # side of the square model input (canvas)
    # per registry name, that entry's own canvas side instead of image_size (a draw NAME@K takes NAME's unless it
    # is named itself): e.g. a defect probe on a finer canvas beside the rest, each canvas with its own features
    image_sizes: dict[str, int] = field(default_factory=dict)
    resize: Literal["square", "letterbox"] = "square"  # stretch to the square, or keep the aspect and pad
    tiles: TilesConfig = field(default_factory=TilesConfig)
    batch_size: int = 32
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # input normalisation (ImageNet)
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: int = 0  # DataLoader workers for decoding; 0 = in the main process
    amp: bool = True  # mixed precision, CUDA only
    # bfloat16 autocast on the CPU: off | bf16 | auto (on with AMX or AVX-512 BF16); false / true read as off / auto
    cpu_amp: Literal["off", "bf16", "auto"] | bool = "off"
    channels_last: bool = True  # NHWC tensors, on CUDA and CPU
    cache: bool = True  # on-disk feature cache shared by models over the same backbone
    # the cache's size limit in GB: beyond it the least recently used backbone folders are deleted; 0 = none
    cache_max_gb: float = 4.0
    confidence: float | None = None  # fixed OK/NG threshold on the score; null = F1-optimal
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per registry name: hyperparameter overrides
    min_real_defects: int = 5  # a fold with fewer real defects is also judged on painted ones
    painted_per_fold: int = 40  # painted defects (on held-out normals) for that judgement
    # kinds of the painted defects in trained models' validation set (any of POSITIVE_KINDS, drawn
    # uniformly); null = the painters' mix: defect kinds, CutPaste, DRAEM
    painted_kinds: list[str] | None = None
    validation_share: float = 0.1  # training normals held out for trained models' validation
    gallery_size: int = 12  # highest-scoring test images drawn with their anomaly maps
    save_models: bool = True  # keep each fold's fitted model as model.pt beside its scores

    def __post_init__(self) -> None:
        self.cpu_amp = cpu_amp_mode(self.cpu_amp)
        for name, params in self.params.items():
            if not isinstance(params, dict):
                raise ValueError(f"params: zoo.params.{name} must be a mapping of hyperparameters, got {params!r}")
        for name, side in self.image_sizes.items():
            if isinstance(side, bool) or not isinstance(side, int) or side < 16:
                raise ValueError(f"image_sizes: zoo.image_sizes.{name} must be a canvas side >= 16, got {side!r}")
        if not 0.0 < self.validation_share < 1.0:
            raise ValueError(f"validation_share must be in (0, 1), got {self.validation_share}")
        if self.cache_max_gb < 0:
            raise ValueError(f"cache_max_gb must be >= 0 (0 = no limit), got {self.cache_max_gb}")
        if self.painted_kinds is not None:
            unknown = [k for k in self.painted_kinds if k not in POSITIVE_KINDS]
            if unknown or not self.painted_kinds:
                raise ValueError(f"painted_kinds {unknown or self.painted_kinds} not allowed; null or a list "
                                 f"among {', '.join(POSITIVE_KINDS)}")


@dataclass
class EnsembleConfig:
    models: list[str] = field(default_factory=list)  # empty = every finished run of the experiment
    # auto: the one of best_single, mean, rank_blend, logistic whose nested out-of-fold scores promise the best
    # macro-F1 under threshold_rule (README, "Stacking")
    method: Literal["auto", "best_single", "mean", "rank_blend", "logistic", "sklearn"] = "auto"
    # per fold model, against that model's own test scores (label-free): rank | zscore (median/MAD)
    normalise: Literal["rank", "zscore"] = "rank"
    estimator: str | None = None  # dotted sklearn class for method=sklearn
    # keyword arguments of the stacker: LogisticRegression, RankBlend (rounds) or the sklearn class
    estimator_params: dict[str, Any] = field(default_factory=dict)
    # defect share the test threshold is tuned for: train (the out-of-fold share) | estimate (from the
    # unlabelled test scores) | a share in (0, 1); see competition/ensemble/prior.py
    prior: Literal["train", "estimate"] | float = "estimate"
    prior_method: Literal["em", "bbse"] = "bbse"  # estimator for prior: estimate
    # what the share is estimated on: per_fold (each fold model's own test features through the stacker, the
    # estimates averaged) | averaged (the submitted test scores, means over the fold models; README, "Stacking")
    prior_features: Literal["per_fold", "averaged"] = "per_fold"
    # how the test threshold is chosen on the out-of-fold scores at that share: smoothed (the best cut of the
    # macro-F1 under kernel-smoothed class distributions) | plateau (the middle of the best run of the
    # empirical, reweighted curve; the rule before this version). README, "Stacking"
    threshold_rule: Literal["smoothed", "plateau"] = "smoothed"
    # auto keeps a simpler candidate unless a blend beats its nested out-of-fold expected macro-F1 by more than this
    # (0: ties only). About 30 defects make differences under 0.01 noise (README, "Stacking")
    auto_tolerance: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.auto_tolerance, bool) or not 0.0 <= self.auto_tolerance < 1.0:
            raise ValueError(f"auto_tolerance must be a macro-F1 margin in [0, 1), e.g. 0.01, "
                             f"got {self.auto_tolerance!r}")
        if isinstance(self.prior, str):
            prior_ok = self.prior in ("train", "estimate")
        else:
            prior_ok = not isinstance(self.prior, bool) and 0.0 < self.prior < 1.0
        if not prior_ok:
            raise ValueError(f"prior must be train, estimate or a defect share strictly between 0 and 1 "
                             f"(e.g. 0.5), got {self.prior!r}")
        repeated = sorted({name for name in self.models if self.models.count(name) > 1})
        if repeated:
            raise ValueError(f"models lists {', '.join(repeated)} more than once; name each model once")
        if self.method == "sklearn" and not self.estimator:
            raise ValueError("estimator must name a scikit-learn classifier when method is sklearn, "
                             "e.g. sklearn.ensemble.RandomForestClassifier")
        if self.method != "sklearn" and self.estimator:
            raise ValueError(f"estimator {self.estimator!r} is only used with method: sklearn "
                             f"(method is {self.method!r}); set method: sklearn or estimator: null")


@dataclass
class PretrainConfig:
    backbone: str | None = None  # timm name; null = model.name
    init_weights: bool | str = False  # start from local weights (file or folder) instead of random init
    epochs: int = 5
    batch_size: int = 64  # images per step; each gives two views
    lr: float = 1.0e-3  # AdamW peak learning rate
    weight_decay: float = 1.0e-4
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay
    temperature: float = 0.2  # NT-Xent temperature
    image_size: int = 96  # side of each augmented view
    hold_size: int = 256  # images are decoded once and held with their shorter side at most this
    # how whole images become square (competition.preprocess.Geometry): square stretches the monitor's images;
    # letterbox holds each image on a square canvas (aspect kept, mirrored padding), as zoo.resize: letterbox shows it
    resize: Literal["square", "letterbox"] = "square"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range
    projection_dim: int = 128
    projection_hidden_dim: int = 512
    # weighted sum of objectives; each entry: name (ntxent | painted) + weight + that objective's own options
    # (ntxent: temperature; painted: kinds, a list of POSITIVE_KINDS but transplant, null = the painters' mix)
    objectives: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "ntxent", "weight": 1.0}])
    # albumentations applied to each view after the random resized crop (class name + kwargs).
    # Geometric only: photometric ones (brightness, gamma, blur, noise) teach invariance to what
    # defects change, and cost PatchCore/PaDiM out-of-fold AUROC on the small set (README).
    augment: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "VerticalFlip", "p": 0.5},
        {"name": "RandomRotate90", "p": 0.75},
    ])
    include_test: bool = True  # transductive use of unlabeled test images
    monitor_images: int = 32  # held-out normals scored clean and painted each epoch
    monitor_reference: int = 256  # other normals forming the k-NN reference (at most)
    monitor_k: int = 1  # neighbours averaged in the k-NN distance

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (NT-Xent contrasts images in a batch), got {self.batch_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
        if self.init_weights is True:
            raise ValueError("init_weights: true would need a download; give false or a local weights path")
        if self.monitor_images < 2 or self.monitor_k < 1:
            raise ValueError(f"monitor_images must be >= 2 and monitor_k >= 1, got "
                             f"{self.monitor_images} and {self.monitor_k}")


@dataclass
class PseudoConfig:
    """Pseudo-labels: a second round trained with confident test images of a finished first round."""
    enabled: bool = False
    source: str | None = None  # the first-round experiment (same paths.work) whose stacked test scores pick them
    normal_share: float = 0.5  # of the test images it predicted normal, this lowest-scoring share joins the normals
    defect_share: float = 0.25  # of those it predicted defective, this highest-scoring share joins the defects
    # pseudo-defects get a mask: the source classifier's defect-probability map (SegDecNet or the mask head),
    # averaged over its fold models, where it reaches mask_threshold x its maximum; false: shown whole, weak
    masks: bool = False
    mask_threshold: float = 0.5
    # the zoo fits on them too; false: only the classifier does, and the zoo's folds are the source's (copied when
    # finished with the same record, else fitted as the source fits them), so a second round costs the classifier
    zoo: bool = True

    def __post_init__(self) -> None:
        for name in ("normal_share", "defect_share", "mask_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.enabled and not self.source:
            raise ValueError("enabled needs source: the name of the finished first-round experiment")


@dataclass
class ExecutorConfig:
    """How `competition run` (and `make all`) runs the experiment's jobs; none of it changes a result."""
    backend: Literal["serial", "ray"] = "serial"  # serial: one job at a time, all cores | ray: jobs as Ray tasks
    address: str | None = None  # ray: null starts a local Ray; "auto" or host:port joins a running cluster
    cpus: int | None = None  # ray, local start: the CPUs Ray may hand out; null = every core
    num_cpus: float = 1.0  # ray: CPUs reserved per job; its torch threads (at least 1)
    num_gpus: float = 0.0  # ray: GPUs reserved per job; fractions share one GPU (0.25: four jobs)
    max_retries: int = 2  # a failed or killed job runs again this many times, resuming from its last.pt

    def __post_init__(self) -> None:
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.backend == "serial" and self.address:
            raise ValueError(f"address {self.address!r} needs backend: ray")


@dataclass
class Config:
    experiment: str = "default"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    oversample: OversampleConfig = field(default_factory=OversampleConfig)
    positives: PositivesConfig = field(default_factory=PositivesConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    segdec: SegDecConfig = field(default_factory=SegDecConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        # `model.pretrained: ssl` names this experiment's own pretraining output (make pretrain),
        # so a config needs no hand-typed path; the resolved config.yaml shows the folder used.
        if self.model.pretrained == SSL_WEIGHTS:
            self.model.pretrained = str(Path(self.paths.work) / "pretrain")
        if self.pseudo.enabled and self.pseudo.source == self.experiment:
            raise ConfigError(f"pseudo.source is this experiment ({self.experiment!r}): the second round needs "
                              "its own experiment name, or it would overwrite the first round it reads")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading

class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a number written with a leading zero (`0012`, an id) stays the text typed:
    YAML 1.1 would read it as an octal 10. Safe loading otherwise unchanged."""


ConfigLoader.yaml_implicit_resolvers = {key: list(value)
                                       for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "+-0":
    ConfigLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:yaml.org,2002:str", re.compile(r"^[-+]?0[0-9_]+$")))

def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file not found: {path}; pass one with --config PATH (the repository's "
                          "configs/ holds default.yaml, quick.yaml, real.yaml, ...)") from None
    try:
        data = yaml.load(text, Loader=ConfigLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, override: dict, sources: dict[str, str], source: str, prefix: str = "") -> dict:
    """Deep-merge `override` into `base`, remembering which source set each dotted key."""
    out = dict(base)
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = _merge(out[key], value, sources, source, dotted + ".")
        else:
            out[key] = value
            sources[dotted] = source
            for sub in _dotted_keys(value, dotted + "."):
                sources[sub] = source
    return out


def _dotted_keys(value: Any, prefix: str) -> list[str]:
    if not isinstance(value, dict):
        return []
    keys = []
    for k, v in value.items():
        keys.append(prefix + str(k))
        keys.extend(_dotted_keys(v, f"{prefix}{k}."))
    return keys


def _load_with_bases(path: Path, sources: dict[str, str], seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself")
    data = _read_yaml(path)
    base_name = data.pop("_base_", None)
    merged: dict = {}
    if base_name is not None:
        if not isinstance(base_name, str):
            raise ConfigError(f"{path}: _base_ must be a file name, got {base_name!r}")
        merged = _load_with_bases(path.parent / base_name, sources, seen + (path,))
    return _merge(merged, data, sources, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml value): `false`, `3`, `[x, y]`, `null` keep their YAML types."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def type_name(tp: Any) -> str:
    """A type annotation in the words an error message uses ("an integer", "one of 'a', 'b'", ...)."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {type_name(get_args(tp)[0])}" if get_args(tp) else "a list"
    if tp is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, sources: dict[str, str]) -> Any:
    where = sources.get(key, "defaults")

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{key} (set in {where}): {msg}")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, sources)
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise fail(f"{value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key, sources)
            except ConfigError as exc:
                errors.append(str(exc))
        raise fail(f"{value!r} is not {type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise fail(f"expected a list, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", sources) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise fail(f"expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `experiment: 2024` as a number; the user meant the name
        if not isinstance(value, str):
            raise fail(f"expected a string, got {value!r}")
        return value
    raise fail(f"unsupported type {tp}")


# Ranges of numeric keys, checked as each key is read so that an error names that key and where it was set.
_AT_LEAST_ONE = (">= 1", lambda v: v >= 1)
_POSITIVE = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
_SHARE = ("in [0, 1]", lambda v: 0 <= v <= 1)
_OPEN_SHARE = ("in (0, 1)", lambda v: 0 < v < 1)
_IMAGE_SIDE = (">= 16", lambda v: v >= 16)
RANGES: dict[str, tuple[str, Any]] = {
    "train.epochs": _AT_LEAST_ONE, "train.batch_size": _AT_LEAST_ONE, "train.accumulate_steps": _AT_LEAST_ONE,
    "train.lr": _POSITIVE, "train.weight_decay": _NON_NEGATIVE, "train.warmup_epochs": _NON_NEGATIVE,
    "train.grad_clip": _NON_NEGATIVE, "train.pos_weight": _POSITIVE,
    "train.label_smoothing": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "train.patience": _NON_NEGATIVE, "train.validate_from": _AT_LEAST_ONE, "train.num_workers": _NON_NEGATIVE,
    "train.threads": _NON_NEGATIVE,
    "train.ema_decay": _OPEN_SHARE,
    "model.image_size": _IMAGE_SIDE, "model.drop_rate": _SHARE, "model.drop_path_rate": _SHARE,
    "model.tiles.size": _IMAGE_SIDE, "zoo.tiles.size": _IMAGE_SIDE, "model.tiles.scale": _POSITIVE,
    "zoo.tiles.scale": _POSITIVE, "model.tiles.topk": _AT_LEAST_ONE, "zoo.tiles.topk": _AT_LEAST_ONE,
    "oversample.defect_ratio": _NON_NEGATIVE, "oversample.normals_per_epoch": _POSITIVE,
    "positives.ratio": _NON_NEGATIVE, "mask_head.loss_weight": _NON_NEGATIVE, "mask_head.score_weight": _SHARE,
    "mask_head.pool_top": ("in (0, 1]", lambda v: 0 < v <= 1),
    "segdec.width": _AT_LEAST_ONE, "segdec.volume_channels": _AT_LEAST_ONE, "segdec.mask_dilate": _NON_NEGATIVE,
    "zoo.image_size": _IMAGE_SIDE, "zoo.batch_size": _AT_LEAST_ONE, "zoo.num_workers": _NON_NEGATIVE,
    "zoo.min_real_defects": _NON_NEGATIVE, "zoo.painted_per_fold": _NON_NEGATIVE,
    "zoo.validation_share": ("in [0, 1)", lambda v: 0 <= v < 1), "zoo.gallery_size": _NON_NEGATIVE,
    "pretrain.epochs": _AT_LEAST_ONE, "pretrain.batch_size": ("> 1", lambda v: v > 1), "pretrain.lr": _POSITIVE,
    "pretrain.temperature": _POSITIVE, "pretrain.image_size": _IMAGE_SIDE, "pretrain.hold_size": _IMAGE_SIDE,
    "executor.cpus": _AT_LEAST_ONE, "executor.num_cpus": _POSITIVE, "executor.num_gpus": _NON_NEGATIVE,
    "executor.max_retries": _NON_NEGATIVE,
}


def _check_range(key: str, value: Any, sources: dict[str, str]) -> None:
    rule = RANGES.get(key)
    if rule is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and not rule[1](value):
        raise ConfigError(f"{key} (set in {sources.get(key, 'defaults')}): must be {rule[0]}, got {value!r}")


def _build(cls: type, data: Any, prefix: str, sources: dict[str, str]) -> Any:
    where = sources.get(prefix, "defaults") if prefix else "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} (set in {where}): expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else key
            raise ConfigError(
                f"unknown key {dotted!r} (set in {sources.get(dotted, 'config')}); "
                f"known keys{' of ' + prefix if prefix else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            dotted = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], dotted, sources)
            _check_range(dotted, kwargs[name], sources)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # A validation in __post_init__: name the key it mentions and the source that set it.
        named = [n for n in names if n in str(exc)]
        key = f"{prefix}.{named[0]}" if prefix and named else (named[0] if named else prefix or "config")
        raise ConfigError(f"{key} (set in {sources.get(key, where)}): {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load `path` (default configs/default.yaml) with its `_base_` chain, then apply `--set` overrides."""
    sources: dict[str, str] = {}
    data = _load_with_bases(Path(path or DEFAULT_CONFIG), sources)
    for text in overrides or []:
        key, value = parse_override(text)
        data = _merge(data, _nest(key, value), sources, f"--set {text}")
    return _build(Config, data, "", sources)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from a resolved dict (e.g. a run's config.yaml), validating it the same way."""
    sources: dict[str, str] = {}
    _merge({}, data, sources, "dict")
    return _build(Config, data, "", sources)
