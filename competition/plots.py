"""Every figure the stages write: training curves, ROC and PR, confusion matrix, the zoo's score
histograms and anomaly-map galleries, the stacker's threshold, the pretraining monitor, the leaderboard.

Matplotlib with the Agg backend (no display needed), chosen here and nowhere else; every figure goes
through `artifacts.save_figure`, so it is written atomically and closed.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from competition.artifacts import save_figure  # noqa: E402
from competition.metrics import aupr, auroc, binary_metrics, macro_f1_curve  # noqa: E402


def plot_training_curves(history: pd.DataFrame, path: str | Path, title: str = "",
                         loss_columns: tuple[str, ...] = ("train_loss", "val_loss"),
                         score_columns: tuple[str, ...] = ("val_macro_f1", "val_macro_f1_at_05", "val_auroc"),
                         best_epoch: int | None = None) -> Path:
    """Loss curves on the left, validation scores on the right, one point per epoch.

    Columns missing from `history` are skipped, so any trained model can reuse this.
    """
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = history["epoch"] if "epoch" in history else np.arange(len(history))
    for column in loss_columns:
        if column in history:
            ax_loss.plot(epochs, history[column], marker="o", label=column)
    for column in score_columns:
        if column in history:
            ax_score.plot(epochs, history[column], marker="o", label=column)
    for ax, ylabel in ((ax_loss, "loss"), (ax_score, "score")):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_score.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_roc_pr(labels, scores, path: str | Path, title: str = "") -> Path:
    """ROC (with AUROC) and precision-recall (with average precision) of one scorer: `plot_roc_pr_curves`'s
    single-curve case."""
    return plot_roc_pr_curves({"model": (labels, scores)}, path, title)


def plot_confusion(labels, scores, threshold: float, path: str | Path, title: str = "") -> Path:
    """Confusion matrix (rows: truth, columns: prediction) when score >= threshold is called defect."""
    m = binary_metrics(labels, scores, threshold)
    matrix = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black", fontsize=12)
    ax.set_xticks([0, 1], ["normal", "defect"])
    ax.set_yticks([0, 1], ["normal", "defect"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"threshold {threshold:.3g}: macro-F1 {m['macro_f1']:.3f}", fontsize=10)
    return save_figure(fig, path)


def plot_score_histogram(groups: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Overlaid score histograms, one per group (normal, defect, painted...), on shared bins."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = [np.asarray(v, float) for v in groups.values() if len(v)]
    if values:
        everything = np.concatenate(values)
        bins = np.linspace(everything.min(), everything.max() + 1e-12, 30)
        for (name, v), colour in zip(groups.items(), ["tab:blue", "tab:red", "tab:orange", "tab:green"]):
            if len(v):
                ax.hist(v, bins=bins, alpha=0.55, color=colour, label=f"{name} ({len(v)})", density=True)
        ax.legend()
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("density")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_gallery(images: list[np.ndarray], maps: np.ndarray, captions: list[str], path: str | Path,
                 title: str = "", columns: int = 4) -> Path:
    """Each image beside its anomaly map overlay (one colour scale for the whole gallery)."""
    return plot_maps_gallery(images, list(maps), captions, path, title, columns)


def plot_maps_gallery(images: list[np.ndarray], maps: list[np.ndarray], captions: list[str], path: str | Path,
                      title: str = "", columns: int = 4) -> Path:
    """Each image beside its map overlay, maps at their image's size (sizes may differ), one colour scale."""
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.0 * 2 * columns, 2.2 * rows), squeeze=False)
    low = min((float(np.min(m)) for m in maps), default=0.0)
    high = max((float(np.max(m)) for m in maps), default=1.0)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, columns)
        axes[r, 2 * c].imshow(images[i])
        axes[r, 2 * c].set_title(captions[i], fontsize=7)
        axes[r, 2 * c + 1].imshow(images[i])
        axes[r, 2 * c + 1].imshow(maps[i], cmap="jet", alpha=0.5, vmin=low, vmax=high)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_stacker_threshold(labels, scores, test_scores, threshold: float, oof_macro_f1: float,
                           path: str | Path) -> Path:
    """Out-of-fold macro-F1 against the threshold (the chosen one marked) and the score histograms."""
    labels, scores = np.asarray(labels, int), np.asarray(scores, float)
    test_scores = np.asarray(test_scores, float)
    cuts, f1 = macro_f1_curve(labels, scores)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.step(cuts, f1[:-1], where="pre", color="tab:blue")
    left.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.4g}")
    left.set(xlabel="stacker score threshold (defect if >=)", ylabel="out-of-fold macro-F1",
             title=f"nested OOF macro-F1 {oof_macro_f1:.4f}")
    left.legend()
    bins = np.histogram_bin_edges(np.concatenate([scores, test_scores]), bins=40)
    right.hist(scores[labels == 0], bins=bins, alpha=0.6, density=True, label="OOF normal")
    right.hist(scores[labels == 1], bins=bins, alpha=0.6, density=True, label="OOF defect")
    right.hist(test_scores, bins=bins, histtype="step", density=True, color="black", label="test")
    right.axvline(threshold, color="tab:red", linestyle="--")
    right.set(xlabel="stacker score", ylabel="density", title="score distributions")
    right.legend()
    return save_figure(fig, path)


def plot_pretraining_curves(history: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Pretraining loss per epoch and the label-free k-NN monitor's AUROC (epoch 0: before training)."""
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.6))
    trained = history[history["epoch"] > 0]
    ax_loss.plot(trained["epoch"], trained["train_loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="loss (weighted sum)", title="pretraining loss")
    ax_auc.plot(history["epoch"], history["monitor_auroc"], marker="o", color="tab:green")
    ax_auc.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax_auc.set(xlabel="epoch (0 = before training)", ylabel="AUROC", ylim=(0.0, 1.0),
               title="k-NN monitor: normal vs painted")
    for ax in (ax_loss, ax_auc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_leaderboard(table: pd.DataFrame, path: str | Path) -> Path:
    """Bars: out-of-fold macro-F1; whiskers: per-fold mean ± std; markers: Public and Private."""
    rows = table.iloc[::-1]  # best at the top
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(rows)))
    colors = ["tab:orange" if kind == "ensemble" else "tab:blue" for kind in rows["kind"]]
    ax.barh(y, rows["oof_macro_f1"], color=colors, alpha=0.75, label="OOF macro-F1")
    ax.errorbar(rows["cv_mean"], y, xerr=rows["cv_std"].fillna(0), fmt="o", color="black", ms=3,
                label="per-fold mean ± std")
    if rows["public"].notna().any():
        ax.scatter(rows["public"], y, marker="^", color="tab:green", zorder=3, label="Public")
    if rows["private"].notna().any():
        ax.scatter(rows["private"], y, marker="s", color="tab:red", zorder=3, label="Private")
    ax.set_yticks(y, [f"{e} / {m}" for e, m in zip(rows["experiment"], rows["model"])], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("macro-F1")
    ax.set_title("local leaderboard (orange: stacked ensembles)")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_roc_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """ROC and precision-recall of several scorers of the same images, overlaid: {name: (labels, scores)}."""
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.4))
    prevalence = None
    for name, (labels, scores) in curves.items():
        labels, scores = np.asarray(labels, int), np.asarray(scores, float)
        if not 0 < labels.sum() < len(labels):
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax_roc.plot(fpr, tpr, label=f"{name}: {auroc(labels, scores):.3f}")
        precision, recall, _ = precision_recall_curve(labels, scores)
        ax_pr.plot(recall, precision, label=f"{name}: {aupr(labels, scores):.3f}")
        prevalence = labels.mean()
    if prevalence is not None:
        ax_pr.axhline(prevalence, color="grey", linestyle=":", label=f"prevalence {prevalence:.3f}")
    else:
        for ax in (ax_roc, ax_pr):
            ax.text(0.5, 0.5, "one class only: undefined", ha="center", va="center")
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (legend: AUROC)",
               xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (legend: average precision)",
              xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_macro_f1_by_share(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                           marks: dict[str, float] | None = None, title: str = "") -> Path:
    """Macro-F1 against the share of images called defective, one line per scorer: {name: (labels, scores)}.

    The share, unlike a threshold, means the same for every scorer, so the lines compare directly.
    `marks` draws vertical lines at given shares (the true defect share, a submission's share).
    """
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, (labels, scores) in curves.items():
        labels, scores = np.asarray(labels, int), np.asarray(scores, float)
        if not len(labels):
            continue
        cuts, f1 = macro_f1_curve(labels, scores)
        called = np.searchsorted(np.sort(scores), cuts, side="left")  # images below each cut
        share = np.append(1.0 - called / len(scores), 0.0)
        ax.plot(share, f1, label=f"{name}: best {f1.max():.3f}")
    for (label, share), colour in zip((marks or {}).items(), ["grey", "tab:red", "tab:purple"]):
        ax.axvline(share, color=colour, linestyle="--", linewidth=1, label=f"{label} {share:.3f}")
    ax.set(xlabel="share of images called defective", ylabel="out-of-fold macro-F1", xlim=(0, 1), ylim=(0, 1.02),
           title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def plot_image_with_map(image: np.ndarray, anomaly_map: np.ndarray | None, path: str | Path,
                        value_range: tuple[float, float] | None = None) -> Path:
    """One image, and beside it its anomaly map overlay when there is one (`value_range`: the colour scale)."""
    panels = 1 if anomaly_map is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(2.2 * panels, 2.2), squeeze=False)
    for ax in axes.ravel():
        ax.imshow(image)
        ax.axis("off")
    if anomaly_map is not None:
        low, high = value_range or (float(np.min(anomaly_map)), float(np.max(anomaly_map)))
        axes[0, 1].imshow(anomaly_map, cmap="jet", alpha=0.5, vmin=low, vmax=high)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0.03)
    return save_figure(fig, path, dpi=80)
