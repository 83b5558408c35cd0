"""Zoo entries on the experiment's own self-supervised backbone: `patchcore-ssl`, `padim-ssl`, `stfpm-ssl`.

A twin is its base model unchanged but for the backbone and its weights, found by convention:
the backbone `competition pretrain` trained (`pretrain.backbone`, else `model.name`) with the
weights it wrote to `<paths.work>/pretrain/<backbone>.safetensors` (`ZooSettings.ssl_weights`).
So `make pretrain`, then `zoo --model patchcore-ssl`, needs no path typed by hand; without the file
the twin stops and says to run `make pretrain` first. `zoo.params: {patchcore-ssl: {backbone: X}}`
picks another pretrained backbone from the same folder. A twin of any other model that reads
`settings.backbone_weights` is one `register` line below.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from competition.zoo.base import AnomalyModel, ZooSettings
from competition.zoo.padim import PaDiM
from competition.zoo.patchcore import PatchCore
from competition.zoo.registry import register
from competition.zoo.stfpm import STFPM


def pretrained_backbone(settings: ZooSettings, backbone: str | None, family: str) -> tuple[str, Path]:
    """(backbone name, its self-supervised weights file) for a twin; stops if the file is missing."""
    if not settings.ssl_weights:
        raise ValueError(f"{family}: ZooSettings.ssl_weights is not set; build the model from a config "
                         "(ZooSettings.from_config) so it finds <paths.work>/pretrain/<backbone>.safetensors")
    convention = Path(settings.ssl_weights)
    backbone = backbone or convention.stem
    path = convention.with_name(f"{backbone}.safetensors")
    if not path.is_file():
        hint = "" if backbone == convention.stem else f" --set pretrain.backbone={backbone}"
        raise FileNotFoundError(
            f"{family}: no self-supervised weights for {backbone} at {path}; run `make pretrain` first "
            f"(python -m competition pretrain{hint} with this experiment's config)")
    return backbone, path


def ssl_twin(base: type[AnomalyModel], backbone_param: str = "backbone") -> type[AnomalyModel]:
    """`base` with family `<base family>-ssl` whose `backbone_param` and backbone weights come from
    the experiment's pretraining output instead of `zoo.backbone_weights`."""

    def __init__(self, settings: ZooSettings | None = None, **params: Any) -> None:
        backbone, weights = pretrained_backbone(settings or ZooSettings(), params.get(backbone_param), self.family)
        settings = dataclasses.replace(settings or ZooSettings(), backbone_weights=str(weights))
        base.__init__(self, settings, **{**params, backbone_param: backbone})

    name = f"{base.__name__}SSL"
    return type(name, (base,), {"family": f"{base.family}-ssl", "__init__": __init__,
                                "__module__": __name__, "__qualname__": name,
                                "__doc__": f"{base.__name__} on the experiment's self-supervised backbone."})


PatchCoreSSL = ssl_twin(PatchCore)
PaDiMSSL = ssl_twin(PaDiM)
STFPMSSL = ssl_twin(STFPM)

register("patchcore-ssl", PatchCoreSSL,
         "PatchCore (layer2+3, 10% coreset) on the experiment's self-supervised backbone (make pretrain)")
register("padim-ssl", PaDiMSSL,
         "PaDiM (layer1-3, 100 random channels) on the experiment's self-supervised backbone (make pretrain)")
register("stfpm-ssl", STFPMSSL,
         "STFPM with the experiment's self-supervised teacher (make pretrain; CPU-sized: 12 epochs)", epochs=12)
