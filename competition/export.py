"""`python -m competition export --format onnx|openvino`: each fold's classifier and zoo models as graphs.

A graph is the model's eager scoring captured once with a dynamic batch axis: the classifier's
`model(images)` -> logits (torch.export), a zoo model's `scoring_module()` -> (scores, maps) (the
TorchScript tracer). OpenVINO graphs are converted from the ONNX one and kept in float32. Each graph is
checked by its runtime against eager torch on a batch of another size before it counts as exported.
Everything around a graph (image
decoding, tiling, letterbox, TTA, the ensemble) stays the same Python; `classifier_forward` and
`zoo_with_runtime` give the callables that `predict --runtime` plugs in. The record
`<work>/<experiment>/_export/<format>.json` says what was exported per (model, fold), and why not.
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from competition.artifacts import load_checkpoint, run_dir, write_json
from competition.config import Config
from competition.zoo.api import AnomalyModel, ZooSettings

FORMATS = ("onnx", "openvino")
RUNTIMES = {"onnxruntime": "onnx", "openvino": "openvino"}
FORMAT_RUNTIMES = {fmt: runtime for runtime, fmt in RUNTIMES.items()}
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
OPSET = 18


# ---------------------------------------------------------------- writing graphs

def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str],
                dynamo: bool) -> Path:
    """`module` run on `example` into an ONNX file whose inputs and outputs share a dynamic batch axis.

    dynamo: torch.export, which keeps sizes read from static dimensions as ints (the classifier's pooled
    mask head); else the TorchScript tracer, which copes with the zoo's Python-built kernels and searches.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    module = module.cpu().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python ints read from static shapes, by design
        if dynamo:
            torch.onnx.export(module, (example,), str(tmp), dynamo=True, input_names=["images"],
                              output_names=output_names, dynamic_shapes=({0: torch.export.Dim("batch")},),
                              opset_version=OPSET, external_data=False, verbose=False,
                              optimize=True)  # folds what onnxruntime's own passes miss: several times faster
        else:
            axes = {name: {0: "batch"} for name in ["images", *output_names]}
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, input_names=["images"],
                              output_names=output_names, dynamic_axes=axes, opset_version=OPSET)
    tmp.replace(path)
    return path


@dataclass
class Exported:
    path: Path
    difference: float  # largest |runtime - eager| of the first output (logits or scores) on a check batch


def export_graph(module: nn.Module, example: torch.Tensor, fold_dir: Path, fmt: str,
                 output_names: list[str], dynamo: bool = False) -> Exported:
    """The graph file of `fmt` in `fold_dir` (model.onnx, or model.xml + model.bin with float32 weights),
    checked by its runtime against `module` on a batch of another size than the traced one."""
    if fmt == "onnx":
        path = export_onnx(module, example, fold_dir / GRAPH_FILES["onnx"], output_names, dynamo)
    else:
        import openvino as ov

        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(module, example, Path(tmp) / "model.onnx", output_names, dynamo)
            graph = ov.convert_model(str(onnx_path))
        path = fold_dir / GRAPH_FILES["openvino"]
        ov.save_model(graph, str(path), compress_to_fp16=False)  # parity with eager needs float32 weights
    check = torch.rand((example.shape[0] + 1,) + tuple(example.shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = module(check)
    eager = eager[0] if isinstance(eager, tuple) else eager
    graph_out = GraphRunner(path, FORMAT_RUNTIMES[fmt])(check)[0]
    return Exported(path, float((graph_out - eager.float()).abs().max()))


# ---------------------------------------------------------------- running graphs

GRAPH_BATCH = 8  # images per call of an exported zoo graph


class GraphRunner:
    """An exported graph on the CPU: a torch batch in, the graph's outputs as CPU torch tensors out.

    Intra-op threads follow `torch.get_num_threads()`, so a graph gets the cores eager torch would.
    """

    def __init__(self, path: Path, runtime: str):
        threads = torch.get_num_threads()
        self.runtime = runtime
        if runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # no arena: a PatchCore batch's distance matrix would otherwise stay reserved in every fold's session
            options.enable_cpu_mem_arena = False
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        elif runtime == "openvino":
            import openvino as ov

            # f32: CPUs with bf16 units would otherwise run the graph in bf16
            self.compiled = ov.Core().compile_model(str(path), "CPU", {
                "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
        else:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.detach().float().cpu().contiguous().numpy()
        if self.runtime == "onnxruntime":
            outputs = self.session.run(None, {"images": x})
        else:
            result = self.compiled(x)
            outputs = [result[out] for out in self.compiled.outputs]
        return tuple(torch.from_numpy(out.copy()) for out in outputs)


def graph_path(fold_dir: Path, runtime: str) -> Path:
    """The exported graph a runtime reads in `fold_dir`; FileNotFoundError naming the command that writes it."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    fmt = RUNTIMES[runtime]
    path = Path(fold_dir) / GRAPH_FILES[fmt]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: export the models first (make export FORMAT={fmt})")
    return path


def classifier_forward(fold_dir: Path, runtime: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fold's exported classifier: normalised (B, 3, S, S) float32 -> (B,) logits on the CPU, as `model(x)`."""
    runner = GraphRunner(graph_path(fold_dir, runtime), runtime)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return runner(images)[0]

    return forward


def zoo_with_runtime(model: AnomalyModel, fold_dir: Path, runtime: str) -> AnomalyModel:
    """The fitted zoo model with its scoring (backbone included, never the feature cache) run by the exported
    graph; tiling, letterbox and reductions stay the model's own Python."""
    if model.scoring_module() is None:
        raise ValueError(f"{model.family} has no exported graph: {model.export_unsupported}; score it eagerly")
    runner = GraphRunner(graph_path(fold_dir, runtime), runtime)
    out = copy.copy(model)
    out.scoring_graph = runner
    # small batches: a graph runtime holds each batch's intermediates (PatchCore's query-by-bank distances grow
    # with the batch) for every fold model at once
    out.settings = dataclasses.replace(model.settings, batch_size=min(model.settings.batch_size, GRAPH_BATCH))
    return out


# ---------------------------------------------------------------- the export stage

@dataclass
class ExportJob:
    """One (model, fold) to export: its folder and the checkpoint the model is read from."""

    model: str
    fold: int
    kind: str  # "classifier" | "zoo"
    fold_dir: Path
    checkpoint: Path
    command: str  # what writes the checkpoint


def export_jobs(cfg: Config) -> list[ExportJob]:
    """Every fold of the classifier and of each `zoo.models` entry; FileNotFoundError listing any missing."""
    jobs = []
    for fold in range(cfg.folds.n_splits):
        out = run_dir(cfg.paths.work, cfg.experiment, cfg.model.name, fold)
        jobs.append(ExportJob(cfg.model.name, fold, "classifier", out, out / "best.pt", f"make train FOLD={fold}"))
    for name in cfg.zoo.models:
        for fold in range(cfg.folds.n_splits):
            out = run_dir(cfg.paths.work, cfg.experiment, name, fold)
            jobs.append(ExportJob(name, fold, "zoo", out, out / "model.pt", f"make zoo MODEL={name} FOLD={fold}"))
    missing = [job for job in jobs if not job.checkpoint.is_file()]
    if missing:
        lines = "\n".join(f"  {job.checkpoint}: run `{job.command}`" for job in missing)
        raise FileNotFoundError(f"export needs every fold's checkpoint; missing:\n{lines}\n"
                                "(zoo models keep model.pt only with zoo.save_models: true)")
    return jobs


def export_classifier(model: nn.Module, image_size: int, fold_dir: Path, fmt: str) -> Exported:
    """A classifier's `model(images)` -> logits as the `fmt` graph in `fold_dir`."""
    example = torch.zeros(2, 3, image_size, image_size)
    return export_graph(model, example, fold_dir, fmt, ["logits"], dynamo=True)


def export_zoo_model(model: AnomalyModel, fold_dir: Path, fmt: str) -> Exported | str:
    """A fitted zoo model's scoring module as the `fmt` graph in `fold_dir`, or the reason it has none."""
    module = model.scoring_module()
    if module is None:
        return model.export_unsupported
    size = model.settings.image_size
    return export_graph(module, torch.rand(2, 3, size, size), fold_dir, fmt, ["scores", "maps"])


def classifier_graph(cfg: Config, job: ExportJob, fmt: str) -> Exported:
    from competition.classifier.train import load_fold_classifier

    model = load_fold_classifier(cfg, job.fold_dir, torch.device("cpu"))
    return export_classifier(model, cfg.model.image_size, job.fold_dir, fmt)


def load_zoo_on_cpu(checkpoint: Path) -> AnomalyModel:
    """A saved zoo model on the CPU with its saved settings, without the feature cache or progress bars."""
    from competition.zoo.registry import load_model

    saved = ZooSettings.from_dict(load_checkpoint(checkpoint)["settings"])
    return load_model(checkpoint, dataclasses.replace(saved, device="cpu", cache_dir=None, progress=False))


def zoo_graph(job: ExportJob, fmt: str) -> Exported | str:
    """The zoo model's graph path, or the reason it has none."""
    return export_zoo_model(load_zoo_on_cpu(job.checkpoint), job.fold_dir, fmt)


def main(cfg: Config, fmt: str) -> int:
    """Export every fold's classifier and zoo models as `fmt` graphs; 0 when every export that can be made was."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    from competition.runtime import configure_threads

    configure_threads(cfg.train.threads)
    jobs = export_jobs(cfg)
    rows = []
    for job in tqdm(jobs, desc=f"export {fmt}", unit="graph"):
        started = time.perf_counter()
        row = {"model": job.model, "fold": job.fold, "kind": job.kind}
        try:
            result = classifier_graph(cfg, job, fmt) if job.kind == "classifier" else zoo_graph(job, fmt)
        except Exception as exc:  # one model failing to trace must not stop the others; the record says why
            row.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        else:
            if isinstance(result, Exported):
                row.update(status="exported", path=str(result.path), check_difference=result.difference)
            else:
                row.update(status="skipped", reason=result)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
    record = Path(cfg.paths.work) / cfg.experiment / "_export" / f"{fmt}.json"
    write_json({"format": fmt, "experiment": cfg.experiment, "models": rows}, record)
    print_table(rows)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"{len(rows) - len(failed)} of {len(rows)} done ({sum(r['status'] == 'exported' for r in rows)} exported); "
          f"record: {record}")
    return 1 if failed else 0


def print_table(rows: list[dict]) -> None:
    width = max([len(r["model"]) for r in rows] + [5])
    print(f"{'model':<{width}}  fold  {'status':<8}  {'check':>8}  path / reason")
    for r in rows:
        check = f"{r['check_difference']:.1e}" if "check_difference" in r else ""
        print(f"{r['model']:<{width}}  {r['fold']:>4}  {r['status']:<8}  {check:>8}  "
              f"{r.get('path') or r.get('reason', '')}")
