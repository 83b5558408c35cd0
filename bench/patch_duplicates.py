"""How many of PatchCore's layer1 patches are distinct: would a search over distinct patches be cheaper?

    python bench/patch_duplicates.py ../shared/datasets/deeppcb
    python bench/patch_duplicates.py ../shared/datasets/bsdata_tiles --images 60 --size 256

Builds `patchcore-resnet18-layer1`'s features the way `configs/real.yaml` does (a healthy random resnet18, its
BatchNorm statistics estimated on the same images, layer1 averaged over 3x3, stored in float16 like the fit's bank)
on the first `--images` training normals, squashed to `--size` pixels, and prints the share of distinct patch rows.
A share near 1 means deduplicating the bank or the queries saves nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from competition.zoo.components.features import create_backbone, recalibrate_batchnorm

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load(files: list[Path], size: int) -> torch.Tensor:
    arrays = [np.array(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a competition-layout dataset")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted((args.data / "train" / "normal_images").iterdir())[:args.images]
    images = load(files, args.size)
    network = create_backbone("resnet18", (1,), False, args.seed, init="healthy")
    recalibrate_batchnorm(network, images.split(16))
    with torch.no_grad():
        features = torch.cat([F.avg_pool2d(network(batch)[0], 3, 1, 1) for batch in images.split(16)])
    rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).half()
    distinct = torch.unique(rows, dim=0).shape[0]
    print(f"{args.data.name}: {len(files)} images at {args.size} px, {rows.shape[0]} layer1 patches, "
          f"{distinct} distinct ({distinct / rows.shape[0]:.3f})")


if __name__ == "__main__":
    main()
