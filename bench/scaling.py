"""How the pipeline's cost grows with the data: each stage's time and peak memory at several dataset sizes,
the fitted growth exponent, and the extrapolation to the `full` preset (6,790 normals, 9,100 test images).

    .venv/bin/python bench/scaling.py                                   # tiny, small, medium: serial runs
    .venv/bin/python bench/scaling.py --reuse small=/tmp/bench-executor/serial   # a serial run already made
    .venv/bin/python bench/scaling.py --gpu-jobs runs/full/full/_run/jobs.csv    # bench/gpu_check.sh's jobs

Each size runs `competition run` (serial, the default config, every core) on its own synthetic set from an
empty work folder and reads the run's `_run/jobs.csv`: a stage's time is the sum of its jobs' seconds (a
model stage's: the mean of its finished folds times `--folds`, so a run stopped after some folds still
counts), its memory the largest peak resident memory of its jobs (each job is one process). The exponent b of
time = a * images^b is fitted by least squares in log-log space over the sizes measured; the `full` figures
extend the largest size by (full images / its images)^b. The default config resizes every image (96 px for
the classifier, 128 px for the zoo), so the full preset's larger images (256 px against 128 px) change the
decoding cost only; extrapolated figures are estimates, not measurements.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from competition.data.synthetic import PRESETS  # noqa: E402


def images(preset: str) -> int:
    p = PRESETS[preset]
    return p.n_normal + p.n_defect + p.n_test


def stage_name(row: pd.Series) -> str:
    return f"zoo:{row['model']}" if row["stage"] == "zoo" else row["stage"]


def measure(preset: str, out: Path, config: str) -> Path:
    data = out / f"data-{preset}"
    subprocess.run([sys.executable, "-m", "competition", "synth", "--preset", preset, "--out", str(data),
                    "--if-missing"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    work = out / preset
    if work.exists():
        shutil.rmtree(work)
    sets = [f"paths.data={data}", f"paths.work={work / 'runs'}", f"paths.submissions={work / 'submissions'}",
            "executor.backend=serial"]
    log = out / f"{preset}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run([sys.executable, "-m", "competition", "run", "--config", config,
                               *[x for s in sets for x in ("--set", s)]], cwd=ROOT, stdout=handle,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{preset}: competition run exited {code}; see {log}")
    print(f"{preset}: {images(preset)} images, make all {time.perf_counter() - start:.0f} s", flush=True)
    return work


def folder_jobs(experiment: Path, known: set[str]) -> pd.DataFrame:
    """Jobs of a stopped run that its jobs.csv lacks: a finished model fold's seconds from its folder, from
    config.yaml (written when the job starts) to summary.json (written when it ends); memory unknown."""
    rows = []
    for summary in sorted(experiment.glob("*/fold*/summary.json")):
        fold_dir = summary.parent
        model, fold = fold_dir.parent.name, int(fold_dir.name[4:])
        stage = "zoo" if (fold_dir / "results.json").exists() else "train"
        name = f"{stage}-{model}-fold{fold}"
        if name not in known:
            seconds = summary.stat().st_mtime - (fold_dir / "config.yaml").stat().st_mtime
            rows.append({"job": name, "stage": stage, "model": model, "fold": fold, "status": "ok",
                         "seconds": seconds, "peak_rss_mb": np.nan})
    return pd.DataFrame(rows)


def stage_table(sources: list[Path], folds: int) -> pd.DataFrame:
    """Per stage: seconds (a model stage: the mean of its finished folds x `folds`, so a run stopped after
    some folds still counts whole; for a finished run that is the sum) and the largest peak memory.
    `sources`: work folders (their runs/*/_run/jobs.csv, completed from the fold folders) or jobs.csv files."""
    tables = []
    for source in sources:
        if source.suffix == ".csv":
            tables.append(pd.read_csv(source))
            continue
        jobs_csv = next(Path(source).glob("runs/*/_run/jobs.csv"))
        jobs = pd.read_csv(jobs_csv)
        tables += [jobs, folder_jobs(jobs_csv.parents[1], set(jobs["job"]))]
    jobs = pd.concat([t for t in tables if len(t)]).drop_duplicates("job", keep="first")
    jobs = jobs[jobs["status"] == "ok"].copy()
    jobs["stage"] = jobs.apply(stage_name, axis=1)
    table = jobs.groupby("stage", sort=False).agg(seconds=("seconds", "sum"), mean=("seconds", "mean"),
                                                  peak_mb=("peak_rss_mb", "max"))
    per_fold = [stage for stage in table.index if stage == "train" or stage.startswith("zoo:")]
    table.loc[per_fold, "seconds"] = table.loc[per_fold, "mean"] * folds
    return table.drop(columns="mean")


def throughput(jobs_csv: Path) -> str:
    """Training images per second (every finished classifier fold's epochs) and zoo scoring images per second
    (each zoo fold's summary), from the run folders beside the jobs.csv."""
    import json

    experiment = Path(jobs_csv).parents[1]
    histories = [pd.read_csv(p) for p in experiment.glob("*/fold*/history.csv")]
    parts = []
    if histories:
        done = pd.concat(histories)
        parts.append(f"training {done['train_images'].sum() / done['train_seconds'].sum():.1f} images/s")
    for model in sorted({p.parent.parent.name for p in experiment.glob("*/fold*/results.json")}):
        summaries = [json.loads(p.read_text()) for p in experiment.glob(f"{model}/fold*/summary.json")]
        rates = [r for r in (s.get("images_per_second") for s in summaries) if r]
        if rates:
            parts.append(f"{model} scoring {np.mean(rates):.1f} images/s")
    return "; ".join(parts) or "no finished fold"


def fit_exponent(sizes: list[int], values: list[float]) -> float:
    x, y = np.log(sizes), np.log(np.maximum(values, 1e-3))
    return float(np.polyfit(x, y, 1)[0]) if len(set(sizes)) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=["tiny", "small", "medium"], choices=list(PRESETS))
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", default="/tmp/bench-scaling", help="datasets and work folders")
    parser.add_argument("--reuse", action="append", default=[], metavar="PRESET=WORK[,JOBS.csv...]",
                        help="take PRESET's figures from a serial run already made in WORK (its runs/*/_run/jobs.csv, "
                             "completed from its finished fold folders), plus jobs.csv files of jobs run apart")
    parser.add_argument("--folds", type=int, default=5, help="folds a model stage runs (the config's n_splits)")
    parser.add_argument("--gpu-jobs", default=None, help="jobs.csv of a GPU run of the full preset (gpu_check.sh)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reused = dict(item.split("=", 1) for item in args.reuse)

    if args.presets:
        scaling_table(args, out, reused)
    if args.gpu_jobs:
        gpu = pd.read_csv(args.gpu_jobs)
        gpu["stage"] = gpu.apply(stage_name, axis=1)
        print("GPU run of the full preset (measured):")
        print(gpu.groupby("stage", sort=False).agg(jobs=("job", "size"), seconds=("seconds", "sum"),
                                                  peak_mb=("peak_rss_mb", "max")).round(1).to_string())
        print("GPU throughput:", throughput(Path(args.gpu_jobs)))
    else:
        print("GPU: not measured here (no --gpu-jobs); bench/gpu_check.sh measures it on a CUDA machine")


def scaling_table(args: argparse.Namespace, out: Path, reused: dict[str, str]) -> None:
    tables = {}
    for preset in args.presets:
        sources = [Path(p) for p in reused[preset].split(",")] if preset in reused else [
            measure(preset, out, args.config)]
        tables[preset] = stage_table(sources, args.folds)
        work = next(p for p in sources if p.suffix != ".csv")
        print(f"{preset}: {throughput(next(Path(work).glob('runs/*/_run/jobs.csv')))}", flush=True)
    args.presets = sorted(args.presets, key=images)  # measured in the order given, fitted by size
    sizes = [images(p) for p in args.presets]
    n_full = images("full")
    rows = []
    for stage in tables[args.presets[-1]].index:
        seconds = [tables[p].loc[stage, "seconds"] if stage in tables[p].index else np.nan for p in args.presets]
        memory = [tables[p].loc[stage, "peak_mb"] if stage in tables[p].index else np.nan for p in args.presets]
        known = [i for i, s in enumerate(seconds) if np.isfinite(s)]
        b_time = fit_exponent([sizes[i] for i in known], [seconds[i] for i in known])
        b_mem = fit_exponent([sizes[i] for i in known], [memory[i] for i in known])
        grow = n_full / sizes[-1]
        row = {"stage": stage}
        row.update({f"{p} s": s for p, s in zip(args.presets, seconds)})
        row.update({"time exp": b_time, "full s (2 CPU)": seconds[-1] * grow ** b_time})
        row.update({f"{p} MiB": m for p, m in zip(args.presets, memory)})
        row.update({"mem exp": b_mem, "full MiB": memory[-1] * grow ** b_mem})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("stage")
    total = table[[c for c in table.columns if c.endswith(" s") or c.endswith("(2 CPU)")]].sum()
    print(f"images per preset: {dict(zip(args.presets, sizes))}, full: {n_full}")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.round(2).to_string())
        print("total seconds:", total.round(0).to_dict())
    worst = table["time exp"].fillna(-np.inf).idxmax()
    print(f"grows worst in time: {worst} (exponent {table.loc[worst, 'time exp']:.2f}); "
          f"full preset on 2 CPU cores, serial: about {total['full s (2 CPU)'] / 3600:.1f} h, "
          f"peak job memory about {table['full MiB'].max() / 1024:.1f} GiB")


if __name__ == "__main__":
    main()
