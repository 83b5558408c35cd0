"""`python -m competition report`: one static HTML page per experiment, `submissions/<experiment>_report/`.

The page reads only what the stages wrote (run folders, the stacker's `_ensemble/`, the submission
record) and draws the rest with `competition.plots`. Every image is a PNG under `assets/` linked by a
relative path, so the folder opens from disk, zipped or moved, without a server or a network.
What is missing (no ensemble yet, a model without training history) is said on the page with the
command that makes it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import math
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from competition.artifacts import read_json, read_table, write_text
from competition.config import Config
from competition.ensemble.gather import fold_folders, make_command, model_names
from competition.ensemble.infer import ENSEMBLE_DIR
from competition.ensemble.prior import PriorDecision
from competition.leaderboard import collect_rows, markdown_table, read_answers
from competition.plots import (
    plot_image_with_map,
    plot_leaderboard,
    plot_macro_f1_by_share,
    plot_roc_pr_curves,
    plot_score_histogram,
    plot_training_curves,
)

REPORT_SUFFIX = "_report"
ASSETS = "assets"
IMAGES_SHOWN = 12  # per gallery of single images: mistakes of each kind, highest-scoring test images

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1500px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
tr.ensemble td { background: #fff3e0; font-weight: 600; }
.facts td { text-align: left; } .facts th { text-align: left; width: 220px; }
.missing { background: #fff8d6; border-left: 4px solid #e0b000; padding: 6px 10px; margin: 6px 0; }
.note { color: #555; font-size: 13px; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 12px; color: #444; overflow-wrap: anywhere; }
img { max-width: 100%; border: 1px solid #ddd; }
.tile figcaption { max-width: 230px; } .tile img { width: 230px; }
.fold img { width: 640px; } .fold figcaption { max-width: 640px; }
.wide img { max-width: 1100px; } .wide figcaption { max-width: 1100px; }
nav { font-size: 14px; margin: 8px 0; } nav a { margin-right: 14px; }
code { background: #f4f4f4; padding: 0 3px; }
"""


class ReportError(FileNotFoundError):
    """The experiment has no runs to report on."""


@dataclass
class Page:
    """The report being built: html sections in order and the PNGs written under `assets/`."""

    out: Path
    sections: list[str] = field(default_factory=list)
    titles: list[tuple[str, str]] = field(default_factory=list)  # (anchor, title) of each section
    missing: list[str] = field(default_factory=list)
    assets: set[str] = field(default_factory=set)

    def asset(self, name: str) -> Path:
        """Where to write asset `name` (a file name without folders); remembered as used."""
        self.assets.add(name)
        return self.out / ASSETS / name

    def copy(self, source: Path, name: str) -> str:
        shutil.copyfile(source, self.asset(name))
        return name

    def add(self, title: str, *parts: str) -> None:
        anchor = f"s{len(self.sections)}"
        self.titles.append((anchor, title))
        self.sections.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>\n' + "\n".join(p for p in parts if p))

    def lack(self, what: str, command: str = "") -> str:
        """A missing piece: said where it would be and listed at the top of the page."""
        text = html.escape(what) + (f" Make it with <code>{html.escape(command)}</code>." if command else "")
        self.missing.append(text)
        return f'<p class="missing">{text}</p>'


@dataclass
class Ensemble:
    """What `infer` wrote for the experiment: its record and the stacker's out-of-fold and test scores."""

    record: dict
    oof: pd.DataFrame  # image_id, label, fold, one column per model, score
    test: pd.DataFrame  # image_id, one column per model, score, answer


def report_dir(cfg: Config) -> Path:
    return Path(cfg.paths.submissions) / f"{cfg.experiment}{REPORT_SUFFIX}"


def _img(name: str, caption: str = "", css: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    src = f"{ASSETS}/{quote(name)}"  # a click opens the PNG at full size
    return f'<figure class="{css}"><a href="{src}"><img src="{src}" alt="{html.escape(name)}"></a>{cap}</figure>'


def _row(figures: list[str]) -> str:
    return '<div class="row">' + "\n".join(figures) + "</div>" if figures else ""


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------ reading

def read_ensemble(cfg: Config) -> Ensemble | None:
    """The experiment's ensemble, or None when `infer` has not run for it (or ran for other models)."""
    folder = Path(cfg.paths.work) / cfg.experiment / ENSEMBLE_DIR
    record_path = Path(cfg.paths.submissions) / f"{cfg.experiment}.json"
    paths = [record_path, folder / "oof.csv", folder / "test.csv"]
    if not all(p.is_file() for p in paths):
        return None
    record = read_json(record_path)
    if not isinstance(record, dict) or not isinstance(record.get("cv"), dict):
        return None
    return Ensemble(record, read_table(paths[1]), read_table(paths[2]))


def read_answer_key(cfg: Config) -> pd.DataFrame | None:
    path = Path(cfg.paths.data) / "answers.csv"
    return read_answers(path) if path.is_file() else None


def oof_curves(cfg: Config, table: pd.DataFrame, ensemble: Ensemble | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (labels, out-of-fold scores)} of every finished model, as the stacker saw them, and the ensemble."""
    from competition.ensemble.gather import read_model
    from competition.ensemble.stacking import level2_features

    curves = {}
    for name in table.loc[table["kind"] == "model", "model"]:
        if ensemble is not None and name in ensemble.oof.columns:
            curves[name] = (ensemble.oof["label"].to_numpy(int), ensemble.oof[name].to_numpy(float))
            continue
        model_path = Path(cfg.paths.work) / cfg.experiment / name
        model = read_model(model_path, sorted(fold_folders(model_path)))
        oof, _ = level2_features([model], cfg.ensemble.normalise)
        curves[name] = (oof["label"].to_numpy(int), oof[name].to_numpy(float))
    if ensemble is not None:
        curves["ensemble"] = (ensemble.oof["label"].to_numpy(int), ensemble.oof["score"].to_numpy(float))
    return curves


# ------------------------------------------------------------------------------------ sections

def headline(page: Page, cfg: Config, ensemble: Ensemble | None) -> str:
    rows = [("experiment", html.escape(cfg.experiment)),
            ("runs", html.escape(str(Path(cfg.paths.work) / cfg.experiment))),
            ("data", html.escape(str(cfg.paths.data)))]
    if ensemble is None:  # said in the page's list of missing pieces
        record_path = Path(cfg.paths.submissions) / f"{cfg.experiment}.json"
        page.lack(f"No ensemble for experiment {cfg.experiment!r} yet (no {record_path}): no submission facts, "
                  "stacker threshold or mistakes.", "make infer (python -m competition infer)")
        return _facts(rows)
    record = ensemble.record
    cv = record["cv"]
    n_test, n_defect = record.get("n_test"), record.get("n_test_defect_predicted")
    share = f"{n_defect} of {n_test} ({n_defect / n_test:.1%})" if n_test else "–"
    rows += [("submission", html.escape(str(Path(cfg.paths.submissions) / f"{cfg.experiment}.csv"))),
             ("stacker", html.escape(f"{record.get('method', '?')} over {', '.join(record.get('models', []))} "
                                     f"({record.get('normalise', '?')}-normalised)")),
             ("test threshold", _fmt(record.get("threshold"))),
             ("test images predicted defective", share),
             ("out-of-fold threshold", _fmt(cv.get("threshold"))),
             ("OOF macro-F1 / AUROC", f"{_fmt(cv.get('oof_macro_f1'))} / {_fmt(cv.get('oof_auroc'))}"),
             ("per-fold macro-F1", f"{_fmt(cv.get('cv_mean'))} ± {_fmt(cv.get('cv_std'))}")]
    prior = record.get("prior")
    if isinstance(prior, dict) and prior:
        try:
            described = PriorDecision(**prior).describe()
        except TypeError:
            described = str(prior)
        rows += [("estimated test defect share", _fmt(prior.get("test_share"), 3)),
                 ("training defect share", _fmt(prior.get("train_share"), 3)),
                 ("threshold choice", html.escape(described))]
    return _facts(rows)


def _facts(rows: list[tuple[str, str]]) -> str:
    return '<table class="facts">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def html_table(markdown: str, kinds: list[str]) -> str:
    """The leaderboard's markdown table (`leaderboard.markdown_table`) as HTML, ensemble rows highlighted."""
    lines = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    header, body = lines[0], lines[2:]
    text_columns = {i for i, name in enumerate(header) if name.strip() in ("experiment", "model", "per-fold macro-F1")}

    def cells(values: list[str], tag: str) -> str:
        return "".join(f'<{tag}{" class=text" if i in text_columns else ""}>{html.escape(v.strip())}</{tag}>'
                       for i, v in enumerate(values))

    rows = [f'<tr class="{kind}">{cells(values, "td")}</tr>' for values, kind in zip(body, kinds)]
    return f"<table><tr>{cells(header, 'th')}</tr>" + "".join(rows) + "</table>"


def leaderboard_section(page: Page, cfg: Config, table: pd.DataFrame, notes: list[str],
                        answers: pd.DataFrame | None) -> None:
    if table.empty:
        page.add("Leaderboard", page.lack(f"No finished model under {Path(cfg.paths.work) / cfg.experiment}.",
                                          "make train and make zoo"))
        return
    plot_leaderboard(table, page.asset("leaderboard.png"))
    key = ("" if answers is not None else
           f'<p class="note">No answer key at {html.escape(str(Path(cfg.paths.data) / "answers.csv"))}: '
           "no Public/Private columns.</p>")
    listed = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page.add("Leaderboard", html_table(markdown_table(table), list(table["kind"])), key,
             f'<ul class="note">{listed}</ul>' if listed else "", _img("leaderboard.png", css="wide"))


def threshold_section(page: Page, cfg: Config, curves: dict, ensemble: Ensemble | None) -> None:
    parts = []
    if ensemble is not None:
        stacker_plot = Path(cfg.paths.work) / cfg.experiment / ENSEMBLE_DIR / "threshold.png"
        if stacker_plot.is_file():
            parts.append(_img(page.copy(stacker_plot, "ensemble_threshold.png"),
                              "The stacker: out-of-fold macro-F1 against its threshold, and its score "
                              "distributions (out-of-fold and test).", "wide"))
    if curves:
        labels = next(iter(curves.values()))[0]
        marks = {"training defect share": float(np.mean(labels))}
        if ensemble is not None and ensemble.record.get("n_test"):
            marks["submitted share"] = ensemble.record["n_test_defect_predicted"] / ensemble.record["n_test"]
        plot_macro_f1_by_share(curves, page.asset("macro_f1_by_share.png"), marks,
                               "out-of-fold macro-F1 by share called defective")
        parts.append(_img("macro_f1_by_share.png", "Every model and the ensemble: a threshold is a share of "
                          "images called defective, which compares across models.", "wide"))
    page.add("Out-of-fold macro-F1 against threshold", *parts)


def curves_section(page: Page, curves: dict) -> None:
    if not curves:
        return
    plot_roc_pr_curves(curves, page.asset("roc_pr.png"), "out-of-fold scores")
    figures = []
    for i, (name, (labels, scores)) in enumerate(curves.items()):
        asset = f"histogram_{i:02d}_{_slug(name)}.png"
        plot_score_histogram({"normal": scores[labels == 0], "defect": scores[labels == 1]}, page.asset(asset),
                             f"{name}: out-of-fold scores")
        figures.append(_img(asset, html.escape(name), "fold"))
    page.add("ROC and precision-recall", _img("roc_pr.png", css="wide"))
    page.add("Score histograms", '<p class="note">Out-of-fold scores as the stacker sees them (normalised per '
             "fold model).</p>", _row(figures))


def training_section(page: Page, cfg: Config, names: list[str]) -> None:
    parts = []
    for name in names:
        figures, lacking = [], []
        for k, fold_path in fold_folders(Path(cfg.paths.work) / cfg.experiment / name).items():
            asset = f"curves_{_slug(name)}_fold{k}.png"
            history_path = fold_path / "history.csv"
            if (fold_path / "curves.png").is_file():
                page.copy(fold_path / "curves.png", asset)
            elif history_path.is_file():
                history = pd.read_csv(history_path)
                losses = tuple(c for c in history.columns if c.endswith("loss"))
                scores = tuple(c for c in history.columns if c.startswith("val_") and not c.endswith("loss"))
                best = _summary(fold_path).get("best_epoch")
                plot_training_curves(history, page.asset(asset), f"{name} fold {k}", losses, scores,
                                     best if isinstance(best, int) else None)
            else:
                lacking.append(k)
                continue
            figures.append(_img(asset, f"fold {k}", "fold"))
        if figures:
            parts.append(f"<h3>{html.escape(name)}</h3>" + _row(figures))
            if lacking:
                parts.append(page.lack(f"{name}: no history.csv in fold folder(s) {', '.join(map(str, lacking))}; "
                                       f"to redo them: {make_command(cfg, name, lacking, force=True)}."))
        elif name == cfg.model.name:
            folds = sorted(fold_folders(Path(cfg.paths.work) / cfg.experiment / name))
            parts.append(page.lack(f"{name}: no history.csv in its fold folders; to redo them: "
                                   f"{make_command(cfg, name, folds, force=True)}."))
        else:
            parts.append(f'<p class="note">{html.escape(name)}: no history.csv in its fold folders (zoo models '
                         "fitted in one pass have none).</p>")
    page.add("Training curves per fold", *parts)


def _summary(fold_path: Path) -> dict:
    try:
        summary = read_json(fold_path / "summary.json")
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def galleries_section(page: Page, cfg: Config, names: list[str], maps: MapSource, ensemble: Ensemble | None,
                      index: pd.DataFrame | None, answers: pd.DataFrame | None) -> None:
    parts = []
    if ensemble is not None:
        top = ensemble.test.sort_values("score", ascending=False, kind="stable").head(IMAGES_SHOWN)
        truth = {} if answers is None else answers.set_index("ImageId")["answer"].to_dict()
        captions = {row.image_id: f"score {row.score:.3g}, submitted {int(row.answer)}"
                    + (f", true {truth[row.image_id]}" if row.image_id in truth else "") for row in top.itertuples()}
        note = html.escape(maps.describe_test())
        tiles = image_tiles(page, "test", list(top["image_id"]), captions, maps.test_fold(), maps, index)
        parts.append(f"<h3>Ensemble: highest-scoring test images</h3><p class='note'>{note}</p>"
                     + _row([figure for _, figure in tiles]))
    for name in names:
        figures = []
        for k, fold_path in fold_folders(Path(cfg.paths.work) / cfg.experiment / name).items():
            for file, what in (("gallery.png", "highest-scoring test images"), ("maps.png", "validation maps")):
                if (fold_path / file).is_file():
                    asset = page.copy(fold_path / file, f"{file[:-4]}_{_slug(name)}_fold{k}.png")
                    figures.append(_img(asset, f"fold {k}: {what} (click for full size)", "fold"))
        if figures:
            parts.append(f"<h3>{html.escape(name)}</h3>" + _row(figures))
    page.add("Galleries", *parts)


def mistakes(ensemble: Ensemble) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """(false negatives, most confident first; false positives, most confident first; threshold) of the
    ensemble's out-of-fold scores at its out-of-fold threshold."""
    threshold = float(ensemble.record["cv"]["threshold"])
    oof = ensemble.oof
    called = oof["score"] >= threshold
    misses = oof[(oof["label"] == 1) & ~called].sort_values("score", kind="stable")
    false_alarms = oof[(oof["label"] == 0) & called].sort_values("score", ascending=False, kind="stable")
    return misses, false_alarms, threshold


def mistakes_section(page: Page, ensemble: Ensemble | None, maps: MapSource, index: pd.DataFrame | None) -> None:
    if ensemble is None:
        page.add("Mistakes of the out-of-fold predictions",
                 '<p class="note">No ensemble yet (see the top of the page).</p>')
        return
    misses, false_alarms, threshold = mistakes(ensemble)
    models = [c for c in ensemble.record.get("models", []) if c in ensemble.oof.columns]
    parts = [f'<p class="note">The ensemble\'s out-of-fold scores at its out-of-fold threshold {threshold:.4g}: '
             f"{len(misses)} false negative(s), {len(false_alarms)} false positive(s); the most confident "
             f"{IMAGES_SHOWN} of each are shown. "
             f"{html.escape(maps.describe_oof())}</p>"]
    for title, kind, rows in (("False negatives (defects called normal)", "fn", misses),
                              ("False positives (normals called defective)", "fp", false_alarms)):
        rows = rows.head(IMAGES_SHOWN)
        captions = {row["image_id"]: f"fold {row['fold']}, ensemble {row['score']:.3g}; "
                    + ", ".join(f"{m} {row[m]:.2f}" for m in models) for _, row in rows.iterrows()}
        tiles = [tile for fold, part in rows.groupby("fold", sort=False)
                 for tile in image_tiles(page, kind, list(part["image_id"]), captions, int(fold), maps, index)]
        order = {image_id: i for i, image_id in enumerate(rows["image_id"])}
        tiles.sort(key=lambda t: order[t[0]])
        body = _row([t[1] for t in tiles]) if tiles else '<p class="note">None.</p>'
        parts.append(f'<h3 id="{kind}">{title}</h3>' + body)
    page.add("Mistakes of the out-of-fold predictions", *parts)


# ------------------------------------------------------------------------------------ anomaly maps

class MapSource:
    """Anomaly maps from one zoo model's saved fold models (`model.pt`): the zoo model with the best
    out-of-fold AUROC among those that kept them. An image is mapped by the fold model that held it out."""

    def __init__(self, cfg: Config, table: pd.DataFrame):
        self.cfg, self.name, self.folds = cfg, None, {}
        ranked = table[table["kind"] == "model"].sort_values("oof_auroc", ascending=False, na_position="last")
        for name in list(ranked["model"]) + model_names(cfg.paths.work, cfg.experiment):
            folds = {k: p / "model.pt" for k, p in fold_folders(Path(cfg.paths.work) / cfg.experiment / name).items()
                     if (p / "model.pt").is_file()}
            if folds:
                self.name, self.folds = name, folds
                break
        self._loaded = {}

    def describe_oof(self) -> str:
        if self.name is None:
            return ("No zoo model of this experiment kept its fitted fold models (model.pt, zoo.save_models), "
                    "so images are shown without anomaly maps; `make zoo` writes them.")
        return (f"Maps (right of each image) by {self.name}, from the fold model that held the image out; "
                "one colour scale per fold model.")

    def describe_test(self) -> str:
        if self.name is None:
            return "Without anomaly maps: no zoo model of this experiment kept model.pt (`make zoo` writes it)."
        return f"Maps by {self.name} fold {self.test_fold()}."

    def test_fold(self) -> int:
        return min(self.folds) if self.folds else 0

    def model(self, fold: int):
        """The fitted fold model, on the configured device without progress bars; None if not kept."""
        if fold not in self.folds:
            return None
        if fold not in self._loaded:
            from competition.artifacts import load_checkpoint
            from competition.runtime import configure_threads, select_device
            from competition.zoo.api import ZooSettings
            from competition.zoo.registry import load_model

            configure_threads(self.cfg.train.threads)
            path = self.folds[fold]
            saved = ZooSettings.from_dict(load_checkpoint(path)["settings"])
            settings = dataclasses.replace(saved, device=str(select_device(self.cfg.device)), progress=False,
                                           cache_dir=None)
            self._loaded[fold] = load_model(path, settings)
        return self._loaded[fold]


def image_tiles(page: Page, kind: str, image_ids: list[str], captions: dict[str, str], fold: int,
                maps: MapSource, index: pd.DataFrame | None) -> list[tuple[str, str]]:
    """[(image id, html figure)] in the order given: each image beside its anomaly map from fold model `fold`,
    when that fold kept its model."""
    from competition.preprocess import fit_to_canvas
    from competition.zoo.api import ImageSet

    if not image_ids:
        return []
    paths = index.set_index("image_id")["path"] if index is not None else pd.Series(dtype=str)
    known = [i for i in image_ids if i in paths.index and Path(paths[i]).is_file()]
    figures = {i: f'<figure class="tile"><figcaption><b>{html.escape(i)}</b><br>not in the dataset index, or its '
                  f"file is gone</figcaption></figure>" for i in image_ids if i not in known}
    if not known:
        return list(figures.items())
    images = ImageSet([paths[i] for i in known], known)
    model = maps.model(fold)
    if model is None:
        shown, anomaly_maps, scale = [images.read(j) for j in range(len(images))], [None] * len(known), None
    else:
        anomaly_maps = list(model.anomaly_maps(images))
        whole_image = dataclasses.replace(model.settings.geometry, tiles=False)  # tiled maps come back stitched
        shown = [fit_to_canvas(images.read(j), whole_image)[0] for j in range(len(images))]
        scale = (min(float(m.min()) for m in anomaly_maps), max(float(m.max()) for m in anomaly_maps))
    for image_id, image, anomaly_map in zip(known, shown, anomaly_maps):
        digest = hashlib.sha1(image_id.encode()).hexdigest()[:6]  # ids that differ only in "/" vs "_" stay apart
        asset = f"{kind}_{_slug(image_id)}_{digest}.png"
        plot_image_with_map(image, anomaly_map, page.asset(asset), scale)
        caption = f"<b>{html.escape(image_id)}</b><br>{html.escape(captions.get(image_id, ''))}"
        figures[image_id] = _img(asset, caption, "tile")
    return [(i, figures[i]) for i in image_ids]


# ------------------------------------------------------------------------------------ page

def render(page: Page, cfg: Config, head: str) -> str:
    nav = "<nav>" + "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in page.titles) + "</nav>"
    missing = ""
    if page.missing:
        missing = ("<h2>Missing</h2><ul>" + "".join(f"<li>{m}</li>" for m in page.missing) + "</ul>")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(cfg.experiment)}: report</title><style>{CSS}</style></head><body>\n"
            f"<h1>Experiment {html.escape(cfg.experiment)}</h1><p class='note'>written {stamp} by "
            f"<code>python -m competition report</code></p>\n{nav}\n{head}\n{missing}\n" + "\n".join(page.sections)
            + "\n</body></html>\n")


def main(cfg: Config) -> Path:
    """Write `submissions/<experiment>_report/index.html` and its assets; print and return its path."""
    root = Path(cfg.paths.work) / cfg.experiment
    names = model_names(cfg.paths.work, cfg.experiment)
    if not names:
        raise ReportError(f"no runs of experiment {cfg.experiment!r} under {root}: nothing to report; run "
                          f"`make all` (or `make train`, `make zoo` and `make infer`) with this config first")
    page = Page(report_dir(cfg))
    (page.out / ASSETS).mkdir(parents=True, exist_ok=True)
    answers = read_answer_key(cfg)
    table, notes = collect_rows(cfg, answers)
    if not table.empty:
        table = table[table["experiment"] == cfg.experiment].reset_index(drop=True)
        table["rank"] = np.arange(1, len(table) + 1)
    notes = [n for n in notes if n.startswith(f"{cfg.experiment}/")]
    ensemble = read_ensemble(cfg)
    try:
        from competition.folds import load_index

        index = load_index(cfg)
    except (FileNotFoundError, ValueError) as exc:
        index = None
        page.lack(f"The dataset at {cfg.paths.data} could not be read ({exc}): images are left out.")

    head = headline(page, cfg, ensemble)
    leaderboard_section(page, cfg, table, notes, answers)
    curves = oof_curves(cfg, table, ensemble) if not table.empty else {}
    threshold_section(page, cfg, curves, ensemble)
    curves_section(page, curves)
    training_section(page, cfg, names)
    maps = MapSource(cfg, table)
    galleries_section(page, cfg, names, maps, ensemble, index, answers)
    mistakes_section(page, ensemble, maps, index)

    path = write_text(page.out / "index.html", render(page, cfg, head))
    for stale in (page.out / ASSETS).iterdir():  # assets of an earlier report that this one does not show
        if stale.is_file() and stale.name not in page.assets:
            stale.unlink()
    print(path)
    return path
