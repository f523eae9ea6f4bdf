"""Shared inputs and numpy references for the loss and criterion tests (hand-computed values)."""

from __future__ import annotations

import numpy as np
import torch

COUNTS = [500, 300, 30]
Z = np.array([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3], [-0.5, 0.2, 1.5], [1.0, -1.0, 0.0]])
ZT = np.array([[3.0, 0.0, -2.0], [-1.0, 2.0, 0.5], [0.0, 0.5, 1.0], [0.2, 0.1, 0.4]])
Y = np.array([0, 1, 2, 2])


def t(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def yt() -> torch.Tensor:
    return torch.tensor(Y)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


def nll(z: np.ndarray, y: np.ndarray = Y) -> np.ndarray:
    """Per-sample -log softmax(z)_y."""
    return -log_softmax(z)[np.arange(len(y)), y]


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def cb_weights(counts, beta=0.9999) -> np.ndarray:
    w = np.array([(1 - beta) / (1 - beta**n) for n in counts])
    return w * len(counts) / w.sum()


def close(a, b, tol=1e-5) -> None:
    if isinstance(a, torch.Tensor):
        a = a.detach().numpy()
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), b, rtol=tol, atol=tol)


EXTREME = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [1e4, 1e4, -1e4], [-1e4, -1e4, 1e4]])


def split_target_masked(logits: torch.Tensor, target: torch.Tensor):
    """kdlib.losses._split_target as it was before the gathers (boolean masks): the reference."""
    mask = torch.nn.functional.one_hot(target, logits.shape[1]).bool()
    return logits[mask], logits[~mask].view(len(logits), -1)
