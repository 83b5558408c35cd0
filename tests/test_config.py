"""Config loading: _base_ inheritance, --set overrides, and errors that name key, source and allowed values."""
from pathlib import Path

import pytest
import yaml

from competition.config import Config, ConfigError, config_from_dict, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_loads_and_holds_required_keys():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert isinstance(cfg, Config)
    assert cfg.paths.data and cfg.paths.work and cfg.paths.submissions
    assert cfg.experiment and isinstance(cfg.seed, int) and cfg.folds.n_splits == 5


def test_every_default_yaml_key_matches_the_dataclasses():
    """default.yaml must hold every key: rebuilding from it must equal the dataclass defaults."""
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert config_from_dict(raw).to_dict() == Config().to_dict()
    assert set(raw) == set(Config().to_dict())


def test_base_inheritance_and_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", {"experiment": "b", "train": {"epochs": 3, "lr": 0.1}})
    write(tmp_path / "exp.yaml", {"_base_": base.name, "train": {"epochs": 7}})
    cfg = load_config(tmp_path / "exp.yaml", ["train.lr=0.5", "model.pretrained=false", "zoo.models=[a, b]"])
    assert cfg.experiment == "b" and cfg.train.epochs == 7 and cfg.train.lr == 0.5
    assert cfg.model.pretrained is False and cfg.zoo.models == ["a", "b"]
    assert cfg.train.batch_size == Config().train.batch_size  # untouched keys keep defaults


def test_quick_config_is_based_on_default():
    cfg = load_config(ROOT / "configs" / "quick.yaml")
    assert cfg.experiment == "quick" and cfg.train.epochs < Config().train.epochs


@pytest.mark.parametrize("override, words", [
    ("train.epochz=3", ["unknown key 'train.epochz'", "--set train.epochz=3", "epochs"]),
    ("data.layout=foo", ["data.layout", "'foo'", "'competition'", "'mvtec'"]),
    ("train.epochs=abc", ["train.epochs", "integer"]),
    ("train.amp=3", ["train.amp", "true or false"]),
    ("model.pretrained=true", ["model.pretrained", "local weights path"]),
    ("folds.n_splits=1", ["folds.n_splits", ">= 2"]),
    ("nokey", ["dotted.key=value"]),
])
def test_bad_overrides_name_key_source_and_allowed(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "quick.yaml", [override])
    for word in words:
        assert word in str(err.value)


def test_bad_file_key_names_the_file(tmp_path):
    path = write(tmp_path / "bad.yaml", {"_base_": str(ROOT / "configs" / "default.yaml"), "train": {"epochs": "many"}})
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_values_keep_yaml_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=runs/x") == ("a", "runs/x")
    assert load_config(ROOT / "configs" / "quick.yaml", ["train.lr=3e-3"]).train.lr == 0.003


@pytest.mark.parametrize("value, mode", [("off", "off"), ("false", "off"), ("true", "auto"), ("bf16", "bf16")])
def test_cpu_amp_reads_yaml_booleans_as_off_and_auto(value, mode):  # YAML 1.1 reads a bare off as false
    assert load_config(ROOT / "configs" / "quick.yaml", [f"train.cpu_amp={value}"]).train.cpu_amp == mode
    with pytest.raises(ConfigError, match="train.cpu_amp"):
        load_config(ROOT / "configs" / "quick.yaml", ["train.cpu_amp=fp8"])


def test_resolved_config_round_trips():
    cfg = load_config(ROOT / "configs" / "quick.yaml", ["seed=7"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_known_zoo_models(path):
    from competition.zoo.registry import resolved_params

    cfg = load_config(path)
    for name in cfg.zoo.models:  # unknown names or hyperparameters raise here, not after hours of training
        resolved_params(name, cfg.zoo.params.get(name))
    for name in cfg.zoo.params:
        resolved_params(name, cfg.zoo.params[name])


def test_pretrained_ssl_names_the_experiments_own_pretraining_folder(tmp_path):
    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"paths.work={tmp_path}", "model.pretrained=ssl"])
    assert cfg.model.pretrained == str(tmp_path / "pretrain")
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())).model.pretrained == str(tmp_path / "pretrain")
    assert load_config(ROOT / "configs" / "quick.yaml").model.pretrained is False
