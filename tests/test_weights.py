"""Local weights for `model.pretrained`: files and folders, safetensors and torch state dicts, the
pretraining output format, and the errors for a missing path or the wrong architecture."""
from __future__ import annotations

import pytest
import timm
import torch

from competition.artifacts import save_checkpoint
from competition.classifier.model import build_classifier
from competition.config import ModelConfig
from competition.weights import WeightsError, write_state_dict

NAME = "test_efficientnet"


def _donor(num_classes: int = 1, seed: int = 3, name: str = NAME) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes)


def _assert_backbone_equal(model, donor, with_head: bool):
    donor_state = donor.state_dict()
    for key, value in model.backbone.state_dict().items():
        if key.startswith("classifier.") and not with_head:
            continue
        assert torch.equal(value, donor_state[key]), key


@pytest.mark.parametrize("kind", ["safetensors", "pth", "folder-safetensors", "folder-pth"])
def test_local_weights_load_from_files_and_folders(tmp_path, kind):
    donor = _donor()
    if kind.endswith("safetensors"):
        file = write_state_dict(donor.state_dict(), tmp_path / f"{NAME}.safetensors")
    else:
        file = tmp_path / f"{NAME}.pth"
        torch.save(donor.state_dict(), file)
    pretrained = str(tmp_path) if kind.startswith("folder") else str(file)
    torch.manual_seed(99)
    model = build_classifier(ModelConfig(name=NAME, pretrained=pretrained, image_size=32))
    _assert_backbone_equal(model, donor, with_head=True)  # a one-logit head in the file is kept


def test_pretraining_output_without_head_loads_and_head_starts_near_zero(tmp_path):
    donor = _donor(num_classes=0)  # what `competition pretrain` writes: the backbone, no classifier
    path = write_state_dict(donor.state_dict(), tmp_path / "pretrain" / f"{NAME}.safetensors")
    model = build_classifier(ModelConfig(name=NAME, pretrained=str(path.parent), image_size=32))
    _assert_backbone_equal(model, donor, with_head=False)
    head = model.backbone.get_classifier()
    assert head.weight.abs().max() < 0.1 and not head.bias.any()


def test_checkpoint_wrappers_and_other_head_sizes_load(tmp_path):
    donor = _donor(num_classes=10)
    wrapped = {f"backbone.{k}": v for k, v in donor.state_dict().items()}  # as in the classifier's best.pt
    save_checkpoint({"model": wrapped}, tmp_path / "best.pt")
    model = build_classifier(ModelConfig(name=NAME, pretrained=str(tmp_path / "best.pt"), image_size=32))
    _assert_backbone_equal(model, donor, with_head=False)
    assert model.backbone.get_classifier().out_features == 1


def test_missing_path_says_what_was_expected(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_classifier(ModelConfig(name=NAME, pretrained=str(tmp_path / "nope.safetensors"), image_size=32))
    with pytest.raises(WeightsError, match=rf"holds no {NAME}.*{NAME}\.safetensors"):
        build_classifier(ModelConfig(name=NAME, pretrained=str(tmp_path), image_size=32))


def test_wrong_architecture_is_refused(tmp_path):
    other = _donor(name="test_resnet")
    path = write_state_dict(other.state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(WeightsError, match=rf"do not fit {NAME}.*missing"):
        build_classifier(ModelConfig(name=NAME, pretrained=str(path), image_size=32))
    bigger = _donor(name="efficientnet_b0")
    path = write_state_dict(bigger.state_dict(), tmp_path / "b0.safetensors")
    with pytest.raises(WeightsError, match="wrong shape"):
        build_classifier(ModelConfig(name=NAME, pretrained=str(path), image_size=32))


def test_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / f"{NAME}.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights"):
        build_classifier(ModelConfig(name=NAME, pretrained=str(path), image_size=32))


def test_unknown_model_name_is_named():
    with pytest.raises(ValueError, match="'efficientnet_b99' is not a timm model"):
        build_classifier(ModelConfig(name="efficientnet_b99"))


def test_mask_head_model_loads_backbone_weights(tmp_path):
    from competition.config import MaskHeadConfig

    donor = _donor(num_classes=0)
    path = write_state_dict(donor.state_dict(), tmp_path / f"{NAME}.safetensors")
    model = build_classifier(ModelConfig(name=NAME, pretrained=str(path), image_size=32),
                             MaskHeadConfig(enabled=True))
    _assert_backbone_equal(model, donor, with_head=False)
    assert model.decoder is not None and model(torch.zeros(2, 3, 32, 32)).shape == (2,)
