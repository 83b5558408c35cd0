"""Self-supervised pretraining: NT-Xent learns, the weights load downstream, runs resume exactly."""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import quick_config
from safetensors.torch import load_file

from competition import pretrain
from competition.artifacts import read_json
from competition.data.images import read_image
from competition.folds import load_index
from competition.stage import ConfigChangedError
from competition.weights import WeightsError, load_local_weights

BACKBONE = "test_resnet"  # timm's tiny test network: BatchNorm, residual stages, features_only
FAST = (f"pretrain.backbone={BACKBONE}", "pretrain.image_size=32", "pretrain.batch_size=8",
        "pretrain.epochs=2", "pretrain.projection_dim=16", "pretrain.projection_hidden_dim=32",
        "pretrain.monitor_images=8", "pretrain.monitor_reference=24", "train.threads=1")


def fast_config(data, work, *overrides):
    return quick_config(data, work, *FAST, *overrides)


@pytest.fixture(scope="module")
def tiny_images(tiny_data):
    index = load_index(quick_config(tiny_data, tiny_data))  # only reads the dataset
    normal = index[(index["split"] == "train") & (index["label"] == 0)]
    return [read_image(p) for p in normal["path"]]


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """One uninterrupted two-epoch run: (config, weights path, stdout)."""
    work = tmp_path_factory.mktemp("pretrain_run")
    cfg = fast_config(tiny_data, work)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        path = pretrain.main(cfg)
    return cfg, path, out.getvalue()


def fixed_batch(cfg, images, painted: bool) -> pretrain.ViewBatch:
    dataset = pretrain.PretrainViews(images, pretrain.view_augmentation(cfg.pretrain),
                                     pretrain.normalisation(cfg.augment.mean, cfg.augment.std), painted=painted)
    items = torch.utils.data.default_collate([dataset[i] for i in range(len(images))])
    views = {k: v for k, v in items.items() if k not in ("index", "painted_valid")}
    extras = {"painted_valid": items["painted_valid"]} if painted else {}
    return pretrain.ViewBatch(views, items["index"], extras)


def losses_over_steps(cfg, batch, steps: int = 8) -> dict[str, list[float]]:
    """Train a fresh net on one fixed batch; each objective's loss at every step."""
    torch.manual_seed(0)
    objectives = pretrain.build_objectives(cfg.pretrain)
    model = pretrain.build_pretrain_net(BACKBONE, cfg.pretrain, objectives)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = {objective.name: [] for _, objective in objectives}
    for _ in range(steps):
        batch._features = None  # a fresh forward each step, as in training
        optimizer.zero_grad()
        parts = {objective.name: objective.loss(batch, model) for _, objective in objectives}
        sum(parts.values()).backward()
        optimizer.step()
        for name, value in parts.items():
            history[name].append(float(value.detach()))
    return history


def test_ntxent_loss_falls_on_tiny_images(tiny_images, tiny_data, tmp_path):
    cfg = fast_config(tiny_data, tmp_path)
    batch = fixed_batch(cfg, tiny_images[:16], painted=False)
    assert set(batch.views) == {"view1", "view2"}
    losses = losses_over_steps(cfg, batch)["ntxent"]
    assert losses[0] < math.log(2 * 16 - 1) + 0.5  # at most about chance, log(2B - 1), at init
    assert losses[-1] < 0.6 * losses[0], losses


def test_painted_objective_learns_beside_ntxent(tiny_images, tiny_data, tmp_path):
    cfg = fast_config(tiny_data, tmp_path, "pretrain.objectives=[{name: ntxent}, {name: painted, weight: 0.5}]")
    batch = fixed_batch(cfg, tiny_images[:16], painted=True)
    assert batch.views["painted"].shape == batch.views["view1"].shape
    history = losses_over_steps(cfg, batch, steps=16)
    assert history["ntxent"][-1] < 0.8 * history["ntxent"][0], history
    assert history["painted"][-1] < 0.75 * history["painted"][0], history


def test_views_no_painter_can_change_are_skipped_by_the_painted_objective(tiny_images, tiny_data, tmp_path,
                                                                         monkeypatch):
    import competition.data.anomalies as anomalies

    def nothing_visible(image, rng, **options):
        raise RuntimeError("could not cut-paste a visible patch")

    monkeypatch.setattr(anomalies, "random_anomaly", nothing_visible)
    cfg = fast_config(tiny_data, tmp_path, "pretrain.objectives=[{name: painted}]")
    batch = fixed_batch(cfg, tiny_images[:4], painted=True)
    assert not batch.extras["painted_valid"].any()
    [(_, objective)] = pretrain.build_objectives(cfg.pretrain)
    model = pretrain.build_pretrain_net(BACKBONE, cfg.pretrain, [(1.0, objective)])
    logits = []
    model.heads["painted"].register_forward_hook(lambda module, inputs, output: logits.append(output))
    loss = objective.loss(batch, model)
    assert torch.isfinite(loss) and logits[0].shape == (4, 1)  # the 4 clean views only


def test_views_are_seeded_by_epoch_and_image(tiny_images, tiny_data, tmp_path):
    cfg = fast_config(tiny_data, tmp_path)
    dataset = pretrain.PretrainViews(tiny_images[:4], pretrain.view_augmentation(cfg.pretrain),
                                     pretrain.normalisation(cfg.augment.mean, cfg.augment.std), painted=True)
    dataset.set_epoch_seed(5)
    first = [dataset[i] for i in (3, 0)]
    assert not torch.equal(first[0]["view1"], first[0]["view2"])
    again = dataset[3]  # same epoch seed and image: the same views, whatever was drawn in between
    assert all(torch.equal(first[0][k], again[k]) for k in ("view1", "view2", "painted"))
    dataset.set_epoch_seed(6)
    assert not torch.equal(dataset[3]["view1"], first[0]["view1"])


def test_run_writes_weights_records_and_prints_path_last(finished_run):
    cfg, path, stdout = finished_run
    assert path == pretrain.pretrained_weights_path(cfg.paths.work, BACKBONE)
    assert path.is_file()
    assert stdout.strip().splitlines()[-1] == str(path)
    log_dir = path.parent / BACKBONE
    for name in ("history.csv", "curves.png", "config.yaml", "summary.json", "last.pt"):
        assert (log_dir / name).is_file(), name
    history = pd.read_csv(log_dir / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["monitor_auroc"].between(0, 1).all()  # finite AUROC before and after each epoch
    assert history["train_loss"].iloc[1:].notna().all()
    summary = read_json(log_dir / "summary.json")
    assert summary["finished"] and summary["epochs_done"] == 2
    assert summary["images"] == {"train_normal": 60, "train_defect": 12, "test": 40}


def test_weights_load_into_classifier_and_feature_extractor(finished_run):
    cfg, path, _ = finished_run
    saved = load_file(str(path))
    classifier = timm.create_model(BACKBONE, num_classes=1)
    # the folder works as well as the file: <paths.work>/pretrain holds <backbone>.safetensors
    assert load_local_weights(classifier, path.parent, BACKBONE) == path
    state = classifier.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    # `model.pretrained: ssl` in the same experiment's config resolves to that folder
    same_experiment = fast_config(cfg.paths.data, Path(cfg.paths.work), f"paths.work={cfg.paths.work}",
                                  "model.pretrained=ssl")
    assert load_local_weights(timm.create_model(BACKBONE, num_classes=1), same_experiment.model.pretrained,
                              BACKBONE) == path
    extractor = timm.create_model(BACKBONE, features_only=True, out_indices=(1, 2))
    load_local_weights(extractor, path, BACKBONE)
    extractor_state = extractor.state_dict()
    assert all(torch.equal(extractor_state[k], saved[k]) for k in extractor_state if k in saved)
    with torch.no_grad():
        maps = extractor(torch.zeros(1, 3, 32, 32))
    assert len(maps) == 2


def test_wrong_architecture_is_refused(finished_run):
    _, path, _ = finished_run
    other = timm.create_model("test_efficientnet", num_classes=1)
    with pytest.raises(WeightsError, match="do not fit test_efficientnet"):
        load_local_weights(other, path, "test_efficientnet")


def test_init_weights_of_another_architecture_are_refused(finished_run, tiny_data, tmp_path):
    _, path, _ = finished_run
    cfg = fast_config(tiny_data, tmp_path, "pretrain.backbone=test_efficientnet", f"pretrain.init_weights={path}")
    with pytest.raises(WeightsError, match="do not fit test_efficientnet"):
        pretrain.main(cfg)


def _killed_in_second_epoch(monkeypatch) -> None:
    """The monitor's third call (before training, after epoch 1, after epoch 2) raises: the run dies
    after training its second epoch and before that epoch's last.pt."""
    real_monitor = pretrain.monitor_auroc
    calls = []

    def monitor(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_monitor(*args, **kwargs)

    monkeypatch.setattr(pretrain, "monitor_auroc", monitor)


def test_interrupted_run_resumes_to_the_same_weights(finished_run, tiny_data, tmp_path, monkeypatch, capsys):
    _, reference_path, _ = finished_run
    cfg = fast_config(tiny_data, tmp_path)
    _killed_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(cfg)
    path = pretrain.pretrained_weights_path(cfg.paths.work, BACKBONE)
    assert not path.exists() and (path.parent / BACKBONE / "last.pt").exists()

    monkeypatch.undo()
    assert pretrain.main(cfg) == path
    assert "resuming from" in capsys.readouterr().out
    resumed, reference = load_file(str(path)), load_file(str(reference_path))
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)
    history = pd.read_csv(path.parent / BACKBONE / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]


def test_a_resumable_run_with_changed_settings_is_refused(tiny_data, tmp_path, monkeypatch):
    cfg = fast_config(tiny_data, tmp_path)
    _killed_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(cfg)
    monkeypatch.undo()
    changed = fast_config(tiny_data, tmp_path, "pretrain.crop_scale=[0.5, 1.0]")
    with pytest.raises(ConfigChangedError, match=r"last.pt was written with another config "
                                                 r"\(pretrain.crop_scale: \[0.2, 1.0\] -> \[0.5, 1.0\]\)"):
        pretrain.main(changed)


def test_finished_run_is_kept_changed_settings_stop_and_force_restarts(finished_run, tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    cfg = fast_config(tiny_data, tmp_path, "pretrain.epochs=1")
    path = pretrain.main(cfg)
    capsys.readouterr()

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(pretrain, "build_pretrain_net", must_not_train)
    assert pretrain.main(cfg) == path
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    # speed-only keys are neutral
    assert pretrain.main(fast_config(tiny_data, tmp_path, "pretrain.epochs=1", "train.threads=2",
                                     "train.num_workers=2", "device=cpu")) == path

    changed = fast_config(tiny_data, tmp_path, "pretrain.epochs=1", "pretrain.temperature=0.5")
    with pytest.raises(ConfigChangedError, match=r"pretrain.temperature: 0\.2 -> 0\.5\)\. Pass --force to pretrain "
                                                 r"again, or use another paths.work"):
        pretrain.main(changed)
    with pytest.raises(AssertionError, match="trained again"):
        pretrain.main(changed, force=True)
    assert not path.exists()  # --force removed the old weights before training


def test_monitor_is_a_finite_auroc_of_clean_versus_painted(tiny_images, tiny_data, tmp_path):
    cfg = fast_config(tiny_data, tmp_path)
    monitor = pretrain.build_monitor_set(tiny_images, cfg.pretrain, cfg.augment.mean, cfg.augment.std, seed=3)
    assert len(monitor) == 8 and len(monitor.reference) == 24
    assert not torch.equal(monitor.clean, monitor.painted)
    again = pretrain.build_monitor_set(tiny_images, cfg.pretrain, cfg.augment.mean, cfg.augment.std, seed=3)
    assert torch.equal(monitor.painted, again.painted)  # fixed seed: the same painted defects every epoch
    torch.manual_seed(0)
    backbone = timm.create_model(BACKBONE, num_classes=0)
    value = pretrain.monitor_auroc(backbone, monitor, torch.device("cpu"))
    assert 0.0 <= value <= 1.0


def test_knn_distance_is_the_mean_over_k_nearest():
    reference = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    queries = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    np.testing.assert_allclose(pretrain.knn_distance(reference, queries, k=1), [0.0, 1.0])
    np.testing.assert_allclose(pretrain.knn_distance(reference, queries, k=2), [0.5, 2.0])


def test_config_errors_name_the_entry(tiny_data, tmp_path):
    cfg = fast_config(tiny_data, tmp_path, "pretrain.objectives=[{name: byol}]")
    with pytest.raises(ValueError, match=r"pretrain.objectives\[0\]: unknown objective 'byol'; known: ntxent"):
        pretrain.build_objectives(cfg.pretrain)
    cfg = fast_config(tiny_data, tmp_path, "pretrain.augment=[{name: Flipz}]")
    with pytest.raises(ValueError, match=r"pretrain.augment\[0\]: albumentations has no transform named 'Flipz'"):
        pretrain.view_augmentation(cfg.pretrain)
    cfg = fast_config(tiny_data, tmp_path, "pretrain.objectives=[{name: painted}, {name: painted}]")
    with pytest.raises(ValueError, match=r"pretrain.objectives\[1\]: painted is listed twice"):
        pretrain.build_objectives(cfg.pretrain)


def test_held_images_shrink_to_the_hold_size_only():
    image = np.zeros((300, 600, 3), np.uint8)
    assert pretrain.hold_image(image, 100).shape == (100, 200, 3)
    assert pretrain.hold_image(image, 400) is image


def test_a_vision_transformer_pretrains_at_any_size_and_its_weights_load_into_dinomaly(tmp_path):
    """ViTs are built with position embeddings resampled to each crop's patch grid (a side that is no
    multiple of the patch padded), which leaves the weights' shapes as timm's: the file fits Dinomaly's
    encoder through `backbone_weights: ssl`."""
    from competition.weights import write_state_dict
    from competition.zoo.api import ZooSettings
    from competition.zoo.registry import build_model

    name = "vit_small_patch14_reg4_dinov2"
    torch.manual_seed(0)
    backbone = pretrain.pretrain_backbone(name)
    with torch.no_grad():
        assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 384)  # 32 px: 3 x 3 patches once padded
        assert backbone(torch.zeros(1, 3, 56, 56)).shape == (1, 384)
    path = pretrain.pretrained_weights_path(tmp_path, name)
    path.parent.mkdir(parents=True)
    write_state_dict(backbone.state_dict(), path)
    model = build_model("dinomaly-ssl", ZooSettings(image_size=56, work_dir=str(tmp_path)))
    assert model.settings.backbone_weights == str(path)
    encoder = model.build_model().encoder
    saved = load_file(str(path))
    for key, tensor in encoder.state_dict().items():  # the blocks Dinomaly runs, all loaded
        torch.testing.assert_close(tensor, saved[key], rtol=0, atol=0, msg=key)


def test_other_backbones_are_built_as_before():
    torch.manual_seed(3)
    built = pretrain.pretrain_backbone(BACKBONE)
    torch.manual_seed(3)
    plain = timm.create_model(BACKBONE, pretrained=False, num_classes=0)
    assert built.state_dict().keys() == plain.state_dict().keys()
    for key, tensor in plain.state_dict().items():
        assert torch.equal(built.state_dict()[key], tensor), key
