"""Fingerprint of a folder's files: it changes when a file below the folder is added, removed, renamed or
rewritten, which the folder's own mtime does not show (it changes only for its direct entries)."""

from __future__ import annotations

import hashlib
import os


def tree_fingerprint(root: str | os.PathLike[str]) -> str:
    """Hash of the sorted (relative path, size, mtime_ns) of every file under `root`, at any depth.

    Names and stat only, no file contents: cheap enough to compute at every workflow start.
    """
    entries = []
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):  # not a broken link
                stat = os.stat(path)
                entries.append(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()
