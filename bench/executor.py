"""`make all` on a dataset twice, serial and as Ray tasks, from empty work folders: wall times and their ratio.

    .venv/bin/python bench/executor.py                      # the small set (make data), 2 one-thread Ray workers
    .venv/bin/python bench/executor.py --data DIR --ray-cpus 4 --job-cpus 2

Serial runs one job at a time with every core (train.threads: 0); Ray runs `--ray-cpus / --job-cpus`
jobs at a time with `--job-cpus` threads each. Each wall time includes the process start (imports,
and Ray's start for Ray). The script also says whether the two leaderboards and submissions agree:
one thread and two threads may round floating-point sums differently, so they can differ in the last
bits of a score (byte-identical files are checked at equal threads by tests/test_run.py).
Issue 17's target: Ray at least 1.5x faster than serial on 2 cores, never slower.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run(backend: str, args: argparse.Namespace) -> tuple[float, Path]:
    work = Path(args.out) / backend
    if work.exists():
        shutil.rmtree(work)
    sets = [f"paths.data={Path(args.data).resolve()}", f"paths.work={work / 'runs'}",
            f"paths.submissions={work / 'submissions'}", f"executor.backend={backend}"]
    if backend == "ray":
        sets += [f"executor.cpus={args.ray_cpus}", f"executor.num_cpus={args.job_cpus}"]
    command = [sys.executable, "-m", "competition", "run", "--config", args.config,
               *[x for s in sets for x in ("--set", s)]]
    log = Path(args.out) / f"{backend}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"{backend}: competition run exited {code}; see {log}")
    return wall, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="input/synthetic", help="dataset (make data writes the small set here)")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", default="/tmp/bench-executor", help="work folders, emptied first")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs the local Ray hands out")
    parser.add_argument("--job-cpus", type=int, default=1, help="CPUs (and torch threads) per Ray job")
    args = parser.parse_args()
    if not (ROOT / args.data / "train").exists() and not Path(args.data, "train").exists():
        sys.exit(f"{args.data}: no dataset; run `make data` first")

    walls, works = {}, {}
    for backend in ("serial", "ray"):
        walls[backend], works[backend] = run(backend, args)
        jobs = pd.read_csv(next(works[backend].glob("runs/*/_run/jobs.csv")))
        print(f"{backend:<6} wall {walls[backend]:7.1f} s  ({len(jobs)} jobs, {jobs['seconds'].sum():.1f} s of job "
              f"time, peak job memory {jobs['peak_rss_mb'].max():.0f} MiB)", flush=True)
    ratio = walls["serial"] / walls["ray"]
    print(f"ratio serial / ray: {ratio:.2f}x  (target >= 1.5x, never < 1)")

    boards = {b: pd.read_csv(works[b] / "submissions" / "leaderboard.csv") for b in walls}
    columns = ["model", "oof_macro_f1", "oof_auroc", "public", "private"]
    merged = boards["serial"][columns].merge(boards["ray"][columns], on="model", suffixes=("_serial", "_ray"))
    print(merged.round(4).to_string(index=False))
    same = all((merged[f"{c}_serial"] - merged[f"{c}_ray"]).abs().fillna(0).max() < 1e-9 for c in columns[1:])
    subs = {b: pd.read_csv(works[b] / "submissions" / "submission.csv") for b in walls}
    agree = int((subs["serial"]["answer"] == subs["ray"]["answer"]).sum())
    print(f"leaderboards {'match' if same else 'DIFFER'}; submissions agree on {agree}/{len(subs['serial'])} answers")
    print(json.dumps({"serial_s": round(walls["serial"], 1), "ray_s": round(walls["ray"], 1),
                      "ratio": round(ratio, 2), "leaderboards_match": same}))


if __name__ == "__main__":
    main()
