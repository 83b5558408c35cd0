"""Local weights, never the network: `false`, a weights file, or a folder holding `<model name>.*`.

Used alike by the classifier, the zoo's feature extractor and pretraining output. Files may be
safetensors or a torch state dict (loaded with `weights_only=True`). Every parameter of the target
backbone must be found with the right shape; only the classification head may be missing or of a
different size (it is then left at its fresh initialisation), as with timm's own pretrained loading.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit the architecture."""


def resolve_weights_path(pretrained: bool | str | None, model_name: str, key: str = "weights") -> Path | None:
    """`false`/None -> None; a file -> itself; a folder -> its `<model_name>.<suffix>` file. Errors name
    `key`, the config key that gave the path."""
    try:
        return _resolve(pretrained, model_name)
    except WeightsError as exc:
        hint = ""
        if Path(str(pretrained)).name == "pretrain":  # `ssl`: this experiment's own pretraining output
            hint = (f"; it is this experiment's self-supervised pretraining output (ssl): run `make pretrain` "
                    f"(python -m competition pretrain --set pretrain.backbone={model_name}) first")
        raise WeightsError(f"{key}: {exc}{hint}") from None


def _resolve(pretrained: bool | str | None, model_name: str) -> Path | None:
    if pretrained in (False, None, ""):
        return None
    if pretrained is True:
        raise WeightsError("pretrained: true would need a download; give a local weights path or false")
    path = Path(str(pretrained)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for suffix in WEIGHT_SUFFIXES:
            candidate = path / f"{model_name}{suffix}"
            if candidate.is_file():
                return candidate
        raise WeightsError(
            f"weights folder {path} holds no {model_name}{{{','.join(WEIGHT_SUFFIXES)}}}; "
            f"expected a file named after the model, e.g. {path / (model_name + '.safetensors')}")
    raise WeightsError(f"weights path {path} does not exist; give an existing file, a folder, or false")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format, pickled objects refused by weights_only
        raise WeightsError(f"cannot read weights {path}: {exc}") from exc
    for key in ("state_dict", "model", "backbone"):  # checkpoint dicts that wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return state


def write_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write safetensors atomically (the pretraining output format)."""
    from safetensors.torch import save_file

    from competition.artifacts import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return Path(path)


def _strip_prefixes(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (`module.`, `backbone.`, ...) while that makes more keys match."""
    best = state
    best_hits = len(target_keys & set(state))
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if any(k.startswith(prefix) for k in best):
                stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in best.items()}
                hits = len(target_keys & set(stripped))
                if hits > best_hits:
                    best, best_hits, changed = stripped, hits, True
    return best


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classification head's parameters (timm's `get_classifier`), which may be re-initialised."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return set()
    head = get_classifier()
    if not isinstance(head, nn.Module):
        return set()
    head_ids = {id(p) for p in head.parameters()} | {id(b) for b in head.buffers()}
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    return {name for name, t in named.items() if id(t) in head_ids}


def load_weights_into(model: nn.Module, path: str | Path, model_name: str = "") -> list[str]:
    """Load a state dict into `model`; every non-head tensor must exist with the same shape.

    Returns the head keys that were left at their initialisation. Raises WeightsError naming the
    missing or mis-shaped keys and the architecture that was expected.
    """
    target = model.state_dict()
    state = _strip_prefixes(read_state_dict(path), set(target))
    head = head_parameter_names(model)
    missing, mismatched, loadable, skipped_head = [], [], {}, []
    for key, tensor in target.items():
        if key.endswith("num_batches_tracked") and key not in state:
            continue
        source = state.get(key)
        if source is None:
            (skipped_head if key in head else missing).append(key)
        elif tuple(source.shape) != tuple(tensor.shape):
            if key in head:
                skipped_head.append(key)
            else:
                mismatched.append(f"{key}: file {tuple(source.shape)} vs model {tuple(tensor.shape)}")
        else:
            loadable[key] = source
    if missing or mismatched:
        arch = model_name or type(model).__name__
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if mismatched:
            detail.append(f"{len(mismatched)} of the wrong shape (e.g. {'; '.join(mismatched[:3])})")
        raise WeightsError(
            f"weights {path} do not fit {arch}: {' and '.join(detail)}. Expected a state dict of "
            f"{arch} (as written by `competition pretrain` or timm's {arch}), with {len(target)} tensors.")
    model.load_state_dict(loadable, strict=False)
    if skipped_head:
        log.info("weights %s: head %s left at initialisation", path, ", ".join(skipped_head))
    return skipped_head


def load_local_weights(model: nn.Module, pretrained: bool | str | None, model_name: str,
                       key: str = "weights") -> Path | None:
    """Resolve `pretrained` (given by config key `key`) for `model_name` and load it into `model`; returns the
    file used or None."""
    path = resolve_weights_path(pretrained, model_name, key)
    if path is not None:
        load_weights_into(model, path, model_name)
    return path
