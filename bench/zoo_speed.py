"""Speed and memory of the zoo: the feature-memory models, PatchCore's coreset job, the trained models.

    python bench/zoo_speed.py                 # everything (about 30 minutes on 2 cores)
    python bench/zoo_speed.py --skip-models   # only the coreset job and the memory estimate
    python bench/zoo_speed.py --data DIR      # an existing `small` set instead of generating one

1. Per model on the `small` synthetic set, fold 0 (fit on the other folds' normals, score fold 0
   and the test set, cold feature cache): fit seconds, scoring images per second, peak resident
   memory (each model in its own process, so the peaks are its own), and fold 0's AUROC.
2. PatchCore's coreset job: 600 generated 224-px texture images, resnet18 layer2+3 patches
   (28 x 28 per image: 470,400 x 384), 10% greedy coreset (47,040 steps): extraction, coreset and
   total fit time, peak memory, and the naive greedy loop's time per step on the same projected
   features for comparison. Random i.i.d. features would not do here: they have no neighbourhood
   structure, so no exact method can skip work on them (ours then falls back to the naive cost).
3. PatchCore's memory on the `full` preset (6,790 normals, 5,432 in a 5-fold fit), extrapolated
   from the measured bytes per patch.
4. The trained models: setup seconds (e.g. EfficientAD's teacher distillation), training
   seconds per epoch, the default's epochs and estimated fit time, and scoring images per second.
   Each trains one epoch of its registry default on the set's first 320 normals (one fold's share)
   and scores the 300 test images. `--device cuda` measures the same on a GPU.

    python bench/zoo_speed.py --data DIR --only-trained --threads 1
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ["patchcore-resnet18", "padim-resnet18", "dfm-resnet18", "dfkde-resnet18", "fre-resnet18", "cfa-resnet18",
          "autoencoder-recon", "autoencoder-ssim", "autoencoder-ocsvm", "dsr"]
TRAINED_MODELS = ["stfpm-resnet18", "reverse-distillation-resnet18", "efficientad-s", "efficientad-m", "draem",
                  "fastflow-resnet18", "cflow-resnet18", "cflow-resnet18-l234", "uflow-resnet18", "csflow-resnet18",
                  "ganomaly", "supersimplenet-resnet18", "uninet-resnet18", "dinomaly-ssl"]
# Entries whose weights come from `make pretrain` time the same network from random init here: the speed of a
# network does not depend on its weights, and the bench has no experiment to pretrain in.
SPEED_OVERRIDES = {"dinomaly-ssl": {"backbone_weights": None}, "supersimplenet-ssl": {"backbone_weights": None}}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def one_model(name: str, data: str, work: str, threads: int) -> dict:
    """Fit `name` on fold 0's training normals, score fold 0 and the test set (runs in its own process)."""
    _threads(threads)

    from competition.config import load_config
    from competition.folds import load_index, read_folds
    from competition.metrics import auroc
    from competition.zoo.api import ImageSet, ZooSettings
    from competition.zoo.registry import build_model

    cfg = load_config(None, [f"paths.data={data}", f"paths.work={work}"])
    index = load_index(cfg)
    folds = read_folds(cfg, index)
    settings = ZooSettings.from_config(cfg)
    settings.cache_dir = tempfile.mkdtemp(prefix="zoo_speed_cache_")  # cold cache: extraction is timed
    settings.progress = False
    model = build_model(name, settings, {**SPEED_OVERRIDES.get(name, {}), **(cfg.zoo.params.get(name) or {})})
    fit_rows = folds[(folds["fold"] != 0) & (folds["label"] == 0)]
    held = folds[folds["fold"] == 0]
    test = index[index["split"] == "test"]
    started = time.perf_counter()
    model.fit(ImageSet.from_frame(fit_rows))
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    held_scores = model.score_samples(ImageSet.from_frame(held))
    model.score_samples(ImageSet.from_frame(test))
    score_seconds = time.perf_counter() - started
    return {"model": name, "fit_s": round(fit_seconds, 1), "n_fit": len(fit_rows),
            "score_img_s": round((len(held) + len(test)) / score_seconds, 1),
            "peak_mb": round(peak_rss_mb()), "auroc_fold0": round(auroc(held["label"].astype(int), held_scores), 3),
            "fit_info": {k: v for k, v in model.fit_info.items() if not isinstance(v, (list, dict))}}


def coreset_job(n_images: int, size: int, ratio: float, threads: int, seed: int = 0) -> dict:
    """PatchCore fit on `n_images` generated textures at `size` px; returns timings and memory (own process)."""
    _threads(threads)
    import numpy as np
    import torch

    from competition.data.textures import DATASET_FAMILIES, make_texture
    from competition.zoo.api import ImageSet, ZooSettings
    from competition.zoo.components.coreset import greedy_coreset_naive, principal_axes, random_projection
    from competition.zoo.components.features import shared_extractor
    from competition.zoo.registry import build_model

    rng = np.random.default_rng(seed)
    images = ImageSet([make_texture(DATASET_FAMILIES[i % len(DATASET_FAMILIES)], (size, size), rng)
                       for i in range(n_images)])
    settings = ZooSettings(image_size=size, batch_size=32, cache_dir=None, progress=False, seed=seed)
    model = build_model("patchcore-resnet18", settings, {"coreset_ratio": ratio})
    started, cpu_started = time.perf_counter(), time.process_time()
    model.fit(images)
    fit_seconds, fit_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    info = dict(model.fit_info)
    peak = peak_rss_mb()

    # the naive loop's time per step on the same kind of features (a few images' worth is enough to time it)
    extractor = shared_extractor("resnet18", [2, 3], settings)
    maps = extractor.extract_all(images, list(range(min(n_images, 64))))
    emb = model.model.embedding(extractor.select(maps, [2, 3]))
    patches = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    reps = max(1, info["patches"] // patches.shape[0])
    bank = patches.repeat(reps, 1)[:info["patches"]]  # the job's size, for a per-step time at that size
    projected = principal_axes(random_projection(bank, 128, seed))
    torch.set_num_threads(1)
    started = time.perf_counter()
    greedy_coreset_naive(projected, 30)
    naive_step = (time.perf_counter() - started) / 30
    return {"images": n_images, "size": size, "patches": info["patches"], "dim": info["embedding_dim"],
            "memory_bank": info["memory_bank"], "fit_s": round(fit_seconds, 1), "fit_cpu_s": round(fit_cpu, 1),
            "coreset_s": info["coreset_seconds"], "coreset_cpu_s": info["coreset_cpu_seconds"],
            "extract_embed_s": round(fit_seconds - info["coreset_seconds"], 1),
            "extract_embed_cpu_s": round(fit_cpu - info["coreset_cpu_seconds"], 1),
            "naive_step_ms": round(naive_step * 1000, 1),
            "naive_estimate_min": round(naive_step * info["memory_bank"] / 60, 1), "peak_mb": round(peak)}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"bench child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def full_preset_estimate(job: dict) -> list[str]:
    """PatchCore on the full preset's normals, from the measured bytes per patch of the coreset job."""
    base_mb = 700  # interpreter, torch, backbone: the resident floor of any zoo process here
    per_patch = max(job["peak_mb"] - base_mb, 1) * 2**20 / job["patches"]
    lines = []
    for size in (128, 224, 256):
        patches = 5432 * (size // 8) ** 2  # 4 of 5 folds of 6,790 normals; layer2 grid = size / 8
        total_gb = (base_mb * 2**20 + per_patch * patches) / 2**30
        lines.append(f"  image_size {size}: {patches:,} patches x {job['dim']} -> about {total_gb:.1f} GiB peak "
                     f"({per_patch:.0f} B/patch measured; the patch bank is kept in float16)")
    return lines


def trained_rows(data: str, models: list[str], threads: int, device: str, normals: int = 320,
                 image_size: int = 128) -> None:
    """Section 4: one epoch of each trained model's default, then scoring speed; prints a row each."""
    import torch

    from competition.zoo.api import ImageSet, ZooSettings
    from competition.zoo.registry import build_model

    torch.set_num_threads(threads)
    fit_images = ImageSet(sorted((Path(data) / "train" / "normal_images").iterdir())[:normals])
    test = ImageSet(sorted((Path(data) / "test" / "images").iterdir()))
    print(f"\nTrained models: {device}, {threads} thread(s), {len(fit_images)} training normals "
          f"(4/5 train, 1/5 validation), {len(test)} test images, {image_size} px")
    print(f"{'model':32s} {'setup s':>8s} {'s/epoch':>8s} {'steps':>6s} {'epochs':>6s} {'~fit s':>8s} "
          f"{'score img/s':>11s}")
    for name in models:
        with tempfile.TemporaryDirectory() as run_dir:
            settings = ZooSettings(image_size=image_size, batch_size=32, device=device, progress=False,
                                   run_dir=run_dir)
            overrides = SPEED_OVERRIDES.get(name, {})
            default = build_model(name, settings, overrides)
            model = build_model(name, settings, {**overrides, "epochs": 1})
            model.fit(fit_images)
            info = model.fit_info
            model.score_samples(test.subset(range(8)))  # warm-up
            start = time.perf_counter()
            model.score_samples(test)
            rate = len(test) / (time.perf_counter() - start)
            defaults = default.params
            steps = int(defaults.steps_per_epoch) or (info["training_normals"] // min(int(defaults.batch_size),
                                                                                       info["training_normals"]))
            full = info["setup_seconds"] + defaults.epochs * (info["fit_seconds"] - info["setup_seconds"])
            print(f"{name:32s} {info['setup_seconds']:8.1f} {info['train_seconds_per_epoch']:8.1f} {steps:6d} "
                  f"{defaults.epochs:6d} {full:8.0f} {rate:11.1f}", flush=True)


def small_set(data: str | None) -> str:
    """`data`, or a freshly generated `small` set when none is given."""
    if data is not None:
        return data
    from competition.data.synthetic import write_competition

    data = tempfile.mkdtemp(prefix="zoo_speed_small_")
    write_competition(data, preset="small", seed=0, progress=False)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="an existing small-preset dataset (default: generate one)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-coreset", action="store_true")
    parser.add_argument("--trained-models", default=",".join(TRAINED_MODELS))
    parser.add_argument("--skip-trained", action="store_true")
    parser.add_argument("--only-trained", action="store_true", help="section 4 alone")
    parser.add_argument("--device", default="cpu", help="section 4's device (cpu or cuda)")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(one_model(args.one, args.data, args.work, args.threads)))
        return
    if args.job:
        print(json.dumps(coreset_job(args.images, args.size, 0.1, args.threads)))
        return

    if args.only_trained:
        args.skip_models = args.skip_coreset = True
    if not args.skip_models:
        from competition.config import load_config
        from competition.folds import write_folds

        data = args.data = small_set(args.data)
        work = tempfile.mkdtemp(prefix="zoo_speed_work_")
        write_folds(load_config(None, [f"paths.data={data}", f"paths.work={work}"]))
        print(f"Models on the small set ({data}), fold 0, {args.threads} threads, cold feature cache:")
        print(f"{'model':24s} {'fit s':>7s} {'n fit':>6s} {'score img/s':>12s} {'peak MB':>8s} {'AUROC f0':>9s}")
        for name in args.models.split(","):
            r = _child(["--one", name, "--data", data, "--work", work, "--threads", str(args.threads)])
            print(f"{r['model']:24s} {r['fit_s']:7.1f} {r['n_fit']:6d} {r['score_img_s']:12.1f} "
                  f"{r['peak_mb']:8d} {r['auroc_fold0']:9.3f}", flush=True)

    if not args.skip_coreset:
        job = _child(["--job", "--images", str(args.images), "--size", str(args.size), "--threads", str(args.threads)])
        print(f"\nPatchCore coreset job: {job['images']} generated {job['size']}-px images, {job['patches']:,} patches "
              f"x {job['dim']}, 10% coreset = {job['memory_bank']:,} greedy steps")
        print(f"  fit total {job['fit_s']:.1f} s wall = extraction + embedding {job['extract_embed_s']:.1f} s "
              f"+ coreset {job['coreset_s']:.1f} s; peak memory {job['peak_mb']} MB")
        print(f"  CPU time: extraction + embedding {job['extract_embed_cpu_s']:.1f} s ({args.threads} threads), "
              f"coreset {job['coreset_cpu_s']:.1f} s (one thread); on a busy machine wall time exceeds these")
        print(f"  naive greedy loop on the same projected features: {job['naive_step_ms']} ms/step -> "
              f"about {job['naive_estimate_min']} min for the coreset alone")
        print("\nPatchCore on the full preset (fit on 5,432 normals), extrapolated:")
        print("\n".join(full_preset_estimate(job)))

    if not args.skip_trained:
        trained_rows(small_set(args.data), args.trained_models.split(","), args.threads, args.device)


if __name__ == "__main__":
    main()
