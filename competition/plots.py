"""The figures every run writes next to its outputs: training curves, ROC and PR, confusion matrix.

Matplotlib with the Agg backend (no display needed); every figure goes through
`artifacts.save_figure`, so it is written atomically and closed.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from competition.artifacts import save_figure  # noqa: E402
from competition.metrics import aupr, auroc, binary_metrics  # noqa: E402


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
    """ROC (with AUROC) and precision-recall (with average precision) side by side."""
    labels = np.asarray(labels, int)
    scores = np.asarray(scores, float)
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(9, 4))
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, scores)
        ax_roc.plot(fpr, tpr, label=f"AUROC {auroc(labels, scores):.3f}")
        precision, recall, _ = precision_recall_curve(labels, scores)
        ax_pr.plot(recall, precision, label=f"AP {aupr(labels, scores):.3f}")
        ax_pr.axhline(labels.mean(), color="grey", linestyle=":", label=f"prevalence {labels.mean():.3f}")
    else:
        for ax in (ax_roc, ax_pr):
            ax.text(0.5, 0.5, "one class only: undefined", ha="center", va="center")
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


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
