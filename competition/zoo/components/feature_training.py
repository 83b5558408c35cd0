"""Small heads trained by gradient descent on frozen backbone features (FRE's tied autoencoder, CFA's
patch descriptor): the features are extracted once (through the feature cache), then the head trains on
them with the project's one engine (`competition.training.fit`), in a (seed, epoch)-seeded batch order.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from competition.training import EngineConfig, FitResult, fit
from competition.zoo.api import AnomalyModel
from competition.zoo.trained import fit_record


class SizedOnLoad(nn.Module):
    """A module whose parameters take their shape when fitted (it depends on the features): loading a
    state_dict first gives each of its own parameters the saved shape, as `api.load_fitted_state` does
    for buffers registered empty."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, param in list(self._parameters.items()):
            saved = state_dict.get(prefix + name)
            if param is not None and saved is not None and saved.shape != param.shape:
                self._parameters[name] = nn.Parameter(torch.empty(saved.shape, dtype=param.dtype, device=param.device),
                                                      requires_grad=param.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def fit_on_rows(owner: AnomalyModel, network: nn.Module, optimizer: torch.optim.Optimizer, count: int,
                batch_size: int, epochs: int, step: Callable[[Tensor], Tensor | dict[str, Tensor]]) -> FitResult:
    """Train `network` for `epochs` over `count` fitted samples: `step(indices)` returns the loss of the
    samples at `indices` (a batch of at most `batch_size`, every sample once per epoch, in an order
    seeded by the settings' seed and the epoch). With `settings.run_dir` the engine keeps last.pt there
    and resumes from it. One progress bar over the epochs (`settings.progress`)."""
    settings = owner.settings
    batch_size = max(1, min(int(batch_size), count))

    def epoch_batches(epoch: int) -> list[Tensor]:
        generator = torch.Generator().manual_seed(settings.seed * 100003 + epoch)
        order = torch.randperm(count, generator=generator)
        return [order[start:start + batch_size] for start in range(0, count, batch_size)]

    bar = tqdm(total=int(epochs), desc=f"{owner.family} fit", unit="epoch", disable=not settings.progress, leave=False)

    def after_epoch(history: list[dict]) -> None:
        bar.update(len(history) - bar.n)
        if "train_loss" in history[-1]:
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.4g}")

    # amp (CUDA) only: a head on feature rows is small matrices, whose steps bfloat16 autocast makes slower on
    # the CPU (FRE's autoencoder, in a throwaway timing), so `zoo.cpu_amp` speeds the backbone's extraction, not this
    engine = EngineConfig(epochs=int(epochs), name=owner.family, amp=settings.amp, out=settings.run_dir,
                          record=fit_record(owner), progress=False)
    try:
        return fit(network, optimizer, epoch_batches, step, engine, device=owner.device, after_epoch=after_epoch)
    finally:
        bar.close()
