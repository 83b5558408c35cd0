"""A logistic stacker whose coefficients cannot go below zero, for `ensemble.method: sklearn`.

Breiman (1996), "Stacked regressions", constrains the level-2 weights to be non-negative so that a stack cannot
lean on one model's score against another's. This is logistic regression on standardised model scores (as the
package's `logistic` stacker, StandardScaler then LogisticRegression with C=1) with that constraint: log-loss plus
`0.5 / C * |w|^2`, minimised by L-BFGS-B with a lower bound of zero on every weight and none on the intercept.
Measured in README ("The stacker's regularisation and sign") and not adopted, so it lives here, not in the package:

    PYTHONPATH=bench python -m competition infer --config configs/real.yaml --set paths.data=D \\
        --set paths.work=W/runs --set paths.submissions=S --set ensemble.method=sklearn \\
        --set ensemble.estimator=nonneg_stacker.NonNegativeLogistic --set "ensemble.estimator_params={C: 1}"
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import StandardScaler


class NonNegativeLogistic(ClassifierMixin, BaseEstimator):
    """L2-penalised logistic regression on standardised features with every coefficient >= 0."""

    def __init__(self, C: float = 1.0):
        self.C = C

    def fit(self, X, y):
        X, y = np.asarray(X, float), np.asarray(y, float)
        self.classes_ = np.array([0, 1])
        self.scaler_ = StandardScaler().fit(X)  # the package's logistic stacker standardises the same way
        Z = self.scaler_.transform(X)
        d = Z.shape[1]

        def loss_and_grad(theta):
            w, b = theta[:d], theta[d]
            z = Z @ w + b
            residual = expit(z) - y
            loss = np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 / self.C * w @ w
            return loss, np.append(Z.T @ residual + w / self.C, residual.sum())

        result = minimize(loss_and_grad, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                          bounds=[(0.0, None)] * d + [(None, None)])
        self.coef_, self.intercept_ = result.x[:d], float(result.x[d])
        return self

    def decision_function(self, X):
        return self.scaler_.transform(np.asarray(X, float)) @ self.coef_ + self.intercept_

    def predict_proba(self, X):
        p = expit(self.decision_function(X))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X):
        return (self.decision_function(X) > 0).astype(int)
