"""Kaggle-style image defect classification: k-fold classifiers, an anomaly zoo, stacking, a local leaderboard."""
__version__ = "0.1.0"
