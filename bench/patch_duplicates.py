"""How many of PatchCore's memory-bank patches are distinct: would a search over distinct patches be cheaper?

    python bench/patch_duplicates.py ../shared/datasets/deeppcb
    python bench/patch_duplicates.py ../shared/datasets/bsdata_tiles --images 60 --set zoo.image_size=320

Builds the patch rows that `patchcore-resnet18-layer1` puts in its bank, through the package itself: the config's
zoo settings (`configs/real.yaml` by default: 256 px, a healthy random resnet18 whose BatchNorm statistics come from
the test images), the zoo's image loader, shared extractor and PatchCore's 3x3 patch embedding, in float16 as the
fit keeps them. It reads the first `--images` training normals and prints the share of distinct rows: near 1,
deduplicating the bank or the queries saves nothing. The feature cache is off, so nothing is written.
"""
from __future__ import annotations

import argparse

import torch

from competition.config import load_config
from competition.folds import labeled_train, load_index
from competition.zoo.api import ImageSet
from competition.zoo.components.features import with_backbone_statistics
from competition.zoo.registry import build_from_config

MODEL = "patchcore-resnet18-layer1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a competition-layout dataset")
    parser.add_argument("--config", default="configs/real.yaml")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"paths.data={args.data}", "zoo.cache=false", *args.set])
    index = load_index(cfg)
    train = labeled_train(index)
    normals = ImageSet.from_frame(train[train["label"] == 0].head(args.images))
    test = ImageSet.from_frame(index[index["split"] == "test"])

    patchcore = build_from_config(MODEL, cfg)
    model = patchcore.build_model()
    statistics_images = test if cfg.zoo.batchnorm_images == "test" else normals
    extractor = with_backbone_statistics(patchcore._extractor(), model, statistics_images)
    rows = []
    with torch.no_grad():
        for _, maps in extractor.extract(normals, desc="patches"):
            emb = model.embedding(extractor.select(maps, patchcore.params.layers))
            rows.append(emb.permute(0, 2, 3, 1).flatten(0, 2).half())
    patches = torch.cat(rows)
    distinct = torch.unique(patches, dim=0).shape[0]
    print(f"{MODEL} on {len(normals)} normals of {args.data} at {cfg.zoo.image_size} px: {patches.shape[0]} patches, "
          f"{distinct} distinct ({distinct / patches.shape[0]:.3f})")


if __name__ == "__main__":
    main()
