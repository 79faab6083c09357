"""The scores of a run and the result row of a patched run, as every engine produces them (docs/method.md, §6).

τ = first token of the correct option, τ' = of the incorrect one.
- LD(logits) = logit(τ) − logit(τ')
- logit-difference effect = LD_patched − LD_corrupt
- restoration probability = P_patched(τ) − P_corrupt(τ), P from a softmax over the full vocabulary
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from notice.files.tables import RESULT_COLUMNS

# The per-patch part of a result row (RESULT_COLUMNS minus the model/sample identification).
ROW_COLUMNS: tuple[str, ...] = RESULT_COLUMNS[RESULT_COLUMNS.index("site") :]


def logit_diff(logits: torch.Tensor, tau: int, tau_p: int) -> torch.Tensor:
    """LD = logit(τ) − logit(τ') over the last dimension, in float32."""
    logits = logits.float()
    return logits[..., tau] - logits[..., tau_p]


def answer_prob(logits: torch.Tensor, tau: int) -> torch.Tensor:
    """P(τ) from a float32 softmax over the full vocabulary (last dimension)."""
    return torch.softmax(logits.float(), dim=-1)[..., tau]


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
