"""Exported graphs score as eager torch does: the classifier's logits and PatchCore's scores and maps,
at any batch size, and the export record says which models were skipped and why."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from competition import export
from competition.artifacts import read_json, run_dir, save_checkpoint
from competition.data.textures import make_texture
from competition.zoo.api import ImageSet, ZooSettings
from competition.zoo.registry import build_model
from tests.conftest import quick_config

SIZE = 64
TOLERANCE = 1e-4


def textures(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_texture("brushed_metal", (SIZE, SIZE), rng) for _ in range(n)]


def fitted(name: str, padding: str = "zeros", **params) -> object:
    # batch 2 over 3 test images: the graph sees batches of 2 and 1, so its batch axis must be dynamic
    settings = ZooSettings(image_size=SIZE, batch_size=2, progress=False, backbone_padding=padding)
    return build_model(name, settings, params).fit(ImageSet(textures(6, 0)))


def test_classifier_graph_matches_eager_logits(tmp_path):
    from competition.classifier.train import build_model as build_classifier

    cfg = quick_config(tmp_path / "data", tmp_path)
    torch.manual_seed(0)
    model = build_classifier(cfg).eval()  # efficientnet_b0 with its mask head, random init
    assert export.export_classifier(model, cfg.model.image_size, tmp_path, "onnx").difference <= TOLERANCE
    forward = export.classifier_forward(tmp_path, "onnxruntime")
    for batch in (1, 3):
        images = torch.randn(batch, 3, cfg.model.image_size, cfg.model.image_size)
        with torch.no_grad():
            eager = model(images)
        logits = forward(images)
        assert logits.shape == (batch,)
        assert torch.allclose(logits, eager, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("fmt, runtime, padding", [("onnx", "onnxruntime", "zeros"), ("openvino", "openvino", "zeros"),
                                                   ("onnx", "onnxruntime", "reflect")])
def test_patchcore_graph_matches_eager_scores_and_maps(fmt, runtime, padding, tmp_path):
    model = fitted("patchcore-resnet18", padding, coreset_ratio=0.5)
    test = ImageSet(textures(3, 1))
    eager = model.predict(test)
    module_scores, module_maps = model.predict_with(model.scoring_module(), test, True)
    np.testing.assert_array_equal(module_scores, eager.scores)  # one program, eager and exportable
    np.testing.assert_array_equal(module_maps, eager.maps)
    assert export.export_zoo_model(model, tmp_path, fmt).path.is_file()
    graph = export.zoo_with_runtime(model, tmp_path, runtime).predict(test)
    assert np.abs(graph.scores - eager.scores).max() <= TOLERANCE
    assert np.abs(graph.maps - eager.maps).max() <= 1e-3  # maps go through float16 features: an ulp may flip


def test_missing_graph_names_the_export_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="make export FORMAT=openvino"):
        export.classifier_forward(tmp_path, "openvino")


def test_record_marks_unsupported_models_skipped_and_missing_folds_name_their_command(tmp_path, monkeypatch):
    cfg = quick_config(tmp_path / "data", tmp_path, "folds.n_splits=2", "zoo.models=[dfkde-resnet18]")
    with pytest.raises(FileNotFoundError, match="make zoo MODEL=dfkde-resnet18 FOLD=1"):
        export.main(cfg, "onnx")
    for fold in range(2):
        save_checkpoint({"model": {}}, run_dir(cfg.paths.work, cfg.experiment, cfg.model.name, fold) / "best.pt")
        fitted("dfkde-resnet18").save(run_dir(cfg.paths.work, cfg.experiment, "dfkde-resnet18", fold) / "model.pt")
    # the classifier's own graph is the first test's; here it only has to be there
    monkeypatch.setattr(export, "classifier_graph", lambda cfg, job, fmt: export.Exported(job.checkpoint, 0.0))
    assert export.main(cfg, "onnx") == 0
    record = read_json(tmp_path / "runs" / cfg.experiment / "_export" / "onnx.json")
    rows = {(r["model"], r["fold"]): r for r in record["models"]}
    assert rows[("dfkde-resnet18", 1)]["status"] == "skipped"
    assert "scoring module" in rows[("dfkde-resnet18", 1)]["reason"]
    assert rows[(cfg.model.name, 0)]["status"] == "exported"
