"""Principal component analysis of feature rows by SVD (DFM's and DFKDE's reduction)."""
from __future__ import annotations

import torch


def fit_pca(x: torch.Tensor, level: float | int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean (D,), components (D, k), variances (k,)) of rows `x`.

    `level` < 1 keeps that share of the variance, `level` >= 1 that many components.
    """
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    variances = s ** 2 / max(x.shape[0] - 1, 1)
    if float(level) < 1.0:
        share = torch.cumsum(variances, 0) / variances.sum().clamp(min=1e-30)
        k = int(torch.searchsorted(share, torch.tensor(float(level), dtype=share.dtype))) + 1
    else:
        k = int(level)
    k = max(1, min(k, int((variances > 1e-12 * variances.max()).sum())))
    return mean.float(), vh[:k].T.float(), variances[:k].float()
