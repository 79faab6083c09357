"""Patching metrics (docs/method.md, §6). τ = first token of the correct option, τ' = of the incorrect one.

- LD(logits) = logit(τ) − logit(τ')
- logit-difference effect = LD_patched − LD_corrupt
- restoration probability = P_patched(τ) − P_corrupt(τ), P from a softmax over the full vocabulary
- normalised effect = (LD_patched − LD_corrupt) / (LD_clean − LD_corrupt); reported together with the
  ratio of means over samples, because the per-sample ratio blows up when LD_clean ≈ LD_corrupt.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from notice.workflow.tables import RESULT_COLUMNS

# The per-patch part of a result row (RESULT_COLUMNS minus the model/sample identification).
ROW_COLUMNS: tuple[str, ...] = RESULT_COLUMNS[RESULT_COLUMNS.index("site") :]


def logit_diff(logits: torch.Tensor, tau: int, tau_p: int) -> torch.Tensor:
    """LD = logit(τ) − logit(τ') over the last dimension, in float32."""
    logits = logits.float()
    return logits[..., tau] - logits[..., tau_p]


def answer_prob(logits: torch.Tensor, tau: int) -> torch.Tensor:
    """P(τ) from a float32 softmax over the full vocabulary (last dimension)."""
    return torch.softmax(logits.float(), dim=-1)[..., tau]


def normalised_effect(ld_patched, ld_corrupt, ld_clean):
    """(LD_patched − LD_corrupt) / (LD_clean − LD_corrupt), NaN where the clean/corrupt gap is 0."""
    gap = np.asarray(ld_clean, dtype=np.float64) - np.asarray(ld_corrupt, dtype=np.float64)
    effect = np.asarray(ld_patched, dtype=np.float64) - np.asarray(ld_corrupt, dtype=np.float64)
    out = np.divide(effect, gap, out=np.full(np.broadcast(effect, gap).shape, np.nan), where=gap != 0)
    return float(out) if out.ndim == 0 else out


def ratio_of_means(ld_patched, ld_corrupt, ld_clean) -> float:
    """mean(LD_patched − LD_corrupt) / mean(LD_clean − LD_corrupt) over samples: the stable normalisation."""
    effect = np.mean(np.asarray(ld_patched, dtype=np.float64) - np.asarray(ld_corrupt, dtype=np.float64))
    gap = np.mean(np.asarray(ld_clean, dtype=np.float64) - np.asarray(ld_corrupt, dtype=np.float64))
    return float(effect / gap) if gap != 0 else float("nan")


class Scores(NamedTuple):
    """LD and P(τ) of one run."""

    ld: float
    p: float


def scores(logits: torch.Tensor, tau: int, tau_p: int) -> Scores:
    """Scores of one logits vector [V]."""
    return Scores(float(logit_diff(logits, tau, tau_p)), float(answer_prob(logits, tau)))


def result_row(
    site: str,
    layer: int,
    head: int,
    position: int,
    token: str,
    clean: Scores,
    corrupt: Scores,
    patched: Scores,
) -> dict:
    """One row with the ROW_COLUMNS of the results table."""
    return {
        "site": site,
        "layer": layer,
        "head": head,
        "position": position,
        "token": token,
        "ld_clean": clean.ld,
        "ld_corrupt": corrupt.ld,
        "ld_patched": patched.ld,
        "p_clean": clean.p,
        "p_corrupt": corrupt.p,
        "p_patched": patched.p,
        "logit_diff": patched.ld - corrupt.ld,
        "prob_restoration": patched.p - corrupt.p,
    }
