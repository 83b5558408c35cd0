"""Kill -9 each stage at random moments, run it again, and compare with an uninterrupted run.

    .venv/bin/python bench/faults.py [--kills 10] [--seed 0] [--stages train zoo pretrain infer]

On the tiny synthetic set with configs/quick.yaml (one torch thread): for each stage, one
uninterrupted run gives the reference files; then, `--kills` times, a fresh copy of the state before
the stage runs the same command, is SIGKILLed after a random delay within the reference run's
duration, and is run again to the end. The final files the stage writes (predictions, weights,
submission) must be byte-identical to the reference, and no temporary file of an atomic write may be
left. Prints one line per kill and a count per stage; exit status 1 if any kill broke a file.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# The files whose bytes must not depend on a kill: timings (summary.json, history.csv) legitimately differ.
COMPARED = {
    "train": ["quick/efficientnet_b0/fold0/oof.csv", "quick/efficientnet_b0/fold0/test.csv",
              "quick/efficientnet_b0/fold1/oof.csv", "quick/efficientnet_b0/fold1/test.csv"],
    "zoo": ["quick/padim-resnet18/fold0/oof.csv", "quick/padim-resnet18/fold0/test.csv",
            "quick/padim-resnet18/fold1/oof.csv", "quick/padim-resnet18/fold1/test.csv"],
    "pretrain": ["pretrain/efficientnet_b0.safetensors"],
    "infer": ["../submissions/submission.csv", "../submissions/quick.csv", "quick/_ensemble/oof.csv",
              "quick/_ensemble/test.csv"],
}


ORDER = ["train", "zoo", "pretrain", "infer"]


def command(stage: str, data: Path, work: Path) -> list[str]:
    sets = [f"paths.data={data}", f"paths.work={work / 'runs'}", f"paths.submissions={work / 'submissions'}",
            "train.threads=1", "folds.n_splits=2", "train.epochs=2", "zoo.models=[padim-resnet18]",
            "pretrain.epochs=2", "zoo.gallery_size=0"]
    args = {"train": ["train", "--fold", "all"], "zoo": ["zoo", "--fold", "all"], "pretrain": ["pretrain"],
            "infer": ["infer"], "folds": ["folds"]}[stage]
    out = [PYTHON, "-m", "competition", *args, "--config", str(ROOT / "configs" / "quick.yaml")]
    for s in sets:
        out += ["--set", s]
    return out


def run(stage: str, data: Path, work: Path, kill_after: float | None = None) -> float:
    started = time.perf_counter()
    process = subprocess.Popen(command(stage, data, work), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    if kill_after is None:
        if process.wait() != 0:
            raise RuntimeError(f"{stage} failed in {work}")
        return time.perf_counter() - started
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return time.perf_counter() - started


def digests(work: Path, stage: str) -> dict[str, str]:
    out = {}
    for name in COMPARED[stage]:
        path = work / "runs" / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"
    return out


def temporaries(work: Path) -> list[Path]:
    return [p for p in work.rglob(".*.tmp")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=ORDER, choices=ORDER)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="faults_"))
    data = scratch / "data"
    subprocess.run([PYTHON, "-m", "competition", "synth", "--preset", "tiny", "--out", str(data)], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = scratch / "base"
    run("folds", data, base)
    failures = 0
    for stage in [s for s in ORDER if s in args.stages or any(ORDER.index(t) > ORDER.index(s) for t in args.stages)]:
        if stage not in args.stages:  # a stage the chosen ones read from: run once, no kills
            run(stage, data, base)
            continue
        before = scratch / f"before_{stage}"
        shutil.copytree(base, before)
        seconds = run(stage, data, base)  # the reference, and the state the next stage starts from
        reference = digests(base, stage)
        broken = 0
        for i in range(args.kills):
            work = scratch / f"{stage}_{i}"
            shutil.copytree(before, work)
            delay = rng.uniform(0.5, seconds)
            run(stage, data, work, kill_after=delay)
            left_by_kill = len(temporaries(work))
            run(stage, data, work)
            same = digests(work, stage) == reference
            stale = temporaries(work)
            ok = same and not stale
            broken += not ok
            print(f"{stage} kill {i + 1}: after {delay:5.1f} s of {seconds:5.1f} s; "
                  f"{left_by_kill} temporary file(s) left by the kill, {len(stale)} after the rerun; "
                  f"final files {'identical' if same else 'DIFFER'}", flush=True)
            shutil.rmtree(work)
        failures += broken
        print(f"{stage}: {args.kills - broken} of {args.kills} kills ended byte-identical with no temporary file left",
              flush=True)
    shutil.rmtree(scratch)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
