"""Verified cache entries: a bootstrapped pair's weights are checked against the sha256 that bootstrap.json
recorded when the entry was built (``<role>.weights_sha256``), before they are loaded.

    problem = verify_entry(entry)   # None, or one line naming the file, the two hashes and the fix

A process hashes each weights file once: the result is remembered under the file's (inode, size, mtime), so
the next load in the same process (a sweep's next cell, the evaluation cache) costs one ``stat``; a file
changed in place since (zeroed bytes, a copy over it) has a new mtime and is hashed again. Hashing reads the
file once at disk speed (the default tiny pair's two ~4 MB files: a few ms).
"""

from __future__ import annotations

import json
from pathlib import Path

from opd_exp.models.bootstrap import file_sha256

META = "bootstrap.json"
WEIGHTS = "model.safetensors"
ROLES = ("teacher", "student")

_verified: dict[Path, tuple[int, int, int]] = {}  # weights file -> (inode, size, mtime_ns) it was verified at


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def verify_entry(entry: Path) -> str | None:
    """Check each member's weights file against the hash its entry recorded: the first problem (a mismatch, a
    missing file) as one line with the fix, else None. An entry whose bootstrap.json records no hash (built by
    an older version) is not checked."""
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return (f"cache entry {entry}: {META} is unreadable ({type(err).__name__}: {err}); delete the entry "
                f"(rm -r {entry}) and run again to rebuild it")
    for role in ROLES:
        expected = (meta.get(role) or {}).get("weights_sha256")
        path = entry / role / WEIGHTS
        if expected is None:
            continue
        if not path.is_file():
            return f"{role} weights {path}: missing; delete the entry (rm -r {entry}) and run again to rebuild it"
        stamp = _stamp(path)
        if _verified.get(path) == stamp:
            continue
        actual = file_sha256(path)
        if actual != expected:
            return (f"{role} weights {path}: corrupted (sha256 {actual[:12]}..., {META} recorded "
                    f"{expected[:12]}...); delete the entry (rm -r {entry}) and run again to rebuild it")
        _verified[path] = stamp
    return None
