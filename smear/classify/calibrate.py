"""Temperature scaling (Guo et al. 2017): one scalar T dividing the logits, fitted on held-out
data by minimising the negative log-likelihood. It changes confidence, never the ranking."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smear.classify.evaluate import expected_calibration_error, nll


def fit_temperature(logits: torch.Tensor, y_true: torch.Tensor, max_iter: int = 50) -> float:
    """The temperature T > 0 minimising NLL of softmax(logits / T) on (logits, y_true), by LBFGS."""
    logits = torch.as_tensor(logits, dtype=torch.float64).detach()
    y = torch.as_tensor(y_true, dtype=torch.long)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if np.isfinite(t) and 0.01 < t < 100 else 1.0


def calibration_report(logits: torch.Tensor, y_true: torch.Tensor, temperature: float) -> dict[str, Any]:
    """ECE and NLL before (T = 1) and after temperature scaling."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    y = np.asarray(y_true)
    before = torch.softmax(logits, 1).numpy()
    after = torch.softmax(logits / temperature, 1).numpy()
    return {"temperature": round(float(temperature), 4), "n": len(y),
            "ece_before": round(expected_calibration_error(before, y), 4),
            "ece_after": round(expected_calibration_error(after, y), 4),
            "nll_before": round(nll(before, y), 4), "nll_after": round(nll(after, y), 4)}
