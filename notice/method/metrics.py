"""Normalisations of patching effects over samples (docs/method.md, §6).

- normalised effect = (LD_patched − LD_corrupt) / (LD_clean − LD_corrupt); reported together with the
  ratio of means over samples, because the per-sample ratio blows up when LD_clean ≈ LD_corrupt.
"""

from __future__ import annotations

import numpy as np


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
