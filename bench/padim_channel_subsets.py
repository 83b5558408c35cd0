"""PaDiM on one random network with another random channel subset: is it the network or the subset?

Runs `python -m competition zoo ARGS...` with the generator seed of PaDiM's channel subset shifted by OFFSET
(nothing else changes: the backbone, its BatchNorm statistics and the folds stay draw 0's). Compare the result
with `bench/draws.py`. The README's figures (bsdata_tiles, the `configs/real.yaml` run's folds):

    .venv/bin/python bench/padim_channel_subsets.py 1 zoo --model padim-resnet18 --fold all \
        --config configs/real.yaml --set paths.data=../shared/datasets/bsdata_tiles \
        --set paths.work=runs/bench-real/bsdata_tiles-real-bf16/runs --set experiment=chan1
    .venv/bin/python bench/draws.py ../shared/datasets/bsdata_tiles RUNS/real/padim-resnet18 RUNS/chan1/padim-resnet18

A bench patch, not a package option: PaDiM's channel subset and backbone share the zoo seed by design.
"""
from __future__ import annotations

import sys
import types

import torch

import competition.zoo.models.padim as padim
from competition.cli import main


def shifted_torch(offset: int) -> types.ModuleType:
    """A stand-in for `torch` inside padim.py whose Generator seeds are shifted by `offset`."""

    class ShiftedGenerator(torch.Generator):
        def manual_seed(self, seed):
            return super().manual_seed(seed + offset)

    stand_in = types.ModuleType("torch")
    stand_in.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
    stand_in.Generator = ShiftedGenerator
    return stand_in


if __name__ == "__main__":
    padim.torch = shifted_torch(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
