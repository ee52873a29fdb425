"""Temperature scaling: one scalar T fitted on validation predictions, softmax(logits / T) afterwards.

T is bounded below by 1 (it only softens): on a small validation split that the model classifies
perfectly, the likelihood keeps improving as T -> 0, which would make the outputs more over-confident.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_TEMPERATURE = 1.0
MAX_TEMPERATURE = 100.0
_EPS = 1e-12


def log_probs(probs: np.ndarray) -> torch.Tensor:
    """Logits up to a per-row constant (which softmax ignores): log of the probabilities."""
    return torch.log(torch.as_tensor(probs, dtype=torch.float64).clamp_min(_EPS))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """T minimising the mean negative log-likelihood of softmax(log(probs) / T), within the bounds."""
    if len(labels) == 0:
        return MIN_TEMPERATURE
    logits = log_probs(probs)
    target = torch.as_tensor(labels, dtype=torch.int64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t):
        return MIN_TEMPERATURE
    return float(min(max(t, MIN_TEMPERATURE), MAX_TEMPERATURE))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): the probabilities the model gives with its logits divided by T."""
    return torch.softmax(log_probs(probs) / temperature, dim=1).numpy()


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (unweighted)."""
    if len(labels) == 0:
        return float("nan")
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    return float(-np.log(np.clip(picked, _EPS, 1.0)).mean())
