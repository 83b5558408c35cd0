"""`competition run`: the job graph, the scheduler, retries, and the Ray backend against the serial one."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, quick_config

from competition.cli import main as cli_main
from competition.run import Job, JobResult, build_jobs, execute, run_job

OVERRIDES = ("folds.n_splits=2", "zoo.models=[padim-resnet18]", "zoo.gallery_size=0", "train.epochs=4",
             "train.threads=1")


def _args(data: Path, work: Path, *extra: str) -> list[str]:
    sets = [f"paths.data={data}", f"paths.work={work / 'runs'}", f"paths.submissions={work / 'submissions'}",
            *OVERRIDES, *extra]
    return ["--config", str(ROOT / "configs" / "quick.yaml"), *[x for s in sets for x in ("--set", s)]]


def test_the_graph_orders_folds_pretraining_models_then_infer(tiny_data, tmp_path):
    cfg = quick_config(tiny_data, tmp_path, "folds.n_splits=2", "model.pretrained=ssl",
                       "zoo.models=[padim-resnet18, patchcore-ssl]", "pretrain.backbone=resnet18")
    jobs = {job.name: job for job in build_jobs(cfg, ["--config", "c.yaml"])}
    names = list(jobs)
    assert names[0] == "folds" and names[-2:] == ["infer", "leaderboard"]
    # the classifier reads <work>/pretrain/efficientnet_b0, patchcore-ssl reads resnet18: one pretraining each
    assert [n for n in names if n.startswith("pretrain")] == ["pretrain-efficientnet_b0", "pretrain-resnet18"]
    assert jobs["pretrain-resnet18"].argv[-2:] == ("--set", "pretrain.backbone=resnet18")
    assert jobs["train-efficientnet_b0-fold1"].argv[:3] == ("train", "--fold", "1")
    assert set(jobs["train-efficientnet_b0-fold1"].after) == {"folds", "pretrain-efficientnet_b0", "pretrain-resnet18"}
    # a feature model's later folds wait for its first, which fills the feature cache they read
    assert "zoo-padim-resnet18-fold0" in jobs["zoo-padim-resnet18-fold1"].after
    assert jobs["zoo-patchcore-ssl-fold0"].argv[:5] == ("zoo", "--model", "patchcore-ssl", "--fold", "0")
    model_jobs = {n for n in names if n.startswith(("train-", "zoo-"))}
    assert set(jobs["infer"].after) == model_jobs and len(model_jobs) == 2 + 2 * 2


def test_the_default_experiment_needs_no_pretraining(tiny_data, tmp_path):
    cfg = quick_config(tiny_data, tmp_path)
    assert not [job for job in build_jobs(cfg, []) if job.stage == "pretrain"]


class _ScriptedBackend:
    """Finishes each job at once with the status the test scripts for it."""

    synchronous = False  # reported at the next wait, as Ray's would be

    def __init__(self, failing: set[str]):
        self.failing, self.started, self._done = failing, [], []

    def start(self, job: Job, log: str) -> None:
        self.started.append(job.name)
        self._done.append(JobResult(job, "failed" if job.name in self.failing else "ok", attempts=1))

    def wait(self) -> list[JobResult]:
        done, self._done = self._done, []
        return done


def test_a_failed_job_skips_what_reads_it_and_the_rest_still_runs(tmp_path):
    jobs = [Job("folds", "folds", ()), Job("a", "train", (), ("folds",)), Job("b", "zoo", (), ("folds",)),
            Job("b1", "zoo", (), ("folds", "b")), Job("infer", "infer", (), ("a", "b", "b1"))]
    backend = _ScriptedBackend(failing={"b"})
    seen = []
    results = execute(jobs, backend, tmp_path, seen.append)
    status = {r.job.name: r.status for r in results}
    assert status == {"folds": "ok", "a": "ok", "b": "failed", "b1": "skipped", "infer": "skipped"}
    assert backend.started == ["folds", "a", "b"] and len(seen) == 5


def test_a_synchronous_backend_reports_each_job_before_the_next_starts(tmp_path):
    jobs = [Job("folds", "folds", ()), Job("a", "train", (), ("folds",)), Job("b", "zoo", (), ("folds",))]
    backend = _ScriptedBackend(failing=set())
    backend.synchronous = True
    order = []
    backend_start = backend.start
    backend.start = lambda job, log: (order.append(f"start {job.name}"), backend_start(job, log))
    execute(jobs, backend, tmp_path, lambda r: order.append(f"done {r.job.name}"))
    assert order == ["start folds", "done folds", "start a", "done a", "start b", "done b"]


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "fresh process"])
def test_a_user_error_is_reported_once_with_its_exit_status_and_log(tmp_path, fresh):
    log = tmp_path / "job.log"
    job = Job("score", "score", ("score", "--submission", str(tmp_path / "missing.csv"), "--answers", "x.csv"))
    result = run_job(job, str(tmp_path), threads=1, retries=2, log=str(log), fresh=fresh)
    assert result.status == "failed" and result.attempts == 1 and result.returncode == 2  # it would recur
    text = log.read_text()
    assert "missing.csv" in text and re.search(r"# job pid \d+", text) and result.peak_rss_mb > 0


def test_a_killed_job_runs_again_until_it_succeeds_or_runs_out_of_retries(tmp_path, monkeypatch):
    import competition.commands

    def killed_twice(argv):  # the forked child runs this: killed on its first two attempts
        marks = sorted(tmp_path.glob("attempt*"))
        (tmp_path / f"attempt{len(marks)}").touch()
        if len(marks) < 2:
            os.kill(os.getpid(), signal.SIGKILL)
        print("finished", argv)
        return 0

    monkeypatch.setattr(competition.commands, "main", killed_twice)
    job = Job("train-x-fold0", "train", ("train", "--fold", "0"))
    result = run_job(job, str(tmp_path), threads=None, retries=2, log=str(tmp_path / "a.log"))
    assert result.status == "ok" and result.attempts == 3 and result.returncode == 0
    assert "finished ['train', '--fold', '0']" in (tmp_path / "a.log").read_text()
    for name in ("attempt0", "attempt1", "attempt2"):
        (tmp_path / name).unlink()
    result = run_job(job, str(tmp_path), threads=None, retries=1, log=None)
    assert result.status == "failed" and result.attempts == 2 and result.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_ray_gives_the_serial_files_and_a_killed_job_resumes_to_the_same_result(tiny_data, tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "ray"
    assert cli_main(["run", *_args(tiny_data, serial)]) == 0
    jobs = pd.read_csv(serial / "runs" / "quick" / "_run" / "jobs.csv")
    assert (jobs["status"] == "ok").all() and len(jobs) == 1 + 2 + 2 + 2
    assert (serial / "runs" / "quick" / "_run" / "timeline.png").exists()

    # Ray, two one-CPU workers; the first classifier fold is killed once its first epoch is saved
    command = [sys.executable, "-m", "competition", "run",
               *_args(tiny_data, parallel, "executor.backend=ray", "executor.cpus=2")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = parallel / "runs" / "quick"
    last, log = run / "efficientnet_b0" / "fold0" / "last.pt", run / "_run" / "logs" / "train-efficientnet_b0-fold0.log"
    killed = False
    deadline = time.time() + 600  # generous: a loaded 2-core machine ran this whole test past 300 s
    while process.poll() is None and time.time() < deadline and not killed:
        if last.exists() and log.exists():
            pids = re.findall(r"# job pid (\d+)", log.read_text())
            os.kill(int(pids[-1]), signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    output = process.communicate(timeout=900)[0]
    assert killed and process.returncode == 0, output
    assert re.search(r"train-efficientnet_b0-fold0\s+ok .* 2 attempts", output), output

    done = serial / "runs" / "quick"
    files = sorted([*done.glob("*/fold*/oof.csv"), *done.glob("*/fold*/test.csv"), *done.glob("_ensemble/*.csv")])
    assert len(files) == 2 * 2 * 2 + 2
    for path in files:
        twin = run / path.relative_to(done)
        assert twin.read_bytes() == path.read_bytes(), f"{twin} differs from the serial run's"
    assert (parallel / "submissions" / "submission.csv").read_bytes() == \
        (serial / "submissions" / "submission.csv").read_bytes()
    boards = [pd.read_csv(w / "submissions" / "leaderboard.csv").drop(columns="train_seconds")
              for w in (serial, parallel)]
    pd.testing.assert_frame_equal(*boards)
