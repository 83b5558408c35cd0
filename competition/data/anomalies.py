"""Anomalies of any kind by name: the painters' kinds (competition.data.painters) and the kinds that read
other training images (competition.data.transplant), behind one call for the zoo's validation and
pretraining's painted objective."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from competition.data.painters import DEFECT_KINDS, check_severity, cutpaste, paint_defect, perlin_anomaly
from competition.data.transplant import DefectBank, NormalPool, nsa, transplant


def random_anomaly(image: np.ndarray, rng: np.random.Generator, severity: float | None = None,
                   kinds: Sequence[str] | None = None, bank: DefectBank | None = None,
                   pool: NormalPool | None = None, exclude: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An artificial positive: a uniform pick among `kinds` (see `paint_kind`); None = the defect kinds,
    CutPaste (normal or scar variant, half each) and DRAEM.

    `severity` steers painted defects and DRAEM's opacity (beta = 1 - 0.9 * severity); CutPaste
    has no severity.
    """
    if kinds is not None:
        return paint_kind(image, kinds[int(rng.integers(len(kinds)))], rng, severity, bank, pool, exclude)
    choices = DEFECT_KINDS + ("cutpaste", "perlin")
    choice = choices[int(rng.integers(len(choices)))]
    if choice == "cutpaste":
        return cutpaste(image, rng, scar=bool(rng.random() < 0.5))
    if choice == "perlin":
        beta = None if severity is None else 1.0 - 0.9 * check_severity(severity)
        return perlin_anomaly(image, rng, beta=beta)
    return paint_defect(image, choice, rng, severity)


def paint_kind(image: np.ndarray, kind: str, rng: np.random.Generator, severity: float | None = None,
               bank: DefectBank | None = None, pool: NormalPool | None = None,
               exclude: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly of a named kind (`config.POSITIVE_KINDS`): a defect kind, cutpaste, cutpaste_scar, perlin,
    or the kinds that read other training images: transplant (a real defect of `bank`) and nsa
    (patches of `pool`'s normals other than `exclude`; see `competition.data.transplant`)."""
    if kind in ("cutpaste", "cutpaste_scar"):
        return cutpaste(image, rng, scar=kind == "cutpaste_scar")
    if kind == "perlin":
        return perlin_anomaly(image, rng, beta=None if severity is None else 1.0 - 0.9 * check_severity(severity))
    if kind == "transplant":
        return transplant(image, rng, bank, severity)
    if kind == "nsa":
        return nsa(image, rng, pool, exclude)
    return paint_defect(image, kind, rng, severity)
