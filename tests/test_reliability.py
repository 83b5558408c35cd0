"""Errors about files name the file and the way out; killed writes leave nothing behind that is trusted
or kept; the CLI answers a full disk, Ctrl-C and a bad path in one line."""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from competition.artifacts import (
    UnreadableFileError,
    atomic_path,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_csv,
    write_json,
)
from competition.cli import main as cli_main
from competition.stage import RunFolder
from competition.training import load_training_state


def test_atomic_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    write_json({"a": 1}, tmp_path / "x.json")
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~mask != 0o600


def test_a_corrupted_json_names_its_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"fold": 0, "trunc')
    with pytest.raises(UnreadableFileError, match=re.escape(f"cannot read {path}: not valid JSON")):
        read_json(path)


def test_a_corrupted_marker_says_delete_it_or_force(tmp_path):
    marker = tmp_path / "summary.json"
    marker.write_text("{not json")
    folder = RunFolder(marker=marker, outputs=(tmp_path,), redo="refit this fold")
    with pytest.raises(UnreadableFileError, match="delete it or pass --force to refit this fold"):
        folder.prepare({}, force=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupted_checkpoint_names_its_file(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00junk" * 20, "empty": b""}[damage])
    with pytest.raises(UnreadableFileError, match=re.escape(f"cannot read {path}")):
        load_checkpoint(path)
    with pytest.raises(UnreadableFileError, match="delete it to start this run again, or pass --force"):
        load_training_state(path, model=torch.nn.Linear(3, 1))


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    target = tmp_path / "runs" / "oof.csv"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    import pandas as pd

    monkeypatch.setattr(pd.DataFrame, "to_csv", no_space)
    with pytest.raises(OSError) as info:
        write_csv(pd.DataFrame({"a": [1]}), target)
    assert info.value.filename == str(target) and "no space left on device" in info.value.strerror
    assert not list(target.parent.iterdir())  # no temporary file left behind


def test_a_failed_checkpoint_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    def failing_save(state, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    target = tmp_path / "best.pt"
    with pytest.raises(OSError) as info:
        save_checkpoint({"w": torch.ones(1)}, target)
    assert info.value.filename == str(target)
    assert not list(tmp_path.iterdir())


def test_stale_temporaries_are_removed_when_a_stage_starts_and_by_force(tmp_path):
    out = tmp_path / "fold0"
    out.mkdir()
    stale = out / ".best.pt.abc123.tmp"
    stale.write_bytes(b"x" * 100)
    keep = out / "history.csv"
    keep.write_text("epoch\n1\n")
    RunFolder(marker=out / "summary.json", outputs=(out / "best.pt",)).prepare({}, force=False)
    assert not stale.exists() and keep.exists()
    stale.write_bytes(b"x")
    RunFolder(marker=out / "summary.json", outputs=(out,)).prepare({}, force=True)
    assert not stale.exists()


def test_the_cli_names_the_path_of_an_os_error_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("I am a file")
    code = cli_main(["synth", "--preset", "tiny", "--out", str(blocker / "data")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(blocker) in err and len(err.strip().splitlines()) == 1


def test_synth_into_a_dataset_says_to_pass_overwrite(tiny_data, tmp_path, capsys):
    out = tmp_path / "data"
    assert cli_main(["synth", "--preset", "tiny", "--out", str(out), "--seed", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["synth", "--preset", "tiny", "--out", str(out), "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err


def test_ctrl_c_prints_one_line(monkeypatch, capsys):
    import competition.data.synthetic as synthetic

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_competition", interrupted)
    assert cli_main(["synth", "--preset", "tiny", "--out", "unused"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; run the same command to resume"


def test_train_defaults_to_every_fold_and_every_option_has_help():
    from competition.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train"]).fold == "all"
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"


def test_check_data_reads_the_dataset_from_the_config(tiny_data, capsys):
    code = cli_main(["check-data", "--config", "configs/quick.yaml", "--set", f"paths.data={tiny_data}"])
    assert code == 0 and str(tiny_data) in capsys.readouterr().out


def test_atomic_path_leaves_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "x.json"
    write_json({"v": 1}, target)
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ZeroDivisionError
    assert read_json(target) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("override, key", [("train.batch_size=0", "train.batch_size"), ("train.lr=-1", "train.lr"),
                                           ("zoo.image_size=0", "zoo.image_size"),
                                           ("zoo.validation_share=1.5", "zoo.validation_share")])
def test_an_out_of_range_value_names_its_key_and_source(override, key):
    from competition.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(f"{key} (set in --set {override}): must be")):
        load_config(None, [override])


def test_a_number_where_a_name_is_expected_is_the_name_typed():
    from competition.config import load_config

    assert load_config(None, ["experiment=2024"]).experiment == "2024"


def test_the_default_config_resolves_from_any_folder(tmp_path, monkeypatch):
    from competition.config import load_config

    monkeypatch.chdir(tmp_path)
    assert load_config().experiment == "default"


def test_a_misspelt_zoo_params_model_is_an_error_with_suggestions(tiny_cfg):
    from competition.config import load_config
    from competition.zoo.runner import main as zoo_main

    cfg = load_config("configs/quick.yaml", [f"paths.data={tiny_cfg.paths.data}", f"paths.work={tiny_cfg.paths.work}",
                                             "zoo.params={patchcor-resnet18: {coreset_ratio: 0.5}}"])
    with pytest.raises(ValueError, match="'patchcor-resnet18' in zoo.params; did you mean patchcore-resnet18"):
        zoo_main(cfg, None, "0", False)


@pytest.fixture
def own_data(tiny_data, tmp_path):
    """A writable copy of the tiny set, with folds."""
    import shutil

    from conftest import config_with_folds

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return config_with_folds(data, tmp_path)


def test_a_truncated_test_image_stops_training_before_it_starts(own_data, capsys):
    from competition.classifier.train import main as train_main
    from competition.data.images import ImageReadError
    from competition.folds import write_folds

    test_image = sorted((Path(own_data.paths.data) / "test" / "images").iterdir())[3]
    test_image.write_bytes(test_image.read_bytes()[:120])  # as downloaded: the folds see it this way
    write_folds(own_data)
    with pytest.raises(ImageReadError, match=re.escape(str(test_image))):
        train_main(own_data, "0")
    assert not (Path(own_data.paths.work) / own_data.experiment).exists()  # nothing trained


def test_a_mask_of_another_size_stops_naming_both_files_unless_allowed(own_data, caplog):
    from PIL import Image

    from competition.config import load_config
    from competition.folds import check_stage_inputs, load_index

    mask = sorted((Path(own_data.paths.data) / "train" / "defect_masks").iterdir())[0]
    Image.open(mask).resize((20, 30)).save(mask)
    index = load_index(own_data)
    with pytest.raises(ValueError, match=re.escape(str(mask)) + ".*20x30.*resize_mismatched_masks"):
        check_stage_inputs(own_data, index)
    allowed = load_config("configs/quick.yaml", [f"paths.data={own_data.paths.data}",
                                                 "data.resize_mismatched_masks=true"])
    check_stage_inputs(allowed, index)
    assert "resizing a mask to its image" in caplog.text and mask.name in caplog.text


def test_the_submission_files_land_together_or_not_at_all(tmp_path):
    import pandas as pd

    from competition.ensemble.submission import write_submission

    ids = ["a", "b"]
    submission = pd.DataFrame({"ImageId": ids, "answer": [0, 1]})
    write_submission(submission, ids, tmp_path, "exp", {"v": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError):  # the record fails after the experiment's CSV was already written
        write_submission(submission.assign(answer=[1, 1]), ids, tmp_path, "exp", {"v": object()})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_finished_fold_made_on_other_data_is_refused_not_reused(own_data):
    import shutil

    from competition.folds import write_folds
    from competition.stage import ConfigChangedError
    from competition.zoo.runner import main as zoo_main

    zoo_main(own_data, "padim-resnet18", "0", False)
    normals = Path(own_data.paths.data) / "train" / "normal_images"
    shutil.copy(sorted(normals.iterdir())[0], normals / "normal_extra.png")  # the dataset changes...
    write_folds(own_data)  # ...and the folds are made again, as `make folds` would
    with pytest.raises(ConfigChangedError, match=r"inputs\.train") as info:
        zoo_main(own_data, "padim-resnet18", "0", False)
    assert "--force" in str(info.value)
    zoo_main(own_data, "padim-resnet18", "0", True)  # the way out the message names


def test_a_dataset_moved_to_another_folder_keeps_its_runs(own_data, tmp_path):
    """The data's identity is its fingerprint, not its path: every stage agrees on that."""
    import shutil

    from competition.config import load_config
    from competition.zoo.runner import main as zoo_main

    zoo_main(own_data, "padim-resnet18", "0", False)
    moved = tmp_path / "moved"
    shutil.move(own_data.paths.data, moved)
    cfg = load_config("configs/quick.yaml", [f"paths.data={moved}", f"paths.work={own_data.paths.work}",
                                             f"paths.submissions={own_data.paths.submissions}"])
    summary = Path(own_data.paths.work) / own_data.experiment / "padim-resnet18" / "fold0" / "summary.json"
    written = summary.stat().st_mtime_ns
    zoo_main(cfg, "padim-resnet18", "0", False)
    assert summary.stat().st_mtime_ns == written  # reused, not refitted


def test_missing_ssl_weights_say_to_pretrain_and_name_the_key(tiny_cfg):
    from competition.classifier.train import build_model
    from competition.config import load_config
    from competition.weights import WeightsError

    cfg = load_config("configs/quick.yaml", [f"paths.work={tiny_cfg.paths.work}", "model.pretrained=ssl"])
    with pytest.raises(WeightsError, match=r"^model\.pretrained: .*run `make pretrain`"):
        build_model(cfg)


def test_folds_without_enough_defects_give_advice_that_works(tiny_data, tmp_path, caplog):
    import shutil

    from competition.config import load_config
    from competition.folds import write_folds

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    defects = sorted((data / "train" / "defect_images").iterdir())
    for path in defects[2:]:
        path.unlink()
    cfg = load_config("configs/quick.yaml", [f"paths.data={data}", f"paths.work={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match=r"folds\.n_splits=2"):
        write_folds(cfg)  # 2 defects, 3 folds: the advice names a fold count that works
    write_folds(load_config("configs/quick.yaml", [f"paths.data={data}", f"paths.work={tmp_path / 'runs'}",
                                                   "folds.n_splits=2"]))
    for path in defects[:2]:
        path.unlink()
    write_folds(cfg)  # no defect at all: unstratified folds, so the zoo can still run on the normals
    assert "folds are assigned without stratification" in caplog.text


def test_nested_progress_bars_write_no_cursor_codes_into_a_log():
    import subprocess
    import sys

    # tqdm reads its TQDM_* defaults when it is imported: the CLI sets them before anything imports it.
    program = ("import sys; import competition.commands as cli; assert 'tqdm' not in sys.modules; "
               "cli.plain_progress_when_redirected(); from tqdm import tqdm\n"
               "for _ in tqdm(range(2), desc='outer'):\n    for _ in tqdm(range(2), desc='inner', leave=False): pass")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, check=True)
    assert "outer" in done.stderr and "\x1b[A" not in done.stderr


def test_an_id_with_leading_zeros_stays_as_typed():
    from competition.config import load_config

    assert load_config(None, ["experiment=0012"]).experiment == "0012"  # YAML 1.1 would say 10
    assert load_config(None, ["seed=0"]).seed == 0


def test_a_corrupted_folds_json_says_to_make_the_folds_again(tiny_cfg):
    from competition.folds import StaleFoldsError, folds_paths, read_folds

    meta = folds_paths(tiny_cfg)[1]
    meta.write_text('{"n_splits": 3, "seed"')
    with pytest.raises(StaleFoldsError, match=re.escape(f"cannot read {meta}") + ".*re-run `make folds`"):
        read_folds(tiny_cfg)
