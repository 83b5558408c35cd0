"""`python -m competition zoo --model NAME --fold K`: honest out-of-fold scores of a zoo model.

For fold K the model is fitted on the normal training images of every other fold (fold K's normals
never enter the fit; trained models also get a validation set made only of training-fold images),
then scores fold K's images (`oof.csv`) and every test image (`test.csv`). Written to
`<paths.work>/<experiment>/<NAME>/fold<K>/`: oof.csv, test.csv, config.yaml, results.json
(AUROC, AUPR, metrics at four thresholds, the OK/NG rule), fit_images.csv, histogram.png,
gallery.png, test_decisions.csv, model.pt (when `zoo.save_models`) and, last, summary.json,
whose presence marks the fold finished. A supervised model (`uses_defects`) also trains on the
training folds' real defects with their masks (`fit_defects.csv`), never on fold K's.
`competition.stage` decides what a second call does: a finished fold is reused if its
results-relevant config (`zoo_record`: the data, folds, `zoo.*` and this model's resolved
`zoo.params`) is unchanged and refused, naming the changed keys, if not;
`--force` clears the folder and fits again. An entry that differs from another of `zoo.models` only
in params that score (`AnomalyModel.scoring_params`: probe5-bg beside probe5) takes that entry's
finished fold's fitted model instead of fitting it again (`fitted_twin`; summary.json's `fitted_by`
names it). A fold with fewer than `zoo.min_real_defects` real
defects is also judged on `zoo.painted_per_fold` defects painted onto its own normal images,
reported separately (`results.json: painted`), never mixed into oof.csv.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from competition.artifacts import read_json, run_dir, write_csv, write_json, write_predictions, write_yaml
from competition.config import Config
from competition.folds import check_stage_inputs, fold_inputs, load_index, parse_fold_arg, training_folds
from competition.metrics import best_threshold, binary_metrics
from competition.plots import plot_gallery, plot_score_histogram
from competition.preprocess import fit_to_canvas
from competition.runtime import configure_threads, seed_everything
from competition.stage import RunFolder, config_differences, json_form, results_config
from competition.zoo.api import AnomalyModel, ImageSet
from competition.zoo.draws import screened_draw
from competition.zoo.evaluation import evaluate_scores
from competition.zoo.registry import build_from_config, config_params, entry_image_size, get_entry, resolved_params
from competition.zoo.validation import defect_masks, painted_copies, split_defects, split_validation

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"

# The config sections a zoo fold's results depend on (less `stage.NEUTRAL_KEYS`); `zoo.models` and
# the other models' `zoo.params` are not among them.
RESULTS_KEYS = ("seed", "data", "folds", "zoo")


def fits_pseudo_labels(cfg: Config) -> bool:
    """Whether the zoo trains on the second round's pseudo-labels (`pseudo.zoo`), not only the classifier."""
    return cfg.pseudo.enabled and cfg.pseudo.zoo


def zoo_record(cfg: Config, name: str) -> dict[str, Any]:
    """The results-relevant config of model `name`'s folds, its `zoo.params` resolved (registry
    defaults plus the config's overrides), so `zoo.params.lr: 0.001 -> 0.01` names a change."""
    pseudo = fits_pseudo_labels(cfg)
    record = results_config(cfg, RESULTS_KEYS + (("pseudo",) if pseudo else ()))
    record["zoo"].pop("models")
    record["zoo"]["params"] = dataclasses.asdict(resolved_params(name, config_params(cfg, name)))
    # this entry's canvas alone: another entry's zoo.image_sizes does not change what this one fits
    record["zoo"].pop("image_sizes", None)
    record["zoo"]["image_size"] = entry_image_size(cfg, name)
    if not record["zoo"]["params"].get("screen_draws", 1):
        del record["zoo"]["params"]["screen_draws"]  # off: folds fitted before the key existed stay valid
    record["inputs"] = fold_inputs(cfg, pseudo=pseudo)
    return json_form(record)


def screen_record(cfg: Config, name: str) -> dict[str, Any]:
    """What a fold's draw screen depends on: the model's record, less the draw (the rank NAME@K takes)."""
    record = zoo_record(cfg, name)
    record["zoo"]["params"].pop("draw", None)
    return record


def copy_source_fold(cfg: Config, name: str, fold: int, record: dict[str, Any], out: Path) -> bool:
    """A second round whose zoo ignores the pseudo-labels (`pseudo.zoo: false`) fits exactly what the first
    round fitted: copy the source experiment's finished fold when its record is this one, instead of fitting
    it again (minutes per fold). False when there is nothing to copy; the caller fits."""
    if not cfg.pseudo.enabled or fits_pseudo_labels(cfg):
        return False
    source = run_dir(cfg.paths.work, str(cfg.pseudo.source), name, fold)
    done = run_folder(source).finished()
    if done is None or config_differences(done.get("config", {}), record):
        return False
    partial = out.with_name(f"{out.name}.copying")  # renamed into place whole: a killed copy leaves no fold
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(out, ignore_errors=True)  # an unfinished fit of this fold, if any
    partial.rename(out)
    log.info("%s fold %d: copied from experiment %r (pseudo.zoo is false: the same fit) -> %s",
             name, fold, cfg.pseudo.source, out)
    return True


def fit_record(record: dict[str, Any], scoring_params: tuple[str, ...]) -> dict[str, Any]:
    """A fold's record less the params that only score (`AnomalyModel.scoring_params`): what its fit depends on."""
    zoo = dict(record["zoo"], params={k: v for k, v in record["zoo"]["params"].items() if k not in scoring_params})
    return dict(record, zoo=zoo)


def fitted_twin(cfg: Config, name: str, fold: int, record: dict[str, Any]) -> Path | None:
    """A finished fold of another `zoo.models` entry whose fit is this one's: the same family and record but for
    the model's `scoring_params`, its model.pt kept. probe5-bg is probe5 scored otherwise; taking probe5's fitted
    fold gives it the module a fit of its own would give, bit for bit (checked on deeppcb's five folds), without
    the minutes of that fit. None when there is none, or when a draw screen chose the draw (the screen scores)."""
    model_class = get_entry(name).model_class
    scoring = tuple(model_class.scoring_params)
    if not scoring or record["zoo"]["params"].get("screen_draws", 1) > 1:
        return None
    wanted = fit_record(record, scoring)
    for other in cfg.zoo.models:
        if other == name or get_entry(other).model_class is not model_class:
            continue
        source = run_dir(cfg.paths.work, cfg.experiment, other, fold)
        done = run_folder(source).finished() or {}
        if ("zoo" in done.get("config", {}) and (source / "model.pt").exists()
                and not config_differences(fit_record(done["config"], scoring), wanted)):
            return source
    return None


def run_folder(out: Path) -> RunFolder:
    """A fold's folder: summary.json, written last, marks it finished; --force clears the whole folder."""
    return RunFolder(marker=out / SUMMARY_FILE, outputs=(out,), redo="refit this fold")


def fit_fold(cfg: Config, name: str, fold: int, folds: pd.DataFrame, out: Path,
             test_images: ImageSet | None = None) -> tuple[AnomalyModel, dict]:
    """Fit `name` on the normals of every fold but `fold` (plus a training-fold validation set if it wants one).
    With `zoo.batchnorm_images: test`, a healthy random backbone takes its BatchNorm statistics from
    `test_images` (unlabeled, never an out-of-fold image) instead of the fit normals.

    A model that `uses_defects` also trains on the training folds' real defects with their masks: a
    `zoo.validation_share` of them (`validation.split_defects`, at least one of two or more) is held
    back as its validation set's real defects, the rest is trained on (`fit_defects.csv`), so no
    defect is both. Fold `fold`'s images never enter the fit.
    """
    train_rows = folds[folds["fold"] != fold]
    batchnorm_images = test_images if cfg.zoo.batchnorm_images == "test" and test_images is not None else None
    screened = screened_draw(cfg, name, fold, train_rows, batchnorm_images, screen_record(cfg, name))
    model = (build_from_config(name, cfg, run_dir=out) if screened is None
             else build_from_config(name, cfg, run_dir=out, draw=screened["draw"]))
    normal_rows = train_rows[train_rows["label"] == 0]
    defect_rows = train_rows[train_rows["label"] == 1]
    fit_images = ImageSet.from_frame(normal_rows)
    share = float(getattr(model.params, "validation_share", cfg.zoo.validation_share))
    seed = cfg.seed + 1000 * fold
    validation = defects = None
    if model.uses_validation or model.uses_defects:
        watched, watched_masks = ImageSet.from_frame(defect_rows), defect_masks(defect_rows)
    if model.uses_defects:
        defects, held = split_defects(watched, watched_masks, share if model.uses_validation else 0.0, seed + 1)
        watched, watched_masks = held.images, held.masks
    if model.uses_validation:
        fit_images, validation = split_validation(fit_images, watched, share, seed, defect_masks=watched_masks,
                                                  kinds=cfg.zoo.painted_kinds)
    write_csv(pd.DataFrame({"image_id": fit_images.ids}), out / "fit_images.csv")
    if defects is not None:
        write_csv(pd.DataFrame({"image_id": defects.images.ids, "has_mask": [m is not None for m in defects.masks]}),
                  out / "fit_defects.csv")
    if screened is not None:
        write_json(screened, out / "draw_screen.json")
    started = time.perf_counter()
    model.fit(fit_images, validation, defects, batchnorm_images=batchnorm_images)
    facts = {"fit_seconds": round(time.perf_counter() - started, 2), "n_fit": len(fit_images),
             "n_validation": 0 if validation is None else len(validation),
             "batchnorm_images": "fit" if batchnorm_images is None or not len(batchnorm_images) else "test"}
    if defects is not None:
        facts["n_fit_defects"] = len(defects)
    if screened is not None:
        facts["screened_draw"] = {"draw": screened["draw"], "rank": screened["rank"],
                                  "auroc": screened["screen"]["candidates"][screened["rank"]]["auroc"]}
    return model, facts


def _gallery(model: AnomalyModel, test_images: ImageSet, scores: np.ndarray, size: int, path: Path, title: str) -> None:
    top = np.argsort(-scores, kind="stable")[:size]
    subset = test_images.subset(top.tolist())
    maps = model.anomaly_maps(subset)
    whole_image = dataclasses.replace(model.settings.geometry, tiles=False)  # tiled maps come back stitched
    shown = [fit_to_canvas(subset.read(i), whole_image)[0] for i in range(len(subset))]
    captions = [f"{subset.ids[i]}  {scores[j]:.3g}" for i, j in enumerate(top)]
    plot_gallery(shown, maps, captions, path, title)


def run_fold(cfg: Config, name: str, fold: int, index: pd.DataFrame, folds: pd.DataFrame, force: bool) -> Path:
    out = run_dir(cfg.paths.work, cfg.experiment, name, fold)
    record = zoo_record(cfg, name)
    if run_folder(out).prepare(record, force) is not None:
        log.info("%s fold %d is finished (%s); --force refits it", name, fold, out)
        return out
    if not force and copy_source_fold(cfg, name, fold, record, out):
        return out
    seed_everything(cfg.seed + fold)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(cfg.to_dict(), out / "config.yaml")
    test_rows = index[index["split"] == "test"].reset_index(drop=True)
    test_images = ImageSet.from_frame(test_rows)
    twin = None if force else fitted_twin(cfg, name, fold, record)
    if twin is None:
        model, facts = fit_fold(cfg, name, fold, folds, out, test_images)
    else:
        model = build_from_config(name, cfg, run_dir=out)
        model.adopt_fit(twin / "model.pt")
        for listed in ("fit_images.csv", "fit_defects.csv"):  # what the twin's fit read, so this one's
            if (twin / listed).exists():
                shutil.copyfile(twin / listed, out / listed)
        facts = {key: value for key, value in read_json(twin / SUMMARY_FILE).items()
                 if key in ("n_fit", "n_validation", "batchnorm_images", "n_fit_defects")}
        facts.update(fit_seconds=0.0, fitted_by=str(twin))
        log.info("%s fold %d: takes the fitted model of %s (the two differ at most in %s, which only score)",
                 name, fold, twin, ", ".join(model.scoring_params))

    held_out = folds[folds["fold"] == fold].reset_index(drop=True)
    started = time.perf_counter()
    oof_scores = model.score_samples(ImageSet.from_frame(held_out))
    test_scores = model.score_samples(test_images)
    score_seconds = time.perf_counter() - started
    n_scored = len(held_out) + len(test_rows)

    oof = pd.DataFrame({"image_id": held_out["image_id"], "label": held_out["label"].astype(int),
                        "score": oof_scores})
    test = pd.DataFrame({"image_id": test_rows["image_id"], "score": test_scores})
    write_predictions(oof, test, out)

    labels = oof["label"].to_numpy()
    results = {"model": name, "fold": fold, "oof": evaluate_scores(labels, oof_scores)}
    groups = {"normal": oof_scores[labels == 0], "defect": oof_scores[labels == 1]}
    if labels.sum() < cfg.zoo.min_real_defects and cfg.zoo.painted_per_fold > 0:
        normal_idx = np.flatnonzero(labels == 0)
        rng = np.random.default_rng(cfg.seed + 7919 * fold)
        chosen = rng.choice(normal_idx, size=min(cfg.zoo.painted_per_fold, len(normal_idx)), replace=False)
        painted, _ = painted_copies(ImageSet.from_frame(held_out), sorted(chosen.tolist()), cfg.seed + fold)
        painted_scores = model.score_samples(painted)
        normal_scores = oof_scores[labels == 0]
        both = np.concatenate([normal_scores, painted_scores])
        both_labels = np.r_[np.zeros(len(normal_scores), int), np.ones(len(painted_scores), int)]
        results["painted"] = {"note": f"fold {fold} has {int(labels.sum())} real defects (< zoo.min_real_defects="
                                      f"{cfg.zoo.min_real_defects}); its normals vs painted copies of "
                                      f"{len(painted_scores)} of them", **evaluate_scores(both_labels, both)}
        groups["painted"] = painted_scores

    # The OK/NG rule: a fixed threshold from the config, else the macro-F1 plateau middle on this fold.
    if cfg.zoo.confidence is not None:
        threshold, source = float(cfg.zoo.confidence), "zoo.confidence"
    elif 0 < labels.sum() < len(labels):
        threshold, source = best_threshold(labels, oof_scores)[0], "macro-F1 plateau on the out-of-fold scores"
    else:
        threshold, source = float(np.percentile(oof_scores, 95)), "95th percentile of the out-of-fold scores"
    results["decision"] = {"threshold": threshold, "source": source,
                           "oof": binary_metrics(labels, oof_scores, threshold) if len(labels) else {},
                           "test_ng": int((test_scores >= threshold).sum()), "test_n": len(test_scores)}
    decisions = pd.DataFrame({"image_id": test_rows["image_id"], "score": test_scores,
                              "decision": np.where(test_scores >= threshold, "NG", "OK")})
    # A model with its own label-free OK/NG rule (U-Flow's NFA < epsilon) reports it beside this one.
    own_decisions = getattr(model, "own_decisions", None)
    if own_decisions is not None:
        oof_ng, _ = own_decisions(ImageSet.from_frame(held_out))
        test_ng, test_strength = own_decisions(test_images)
        results["own_decision"] = {"rule": model.own_decision_rule,
                                   "oof": binary_metrics(labels, oof_ng.astype(float), 0.5) if len(labels) else {},
                                   "test_ng": int(test_ng.sum()), "test_n": len(test_ng)}
        decisions["own_decision"] = np.where(test_ng, "NG", "OK")
        decisions["own_decision_strength"] = test_strength
    write_csv(decisions, out / "test_decisions.csv")
    write_json(results, out / "results.json")
    plot_score_histogram(groups, out / "histogram.png",
                         f"{name} fold {fold}: AUROC {results['oof']['auroc']:.3f}")
    if cfg.zoo.gallery_size > 0 and len(test_rows):
        _gallery(model, test_images, test_scores, cfg.zoo.gallery_size, out / "gallery.png",
                 f"{name} fold {fold}: highest-scoring test images")
    if cfg.zoo.save_models:
        model.save(out / "model.pt")
    summary = {
        "model": name, "family": model.family, "fold": fold, "params": model.get_params(),
        "device": model.settings.device, **facts,
        "score_seconds": round(score_seconds, 2),
        "images_per_second": round(n_scored / score_seconds, 2) if score_seconds > 0 else None,
        "n_oof": len(held_out), "n_test": len(test_rows),
        "auroc": results["oof"]["auroc"], "aupr": results["oof"]["aupr"],
        "painted_auroc": results.get("painted", {}).get("auroc"),
        "threshold": threshold, "fit_info": model.fit_info, "config": record,
    }
    write_json(summary, out / SUMMARY_FILE)
    return out


def main(cfg: Config, model: str | None, fold: str, force: bool) -> None:
    names = [model] if model else list(cfg.zoo.models)
    if not names:
        raise ValueError("no zoo model to run: give --model NAME or list names in zoo.models")
    for name in names:
        get_entry(name, "zoo.models" if not model else "--model")  # unknown names stop before any work
    for name in cfg.zoo.params:  # a typo there would silently leave the intended model at its defaults
        get_entry(name, "zoo.params")
    for name in cfg.zoo.image_sizes:  # the same for a canvas
        get_entry(name, "zoo.image_sizes")
    configure_threads(cfg.train.threads)
    folds_to_run = parse_fold_arg(fold, cfg.folds.n_splits)
    index = load_index(cfg)
    folds = training_folds(cfg, index, pseudo=fits_pseudo_labels(cfg))
    check_stage_inputs(cfg, index)
    jobs = [(name, k) for name in names for k in folds_to_run]
    for name, k in tqdm(jobs, desc="zoo", unit="fold", disable=len(jobs) < 2):
        out = run_fold(cfg, name, k, index, folds, force)
        summary_path = out / SUMMARY_FILE
        if summary_path.exists():
            s = read_json(summary_path)
            auroc = s.get("auroc")  # null when the fold's labels are one class (strict JSON has no NaN)
            print(f"{name} fold {k}: AUROC {float('nan') if auroc is None else auroc:.4f}  "
                  f"fit {s.get('fit_seconds')} s  {s.get('images_per_second')} img/s  -> {out}")
