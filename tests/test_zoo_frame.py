"""The zoo's API and registry, image container, feature cache, thresholds, and the per-fold runner."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from competition.config import ZooConfig
from competition.zoo.api import ImageSet, ZooSettings
from competition.zoo.components.features import (
    FeatureExtractor,
    folder_bytes,
    prune_feature_cache,
    shared_extractor,
)
from competition.zoo.evaluation import (
    THRESHOLDS,
    evaluate_scores,
    threshold_f1_grid,
    threshold_f1_percentile,
    threshold_normal_percentile,
    threshold_youden,
)
from competition.zoo.registry import build_model, entries, load_model, register, resolved_params, temporary_entries


def _arrays(n: int, size: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 5, 3), dtype=np.uint8) for _ in range(n)]


# ---------------------------------------------------------------- registry

def test_every_entry_builds_and_every_model_module_registers():
    """Discovery needs no exclusion list: each module of competition.zoo.models registers entries, and
    every entry's hyperparameters pass its params dataclass (ranges in __post_init__ included)."""
    import pkgutil

    import competition.zoo.models as models

    known = entries()
    modules = {f"competition.zoo.models.{m.name}" for m in pkgutil.iter_modules(models.__path__)}
    assert modules == {entry.module for entry in known.values()}
    for name, entry in known.items():
        if entry.params.get("backbone_weights") == "ssl":
            continue  # needs make pretrain's output: tests/test_zoo_ssl.py
        model = build_model(name, ZooSettings())
        assert model.model is None and not model.fitted_  # nothing heavy happens before fit


def test_cli_list_prints_name_then_description(capsys):
    from competition.cli import main

    assert main(["zoo", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split("\t")[0] for line in lines]
    assert "patchcore-resnet18" in names and len(lines) == len(entries())
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)


def test_register_and_params_are_checked():
    from competition.zoo.models.patchcore import PatchCore

    with temporary_entries():
        with pytest.raises(ValueError, match="must start with"):
            register("core-resnet18", PatchCore, "wrong prefix")
        with pytest.raises(ValueError, match=r"zoo entry 'patchcore-bad' \(patchcore\): unknown parameter\(s\) "
                                             r"coreset_raito; known: backbone, backbone_weights, blur_sigma"):
            register("patchcore-bad", PatchCore, "bad key", coreset_raito=0.1)
    assert "patchcore-bad" not in entries()
    with pytest.raises(ValueError, match="zoo.params.patchcore-resnet18: unknown key"):
        resolved_params("patchcore-resnet18", {"not_a_key": 1})
    with pytest.raises(ValueError, match=r"zoo.params.patchcore-resnet18.coreset_ratio: expected a number, got 'x'"):
        resolved_params("patchcore-resnet18", {"coreset_ratio": "x"})
    with pytest.raises(ValueError, match=r"zoo.params.patchcore-resnet18.search: expected one of 'torch', 'faiss'"):
        build_model("patchcore-resnet18", ZooSettings(), {"search": "annoy"})
    with pytest.raises(ValueError, match=r"coreset_ratio must be in \(0, 1\]"):
        resolved_params("patchcore-resnet18", {"coreset_ratio": 1.5})
    params = resolved_params("patchcore-resnet18", {"coreset_ratio": 0.05, "layers": [1, 2]})
    assert params.coreset_ratio == 0.05 and params.layers == (1, 2)  # YAML lists become the declared tuples
    with pytest.raises(ValueError, match="unknown zoo model"):
        build_model("no-such-model", ZooSettings())


def test_config_params_override_reaches_the_model(tiny_cfg):
    from competition.config import load_config
    from competition.zoo.registry import build_from_config

    cfg = load_config(None, ["zoo.params={padim-resnet18: {n_channels: 7}}", "zoo.mean=[0.5, 0.5, 0.5]",
                             "augment.std=[0.1, 0.1, 0.1]", "train.num_workers=3"])
    model = build_from_config("padim-resnet18", cfg)
    assert model.params.n_channels == 7
    # the zoo's input follows zoo.*, never the classifier's augment.* / train.* keys
    assert model.settings.mean == (0.5, 0.5, 0.5) and model.settings.std == (0.229, 0.224, 0.225)
    assert model.settings.num_workers == 0


# ---------------------------------------------------------------- images and features

def test_image_set_reads_arrays_and_files_with_content_keys(tmp_path):
    from PIL import Image

    arrays = _arrays(2)
    Image.fromarray(arrays[0]).save(tmp_path / "a.png")
    Image.fromarray(arrays[0]).save(tmp_path / "copy.png")
    images = ImageSet([tmp_path / "a.png", tmp_path / "copy.png", arrays[1]], ["a", "copy", "b"])
    assert np.array_equal(images.read(0), arrays[0])
    assert images.content_key(0) == images.content_key(1) != images.content_key(2)
    view = images.tensors(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    index, tensor = view[2]
    assert index == 2 and tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert images.subset([2]).ids == ["b"]


def test_feature_cache_hits_across_models_over_one_backbone(tmp_path):
    settings = ZooSettings(image_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"), progress=False)
    images = ImageSet(_arrays(6))
    first = shared_extractor("resnet18", [2, 3], settings)  # PatchCore's layers
    maps = first.extract_all(images)
    assert (first.extracted, first.cache_hits) == (6, 0)
    second = shared_extractor("resnet18", [1, 2, 3], settings)  # PaDiM's layers: the same cache
    again = second.extract_all(images)
    assert second.key == first.key and (second.extracted, second.cache_hits) == (0, 6)
    assert all(torch.equal(a, b) for a, b in zip(maps, again))
    uncached = FeatureExtractor("resnet18", first.layers, ZooSettings(image_size=32, progress=False))
    assert all(torch.equal(a, b) for a, b in zip(maps, uncached.extract_all(images)))
    # a different image size is another key; a fitted model leaves nothing new to extract
    other = shared_extractor("resnet18", [2, 3], ZooSettings(image_size=64, cache_dir=settings.cache_dir,
                                                               progress=False))
    assert other.key != first.key
    model = build_model("padim-resnet18", settings).fit(images)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    build_model("patchcore-resnet18", settings).fit(images)
    build_model("dfkde-resnet18", settings).fit(images)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == files
    assert model.score_samples(images).shape == (6,)


def test_cache_key_follows_the_weights(tmp_path):
    import timm

    from competition.weights import write_state_dict

    settings = ZooSettings(image_size=32, progress=False, cache_dir=str(tmp_path / "cache"))
    net = timm.create_model("resnet18", pretrained=False)
    write_state_dict(net.state_dict(), tmp_path / "resnet18.safetensors")
    with_file = ZooSettings(**{**settings.__dict__, "backbone_weights": str(tmp_path)})
    a = FeatureExtractor("resnet18", [2], settings)
    b = FeatureExtractor("resnet18", [2], with_file)
    assert a.key != b.key and "file sha1" in b.description["weights"]
    seeded = FeatureExtractor("resnet18", [2], ZooSettings(image_size=32, seed=1, progress=False))
    assert seeded.key != a.key



def test_feature_cache_keeps_its_size_limit_by_deleting_the_least_recently_used_folder(tmp_path):
    """Three keys (random inits of three seeds) over a limit of 2.5 folders: writing the third deletes
    the one used longest ago (A was read again after B), never the one in use; features read back or
    extracted again are the same."""
    images = ImageSet(_arrays(6))

    def extractor(seed: int, limit_gb: float = 0.0) -> FeatureExtractor:
        return FeatureExtractor("resnet18", [1, 2, 3, 4], ZooSettings(
            image_size=32, batch_size=2, seed=seed, cache_dir=str(tmp_path / "cache"), cache_max_gb=limit_gb,
            progress=False))

    a = extractor(0)
    maps_a = a.extract_all(images)
    one_folder = folder_bytes(a.cache_dir)
    assert one_folder > 0
    limit_gb = 2.5 * one_folder / 1024 ** 3
    b = extractor(1, limit_gb)
    b.extract_all(images)
    again = extractor(0, limit_gb)
    assert all(torch.equal(x, y) for x, y in zip(maps_a, again.extract_all(images)))
    assert (again.extracted, again.cache_hits) == (0, 6)  # A is now the more recently used
    c = extractor(2, limit_gb)
    c.extract_all(images)
    assert a.cache_dir.exists() and c.cache_dir.exists() and not b.cache_dir.exists()
    assert folder_bytes(tmp_path / "cache") <= limit_gb * 1024 ** 3
    # a limit below one folder still keeps the folder being written
    tiny = extractor(3, 1e-9)
    tiny.extract_all(images)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [tiny.cache_dir.name]
    with pytest.raises(ValueError, match="cache_max_gb"):
        ZooConfig(cache_max_gb=-1)


def test_features_deleted_while_being_read_are_extracted_again(tmp_path):
    """Another process's pruning may delete a folder between the look-up and the read."""
    images = ImageSet(_arrays(6))
    settings = ZooSettings(image_size=32, batch_size=2, cache_dir=str(tmp_path / "cache"), progress=False)
    expected = FeatureExtractor("resnet18", [1, 2, 3, 4], settings).extract_all(images)
    reader = FeatureExtractor("resnet18", [1, 2, 3, 4], settings)
    batches = reader.extract(images)
    first = [next(batches)]
    prune_feature_cache(tmp_path / "cache", None, 0)  # every folder goes
    got = {}
    for batch_idx, maps in first + list(batches):
        for row, i in enumerate(batch_idx):
            got[i] = [m[row] for m in maps]
    assert (reader.cache_hits, reader.extracted) == (2, 4)
    assert all(torch.equal(got[i][k], expected[k][i]) for i in range(6) for k in range(4))


# ---------------------------------------------------------------- thresholds

def test_threshold_rules_on_known_scores():
    labels = np.array([0] * 8 + [1] * 4)
    scores = np.array([0.1, 0.2, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.7, 0.8, 0.9, 1.0])
    for rule in (threshold_f1_percentile, threshold_f1_grid, threshold_youden):
        t = rule(labels, scores)
        assert 0.5 < t <= 0.7, rule.__name__  # every rule separates these perfectly
    assert threshold_normal_percentile(labels, scores) == pytest.approx(np.percentile(scores[:8], 95))
    result = evaluate_scores(labels, scores)
    assert result["auroc"] == 1.0 and set(result["thresholds"]) == set(THRESHOLDS)
    for name in ("f1_percentile", "f1_grid", "youden"):
        m = result["thresholds"][name]
        assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 0, 0, 8) and m["f1"] == 1.0
    p95 = result["thresholds"]["normal_p95"]
    assert p95["fp"] == 1 and p95["tp"] == 4  # the 95th percentile of 8 normals lets one through
    # overlapping scores: Youden picks the ROC corner with the largest TPR - FPR
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    scores = np.arange(7.0)
    assert threshold_youden(labels, scores) == 3.0  # TPR 1, FPR 1/4: J = 0.75 beats 5.0 (J = 2/3)
    assert evaluate_scores([0, 0], [0.1, 0.2])["thresholds"] == {}


# ---------------------------------------------------------------- the runner

def _read(path):
    return pd.read_csv(path, dtype={"image_id": str})


def test_runner_writes_every_file_and_never_fits_on_the_held_out_fold(tiny_cfg, capsys):
    from competition.config import load_config
    from competition.folds import load_index, read_folds
    from competition.zoo.runner import main

    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "paths.data": tiny_cfg.paths.data, "paths.work": tiny_cfg.paths.work, "experiment": "zoo_test",
        "folds.n_splits": tiny_cfg.folds.n_splits, "zoo.image_size": 48, "zoo.batch_size": 16,
        "zoo.min_real_defects": 100, "zoo.painted_per_fold": 6, "zoo.gallery_size": 3,
        "zoo.params": "{patchcore-resnet18: {coreset_ratio: 0.2}}", "train.threads": 1}.items()])
    main(cfg, model="patchcore-resnet18", fold="1", force=False)
    index = load_index(cfg)
    folds = read_folds(cfg, index)
    out = tiny_cfg.paths.work + "/zoo_test/patchcore-resnet18/fold1"
    from pathlib import Path

    out = Path(out)
    for name in ("oof.csv", "test.csv", "config.yaml", "summary.json", "results.json", "histogram.png",
                 "gallery.png", "fit_images.csv", "test_decisions.csv", "model.pt"):
        assert (out / name).exists(), name
    oof, test = _read(out / "oof.csv"), _read(out / "test.csv")
    assert list(oof.columns) == ["image_id", "label", "score"] and list(test.columns) == ["image_id", "score"]
    held = folds[folds["fold"] == 1]
    assert sorted(oof["image_id"]) == sorted(held["image_id"])
    assert list(test["image_id"]) == list(index[index["split"] == "test"]["image_id"])
    assert np.isfinite(oof["score"]).all() and np.isfinite(test["score"]).all()
    fitted = set(_read(out / "fit_images.csv")["image_id"])
    assert fitted == set(folds[(folds["fold"] != 1) & (folds["label"] == 0)]["image_id"])
    assert not fitted & set(held["image_id"])
    results = json.loads((out / "results.json").read_text())
    assert set(results["oof"]["thresholds"]) == set(THRESHOLDS)
    assert results["painted"]["n_defect"] == 6 and 0.0 <= results["painted"]["auroc"] <= 1.0
    assert results["decision"]["source"].startswith("macro-F1")
    decisions = _read(out / "test_decisions.csv")
    assert set(decisions["decision"]) <= {"OK", "NG"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["coreset_ratio"] == 0.2 and summary["n_fit"] == len(fitted)
    assert "AUROC" in capsys.readouterr().out
    reloaded = load_model(out / "model.pt")
    assert reloaded.fit_info["memory_bank"] == summary["fit_info"]["memory_bank"]

    # a finished fold is skipped, --force refits it; a fixed confidence becomes the OK/NG rule
    stamp = (out / "summary.json").stat().st_mtime_ns
    main(cfg, model="patchcore-resnet18", fold="1", force=False)
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    cfg.zoo.confidence = 0.5
    main(cfg, model="patchcore-resnet18", fold="1", force=True)
    assert (out / "summary.json").stat().st_mtime_ns != stamp
    assert json.loads((out / "results.json").read_text())["decision"]["threshold"] == 0.5


def test_runner_validation_set_comes_from_training_folds_only(tiny_cfg, monkeypatch):
    """A model that asks for validation gets held-out training normals, painted copies and training defects."""
    from competition.folds import read_folds
    from competition.zoo import runner
    from competition.zoo.models.padim import PaDiM

    seen = {}

    class Watching(PaDiM):
        family = "padim-watching-test"
        uses_validation = True

        def _fit(self, images, validation):
            seen["fit"], seen["validation"] = list(images.ids), validation
            super()._fit(images, None)

    def build(name, cfg, run_dir=None):
        return Watching(ZooSettings(image_size=32, batch_size=16, progress=False))

    monkeypatch.setattr(runner, "build_from_config", build)
    folds = read_folds(tiny_cfg)
    out = tiny_cfg.paths.work
    from pathlib import Path

    runner.fit_fold(tiny_cfg, "padim-resnet18", 0, folds, Path(out) / "watch")
    held = set(folds[folds["fold"] == 0]["image_id"])
    validation = seen["validation"]
    real = [i for i, k in zip(validation.images.ids, validation.kinds) if k == "real"]
    normal = [i for i, k in zip(validation.images.ids, validation.kinds) if k == "normal"]
    assert real and normal and "painted" in validation.kinds
    assert not (set(seen["fit"]) | set(real) | set(normal)) & held
    assert not set(seen["fit"]) & set(normal)
    assert set(real) == set(folds[(folds["fold"] != 0) & (folds["label"] == 1)]["image_id"])


def test_an_entry_that_only_scores_otherwise_takes_its_twins_fitted_fold(tiny_data, tmp_path):
    """padim-resnet18-layer1-bg differs from padim-resnet18-layer1 in score_background alone (`scoring_params`):
    beside it in zoo.models, the runner loads that entry's fitted fold instead of fitting again, and the scores
    are exactly those of a fit of its own; a fit with other params is refused."""
    import shutil

    from conftest import config_with_folds

    from competition.artifacts import load_checkpoint, read_json, run_dir, save_checkpoint
    from competition.zoo.registry import build_from_config
    from competition.zoo.runner import main

    base_name, bg_name = "padim-resnet18-layer1", "padim-resnet18-layer1-bg"
    common = ("train.threads=1", "zoo.gallery_size=0", "zoo.backbone_init=healthy")
    pair = config_with_folds(tiny_data, tmp_path / "pair", *common, f"zoo.models=[{base_name},{bg_name}]")
    main(pair, model=None, fold="0", force=False)
    base, bg = (run_dir(pair.paths.work, pair.experiment, name, 0) for name in (base_name, bg_name))
    summary = read_json(bg / "summary.json")
    assert summary["fitted_by"] == str(base) and summary["fit_seconds"] == 0.0
    assert read_json(base / "summary.json")["fit_seconds"] > 0 and "fitted_by" not in read_json(base / "summary.json")
    assert (bg / "fit_images.csv").read_text() == (base / "fit_images.csv").read_text()

    alone = config_with_folds(tiny_data, tmp_path / "alone", *common, f"zoo.models=[{bg_name}]")
    main(alone, model=None, fold="0", force=False)
    own = run_dir(alone.paths.work, alone.experiment, bg_name, 0)
    assert "fitted_by" not in read_json(own / "summary.json")  # no twin in its zoo.models: it fits
    for name in ("oof.csv", "test.csv"):
        pd.testing.assert_frame_equal(_read(bg / name), _read(own / name))
    assert not np.allclose(_read(bg / "test.csv")["score"], _read(base / "test.csv")["score"])  # scored otherwise

    # a twin fitted under another record (here: another canvas for this entry) is not taken
    other_canvas = config_with_folds(tiny_data, tmp_path / "pair", *common, f"zoo.models=[{base_name},{bg_name}]",
                                     f"zoo.image_sizes={{{bg_name}: 48}}")
    shutil.rmtree(bg)  # not --force, which fits anew anyway
    main(other_canvas, model=bg_name, fold="0", force=False)
    assert "fitted_by" not in read_json(bg / "summary.json")

    other = build_from_config("padim-resnet18", pair)  # layers 1-3: another fit
    with pytest.raises(ValueError, match=r"other params \(layers: \[1\] there, \[1, 2, 3\] here\)"):
        other.adopt_fit(base / "model.pt")
    checkpoint = load_checkpoint(base / "model.pt")
    save_checkpoint({**checkpoint, "family": "fre"}, tmp_path / "fre.pt")
    with pytest.raises(ValueError, match="holds a fre model"):
        build_from_config(bg_name, pair).adopt_fit(tmp_path / "fre.pt")
