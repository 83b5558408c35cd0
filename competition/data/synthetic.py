"""Write a whole synthetic competition: train normals, 30-odd defects with masks, a test set.

The layout follows the original Kaggle competition (train/normal_images, train/defect_images,
train/defect_masks, test/images, sample_submission.csv with ImageId,answer) plus the hidden
answers.csv with a Public/Private split for a local leaderboard. Each image has its own random
stream spawned from one SeedSequence, so the same seed gives the same bytes in every file.
"""
from __future__ import annotations

import io
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from competition.artifacts import write_csv, write_json
from competition.data.painters import DEFECT_KINDS, paint_defect
from competition.data.textures import DATASET_FAMILIES, make_texture


@dataclass(frozen=True)
class Preset:
    """Counts and image geometry of one synthetic competition."""

    n_normal: int
    n_defect: int
    n_test: int
    image_size: int
    test_defect_rate: float = 0.05
    resized_fraction: float = 0.2  # share of images whose size differs from image_size ...
    resize_range: float = 0.25  # ... by up to +-25% in height and width, independently
    public_fraction: float = 0.3  # share of test rows scored on the public leaderboard


PRESETS: dict[str, Preset] = {
    # Seconds to write; >= 10 defects so each of five folds gets some, and a 10% test defect
    # rate so the 40 test images hold defects in both the public and the private part.
    "tiny": Preset(n_normal=60, n_defect=12, n_test=40, image_size=64, test_defect_rate=0.1),
    # The default: small enough for 5-fold CNN training plus the anomaly zoo on 2 CPU cores.
    "small": Preset(n_normal=400, n_defect=30, n_test=300, image_size=128),
    # Between the two, for measuring how each stage's cost grows (bench/scaling.py): the small set's
    # image size and defects, five times its normals and ten times its test images.
    "medium": Preset(n_normal=2000, n_defect=30, n_test=3000, image_size=128),
    # The original competition's counts.
    "full": Preset(n_normal=6790, n_defect=30, n_test=9100, image_size=256),
}

# Severity 0 = obvious, 1 = subtle (see painters.paint_defect); real_like keeps the subtle end.
_REAL_LIKE_MIN_SEVERITY = 0.6
_OUTPUTS = ("train", "test", "answers.csv", "synth.json")
# Below this many images a process pool costs more to start than it saves.
_PARALLEL_FROM = 500


def write_competition(out: str | Path, preset: str = "small", seed: int = 0,
                      test_defect_rate: float | None = None, real_like: bool = False,
                      progress: bool = True, overwrite: bool = False, workers: int = 1) -> dict[str, Any]:
    """Write the dataset of `preset` under `out` and return the summary also saved as synth.json.

    `test_defect_rate` overrides the preset's share of defective test images. `real_like` makes
    the harder variant: grayscale, strongly varying sizes, subtle defects only, uneven lighting,
    sensor noise and JPEG artefacts (images are still stored as PNG). synth.json is written last,
    so its presence means the dataset is complete. An existing dataset under `out` raises
    FileExistsError unless `overwrite`, which deletes it first. `workers` processes render the images
    (0: one per core, up to 16); the files are the same bytes for any number.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    rate = spec.test_defect_rate if test_defect_rate is None else float(test_defect_rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"test_defect_rate must lie in [0, 1), got {rate}")
    out = Path(out)
    _prepare_output(out, overwrite)

    plan_seq, normal_seq, defect_seq, test_seq = np.random.SeedSequence(seed).spawn(4)
    plan = _plan_test_set(spec.n_test, rate, spec.public_fraction, np.random.default_rng(plan_seq))

    dirs = {name: out / sub for name, sub in [("normal", "train/normal_images"), ("defect", "train/defect_images"),
                                              ("mask", "train/defect_masks"), ("test", "test/images")]}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)

    jobs = [(dirs["normal"] / f"normal_{i:05d}.png", None, child, False)
            for i, child in enumerate(normal_seq.spawn(spec.n_normal))]
    jobs += [(dirs["defect"] / f"defect_{i:05d}.png", dirs["mask"] / f"defect_{i:05d}.png", child, True)
             for i, child in enumerate(defect_seq.spawn(spec.n_defect))]
    jobs += [(dirs["test"] / f"test_{i:05d}.png", None, child, bool(plan["defective"][i]))
             for i, child in enumerate(test_seq.spawn(spec.n_test))]
    writer = partial(_write_image, spec=spec, real_like=real_like)
    workers = min(os.cpu_count() or 1, 16) if workers == 0 else max(1, int(workers))
    with tqdm(total=len(jobs), desc=f"synth {preset}", unit="img", disable=not progress) as bar:
        if workers == 1 or len(jobs) < _PARALLEL_FROM:
            for job in jobs:
                writer(job)
                bar.update()
        else:  # every image has its own random stream: the bytes do not depend on which process writes them
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(writer, jobs, chunksize=32):
                    bar.update()

    order = plan["order"]
    image_ids = [f"test_{index:05d}" for index in order]
    write_csv(pd.DataFrame({"ImageId": image_ids, "answer": 0}), out / "test" / "sample_submission.csv")
    answers = pd.DataFrame({
        "ImageId": image_ids,
        "answer": plan["defective"][order].astype(int),
        "Usage": np.where(plan["public"][order], "Public", "Private"),
    })
    write_csv(answers, out / "answers.csv")

    summary = {
        "preset": preset,
        "seed": int(seed),
        "real_like": bool(real_like),
        "test_defect_rate": rate,
        "counts": {
            "train_normal": spec.n_normal,
            "train_defect": spec.n_defect,
            "test": spec.n_test,
            "test_defect": int(plan["defective"].sum()),
            "test_public": int(plan["public"].sum()),
            "test_public_defect": int((plan["public"] & plan["defective"]).sum()),
        },
        "preset_spec": asdict(spec),
        "families": list(DATASET_FAMILIES),
        "defect_kinds": list(DEFECT_KINDS),
        "version": _package_version(),
    }
    write_json(summary, out / "synth.json")
    return summary


def _prepare_output(out: Path, overwrite: bool) -> None:
    existing = [out / name for name in _OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({existing[0].name}); delete it, or pass "
                              "--overwrite (overwrite=True from Python) to replace it")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _plan_test_set(n_test: int, rate: float, public_fraction: float,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Which test images are defective, the submission row order, and the Public/Private split.

    With any defects at all there are at least two, and the split is stratified by label so
    both leaderboards contain defects.
    """
    n_defect = int(round(n_test * rate))
    if rate > 0 and n_test >= 2:
        n_defect = max(n_defect, 2)
    defective = np.zeros(n_test, bool)
    defective[rng.choice(n_test, size=n_defect, replace=False)] = True
    public = np.zeros(n_test, bool)
    for label in (True, False):
        members = np.flatnonzero(defective == label)
        if len(members) == 0:
            continue
        n_public = int(round(public_fraction * len(members)))
        if len(members) >= 2:
            n_public = min(max(n_public, 1), len(members) - 1)
        public[rng.choice(members, size=n_public, replace=False)] = True
    return {"defective": defective, "public": public, "order": rng.permutation(n_test)}


def _render_image(rng: np.random.Generator, spec: Preset, real_like: bool,
                  defective: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (and its mask if defective) from its own random stream."""
    height, width = _draw_size(rng, spec, real_like)
    # Families are mixed within the normal class on purpose: it makes "normal" multi-modal.
    family = DATASET_FAMILIES[int(rng.integers(len(DATASET_FAMILIES)))]
    image = make_texture(family, (height, width), rng)
    if real_like:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    mask = None
    if defective:
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
        low = _REAL_LIKE_MIN_SEVERITY if real_like else 0.0
        image, mask = paint_defect(image, kind, rng, severity=float(rng.uniform(low, 1.0)))
    if real_like:
        image = _camera_artefacts(image, rng)
    return image, mask


def _write_image(job: tuple[Path, Path | None, np.random.SeedSequence, bool], spec: Preset,
                 real_like: bool) -> None:
    """Render one planned image from its own seed and save it (and its mask, for a training defect)."""
    path, mask_path, seed, defective = job
    image, mask = _render_image(np.random.default_rng(seed), spec, real_like, defective=defective)
    _save_png(path, image)
    if mask_path is not None:
        _save_png(mask_path, mask)


def _draw_size(rng: np.random.Generator, spec: Preset, real_like: bool) -> tuple[int, int]:
    if real_like:
        scale = rng.uniform(0.6, 1.4, size=2)
    elif rng.random() < spec.resized_fraction:
        scale = rng.uniform(1.0 - spec.resize_range, 1.0 + spec.resize_range, size=2)
    else:
        scale = np.ones(2)
    height, width = (max(32, int(round(spec.image_size * s))) for s in scale)
    return height, width


def _camera_artefacts(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uneven illumination (gradient + vignette), sensor noise, then a JPEG round-trip."""
    height, width = grey.shape
    ys = (np.arange(height, dtype=np.float32) / height - 0.5)[:, None]
    xs = (np.arange(width, dtype=np.float32) / width - 0.5)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.1, 0.4) * (np.cos(angle) * xs + np.sin(angle) * ys)
    vignette = rng.uniform(0.0, 0.5) * (xs ** 2 + ys ** 2)
    lit = grey.astype(np.float32) * (1.0 + gradient - vignette)
    noisy = lit + rng.normal(0.0, rng.uniform(1.5, 5.0), size=lit.shape)
    image = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(rng.integers(60, 91)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L"))


def _save_png(path: Path, array: np.ndarray) -> None:
    # PIL writes no timestamp or other varying chunk into PNGs, so equal arrays give equal bytes.
    # Textures are noisy: zlib level 1 is ~4x faster than the default 6 for ~2% larger files.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _package_version() -> str:
    try:
        return metadata.version("competition")
    except metadata.PackageNotFoundError:
        return "unknown"
