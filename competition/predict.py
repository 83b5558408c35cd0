"""`python -m competition predict --images ... --out CSV`: the trained ensemble on new images.

What the experiment trained, nothing retrained: every fold's classifier (best.pt with the fold's own
config.yaml) and every fold's fitted zoo model (model.pt, `zoo.save_models`), scored the way
test.csv was (the same evaluation pipeline, geometry and TTA); each fold model's scores normalised
against the reference that infer used (that fold model's test scores, kept in
`submissions/<experiment>.predictor.json`), averaged over the folds, stacked by the stacker's own
numbers (`stacking.stacker_form`) and cut at the ensemble's threshold. On the competition's own test
images this reproduces submission.csv.

Streaming: images go through in chunks (`--chunk`), decoded once per chunk and dropped after it, so a
folder of 100,000 images costs its list of paths and one chunk of pixels. An unreadable image gets a
row with an empty score and its error; the others are still scored and the exit code is 1. A missing
or stale experiment stops before any image is read, naming what is missing and the command that
makes it.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from competition.artifacts import file_digest, load_checkpoint, model_dir, read_json, write_csv
from competition.config import Config, config_from_dict
from competition.data.images import ImageReadError, read_image
from competition.data.layouts import IMAGE_EXTENSIONS
from competition.ensemble.infer import PREDICTOR_FORMAT, predictor_path
from competition.ensemble.stacking import form_scores, normalise_scores
from competition.runtime import select_device

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
# A score this close (relative to the reference's magnitude) to a reference score is that score (normalise_scores):
# scores recomputed in other batches differ in their last bits, exported graphs by up to about 1e-5 relative.
SNAP_TOLERANCE = 1e-4


class ExperimentNotReadyError(RuntimeError):
    """The experiment lacks what predict needs; the message names every missing file and its command."""


# ------------------------------------------------------------------------------------ inputs

def expand_images(items: list[str]) -> list[str]:
    """Files, folders (every image file below, recursively) and globs, in the order given, each folder's
    and glob's files sorted, duplicates dropped. A name that matches nothing stops the run."""
    found: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            matches = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not matches:
                raise FileNotFoundError(f"{item}: a folder without image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            matches = [str(path)]
        else:
            matches = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"{item}: no such file or folder, and no file matches it as a glob")
        found.extend(matches)
    return list(dict.fromkeys(found))


# ------------------------------------------------------------------------------------ the experiment

@dataclass
class Predictor:
    """submissions/<experiment>.predictor.json, read back."""

    models: list[str]
    kinds: dict[str, str]  # model -> classifier | zoo
    n_folds: int
    normalise: str
    stacker: dict[str, Any]
    threshold: float
    references: dict[str, dict[int, np.ndarray]]
    digests: dict[str, dict[int, str]]

    @classmethod
    def read(cls, cfg: Config) -> Predictor:
        path = predictor_path(cfg)
        if not path.is_file():
            raise ExperimentNotReadyError(
                f"{path} does not exist: stack experiment {cfg.experiment!r} first (make infer; "
                "python -m competition infer), with the config it was trained with")
        record = read_json(path)
        if record.get("format") != PREDICTOR_FORMAT:
            raise ExperimentNotReadyError(f"{path} has format {record.get('format')!r}, this version reads "
                                          f"{PREDICTOR_FORMAT}: re-run make infer")
        if record.get("stacker") is None:
            raise ExperimentNotReadyError(
                f"{path}: the stacker (ensemble.method {record.get('method')!r}) has no plain-number form that "
                "predict can read; use ensemble.method logistic, auto, rank_blend, mean or best_single and "
                "re-run make infer")
        return cls(models=list(record["models"]), kinds=dict(record["kinds"]), n_folds=int(record["n_folds"]),
                   normalise=record["normalise"], stacker=record["stacker"], threshold=float(record["threshold"]),
                   references={m: {int(k): np.asarray(v, float) for k, v in folds.items()}
                               for m, folds in record["references"].items()},
                   digests={m: {int(k): v for k, v in folds.items()} for m, folds in record["test_csv_sha1"].items()})

    def fold_file(self, cfg: Config, model: str, fold: int) -> Path:
        """The file that holds fold model `fold` of `model`."""
        name = "best.pt" if self.kinds[model] == "classifier" else "model.pt"
        return model_dir(cfg.paths.work, cfg.experiment, model) / f"fold{fold}" / name

    def check(self, cfg: Config) -> None:
        """Every fold model present and unchanged since infer; else stop naming each problem and its command."""
        problems = []
        for model in self.models:
            for fold in range(self.n_folds):
                fold_dir = model_dir(cfg.paths.work, cfg.experiment, model) / f"fold{fold}"
                if self.kinds[model] == "classifier":
                    needed = [fold_dir / "best.pt", fold_dir / "config.yaml"]
                    command = f"make train FOLD={fold}"
                else:
                    needed = [fold_dir / "model.pt"]
                    command = f"make zoo MODEL={model} FOLD={fold} (with zoo.save_models: true; --force refits)"
                lacking = [str(p) for p in needed if not p.is_file()]
                if lacking:
                    problems.append(f"{', '.join(lacking)} missing: {command}")
                    continue
                test_csv = fold_dir / "test.csv"
                if not test_csv.is_file() or file_digest(test_csv) != self.digests[model][fold]:
                    problems.append(f"{model} fold {fold} changed since the ensemble was stacked ({test_csv}): "
                                    "re-run make infer")
        if problems:
            raise ExperimentNotReadyError(
                f"experiment {cfg.experiment!r} under {Path(cfg.paths.work) / cfg.experiment} cannot predict yet:\n  "
                + "\n  ".join(problems))


# ------------------------------------------------------------------------------------ fold models

class ClassifierFold:
    """One fold's supervised model, scoring paths exactly as its test.csv was scored."""

    def __init__(self, fold_dir: Path, device: torch.device, runtime: str):
        from competition.classifier.data import ImageStore, classifier_geometry
        from competition.classifier.train import load_fold_classifier, predict_map

        with open(fold_dir / "config.yaml", encoding="utf-8") as handle:
            self.cfg = config_from_dict(yaml.safe_load(handle))
        self.device = device
        self.eager = load_fold_classifier(self.cfg, fold_dir, device)
        self.forward: torch.nn.Module | Callable = self.eager
        if runtime != "torch":
            from competition.export import classifier_forward

            self.forward = classifier_forward(fold_dir, runtime)
        self.geometry = classifier_geometry(self.cfg, scoring=True)  # the grid that wrote test.csv
        self._store_class, self._predict_map = ImageStore, predict_map
        self.store = ImageStore(self.geometry)

    def begin_chunk(self, paths: list[str], images: list[np.ndarray]) -> None:
        self.store = self._store_class(self.geometry)  # the last chunk's surfaces are dropped
        for path, image in zip(paths, images):
            self.store.image(path, decoded=image)

    def scores(self, paths: list[str], images: list[np.ndarray]) -> np.ndarray:
        from competition.classifier.train import image_scores

        return image_scores(self.forward, paths, self.cfg, self.store, self.device, desc="classifier")

    def maps(self, paths: list[str], images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """(surface, defect-probability map) per image; None for a model without a segmentation output."""
        out = []
        for path in paths:
            surface = self.store.image(path)
            probability = self._predict_map(self.eager, surface, self.store, self.device, self.cfg)
            if probability is None:
                return None
            out.append((surface, probability))
        return out


class ZooFold:
    """One fold's fitted zoo model (model.pt), without the feature cache: new images are scored afresh."""

    def __init__(self, fold_dir: Path, device: torch.device, runtime: str):
        from competition.zoo.api import ZooSettings
        from competition.zoo.registry import model_class

        path = fold_dir / "model.pt"
        checkpoint = load_checkpoint(path)
        settings = dataclasses.replace(ZooSettings.from_dict(checkpoint["settings"]), device=str(device),
                                       cache_dir=None, progress=False, run_dir=None)
        self.model = model_class(checkpoint["family"]).from_checkpoint(checkpoint, path, settings)
        if runtime != "torch":
            from competition.export import zoo_with_runtime

            self.model = zoo_with_runtime(self.model, fold_dir, runtime)

    def begin_chunk(self, paths: list[str], images: list[np.ndarray]) -> None:
        pass

    def scores(self, paths: list[str], images: list[np.ndarray]) -> np.ndarray:
        from competition.zoo.api import ImageSet

        return self.model.score_samples(ImageSet(images, paths))

    def maps(self, paths: list[str], images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(the image fitted to the whole-image canvas, anomaly map) per image, as the zoo's galleries draw them."""
        from competition.preprocess import fit_to_canvas
        from competition.zoo.api import ImageSet

        maps = self.model.anomaly_maps(ImageSet(images, paths))
        whole = dataclasses.replace(self.model.settings.geometry, tiles=False)
        return [(fit_to_canvas(image, whole)[0], m) for image, m in zip(images, maps)]


def load_fold_models(cfg: Config, predictor: Predictor, device: torch.device,
                     runtime: str) -> dict[str, list[ClassifierFold | ZooFold]]:
    out = {}
    for model in tqdm(predictor.models, desc="load models", unit="model", leave=False):
        kind = ClassifierFold if predictor.kinds[model] == "classifier" else ZooFold
        out[model] = [kind(model_dir(cfg.paths.work, cfg.experiment, model) / f"fold{k}", device, runtime)
                      for k in range(predictor.n_folds)]
    return out


# ------------------------------------------------------------------------------------ scoring

def decode_chunk(paths: list[str]) -> tuple[list[str], list[np.ndarray], dict[str, str]]:
    """(readable paths, their images, {unreadable path: why})."""
    good, images, errors = [], [], {}
    for path in paths:
        try:
            images.append(read_image(path))
            good.append(path)
        except (ImageReadError, OSError, ValueError) as exc:
            errors[path] = str(exc)
    return good, images, errors


def chunk_features(predictor: Predictor, folds: dict[str, list], paths: list[str],
                   images: list[np.ndarray]) -> pd.DataFrame:
    """One column per model: its fold models' scores, each normalised against that fold model's reference,
    averaged over the folds (as `stacking.level2_features` builds the test features)."""
    features = {}
    for model, fold_models in folds.items():
        per_fold = []
        for k, fold_model in enumerate(fold_models):
            fold_model.begin_chunk(paths, images)
            reference = predictor.references[model][k]
            tolerance = SNAP_TOLERANCE * max(1.0, float(np.max(np.abs(reference))))
            raw = fold_model.scores(paths, images)
            per_fold.append(normalise_scores(raw, reference, predictor.normalise, tolerance))
        features[model] = pd.DataFrame(per_fold).T.mean(axis=1).to_numpy(float)  # the mean infer takes
    return pd.DataFrame(features, columns=predictor.models)


def write_maps(folds: dict[str, list], paths: list[str], images: list[np.ndarray], features: pd.DataFrame,
               out: Path, taken: set[str]) -> list[str]:
    """One PNG per image: each model's map over its view of the image (fold models' maps averaged),
    each map scaled to its own range. Returns the files written."""
    from competition.plots import plot_maps_gallery

    per_model = {}
    for model, fold_models in folds.items():
        views = [fold_model.maps(paths, images) for fold_model in fold_models]
        if any(v is None for v in views):
            continue
        per_model[model] = [(views[0][i][0], np.mean([v[i][1] for v in views], axis=0)) for i in range(len(paths))]
    written = []
    for i, path in enumerate(paths):
        stem, n = Path(path).stem, 1
        name = f"{stem}.png"
        while name in taken:
            n += 1
            name = f"{stem}_{n}.png"
        taken.add(name)
        shown, maps, captions = [], [], []
        for model, pairs in per_model.items():
            image, heat = pairs[i]
            low, high = float(np.min(heat)), float(np.max(heat))
            shown.append(image)
            maps.append((heat - low) / (high - low) if high > low else np.zeros_like(heat))
            captions.append(f"{model}: {features[model].iloc[i]:.3f}")
        if shown:
            written.append(str(plot_maps_gallery(shown, maps, captions, out / name, Path(path).name,
                                                 columns=min(len(shown), 3))))
        else:
            written.append("")
    return written


def predict(cfg: Config, images: list[str], out: str | Path, maps_dir: str | Path | None = None,
            runtime: str = "torch", chunk: int = 128, threshold: float | None = None) -> pd.DataFrame:
    """Score `images` with the experiment's ensemble; writes `out` (path, score, answer, error, one column per
    model's fold-averaged normalised score, map) and returns it."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    predictor = Predictor.read(cfg)
    predictor.check(cfg)
    paths = expand_images(images)
    cut = predictor.threshold if threshold is None else float(threshold)
    device = select_device(cfg.device)
    folds = load_fold_models(cfg, predictor, device, runtime)
    maps_out = None if maps_dir is None else Path(maps_dir)
    taken: set[str] = set()
    frames = []
    for start in tqdm(range(0, len(paths), chunk), desc="predict", unit="chunk",
                      total=(len(paths) + chunk - 1) // chunk):
        good, decoded, errors = decode_chunk(paths[start:start + chunk])
        rows = pd.DataFrame({"path": paths[start:start + chunk]})
        rows["error"] = [errors.get(path, "") for path in rows["path"]]
        if good:
            features = chunk_features(predictor, folds, good, decoded)
            scored = features.assign(path=good, score=form_scores(predictor.stacker, features.to_numpy(float)))
            scored["answer"] = (scored["score"] >= cut).astype(int)
            scored["map"] = ""
            defective = np.flatnonzero(scored["answer"].to_numpy() == 1)
            if maps_out is not None and len(defective):
                scored.loc[scored.index[defective], "map"] = write_maps(
                    folds, [good[i] for i in defective], [decoded[i] for i in defective],
                    features.iloc[defective].reset_index(drop=True), maps_out, taken)
            rows = rows.merge(scored, on="path", how="left")
        frames.append(rows)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"path": []})
    for column in ("score", "answer", "map", *predictor.models):
        if column not in table:
            table[column] = np.nan
    table["answer"] = table["answer"].astype("Int64")  # empty, not NaN, for an unreadable image
    table = table[["path", "score", "answer", "error", *predictor.models, "map"]]
    write_csv(table, out)
    return table


def main(cfg: Config, images: list[str], out: str, maps_dir: str | None = None, runtime: str = "torch",
         chunk: int = 128, threshold: float | None = None) -> int:
    """CLI entry point: 0 when every image was scored, 1 when some could not be read (their rows say why)."""
    started = time.perf_counter()
    table = predict(cfg, images, out, maps_dir, runtime, chunk, threshold)
    seconds = time.perf_counter() - started
    failed = table[table["error"] != ""]
    scored = len(table) - len(failed)
    print(f"{scored} image(s) scored in {seconds:.1f} s ({scored / seconds:.2f} images/s, runtime {runtime}); "
          f"{int(table['answer'].sum())} predicted defective")
    for row in failed.head(10).itertuples():
        print(f"  unreadable: {row.error}")
    if len(failed):
        print(f"  {len(failed)} image(s) could not be read; their rows hold the error")
    print(out)
    return 1 if len(failed) else 0
