"""Keep numba's on-disk caches of the compiled kernels consistent with their sources.

numba caches a compiled function (``cache=True``) next to its source, in ``__pycache__``, and
revalidates it against that one file's timestamp and size only. The kernels call each other
across files (envs/fluidkernel.py inlines envs/stepkernel.py's functions, which inline
envs/kernelhash.py's), so after an edit of one file the others would load compiled code built
from its old version: in session 33 a new hash function in kernelhash.py left fluidkernel's cached
code probing the latency table at the old slots, and the first env step looped for good, asking
Python for keys that were there. So on import, before any kernel runs, the caches of all kernel
modules are dropped when any kernel source changed since they were written (a SHA-256 of the
sources, kept beside them). A fresh checkout has no caches and compiles once (a minute or so).

Only the in-tree ``__pycache__`` is handled; with ``NUMBA_CACHE_DIR`` set, numba caches elsewhere
and this does nothing (clear that directory after editing a kernel).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: the modules of envs/ with compiled kernels (their caches are dropped together)
KERNEL_MODULES = ("kernelhash", "stepkernel", "fluidkernel", "packkernel")
_STAMP = "kernels.sha256"


def sources_digest(root: Path) -> str:
    """SHA-256 over the kernel modules' sources in ``root`` (hex)."""
    h = hashlib.sha256()
    for name in KERNEL_MODULES:
        h.update(name.encode())
        h.update((root / f"{name}.py").read_bytes())
    return h.hexdigest()


def drop_stale_caches(root: Path | None = None) -> bool:
    """Delete numba's cache files of the kernel modules in ``root``/__pycache__ (default: this
    package) if the sources changed since the stamp there was written; returns whether it did."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return False
    root = Path(__file__).resolve().parent if root is None else root
    cache = root / "__pycache__"
    try:
        digest = sources_digest(root)
        stamp = cache / _STAMP
        if stamp.is_file() and stamp.read_text().strip() == digest:
            return False
        cache.mkdir(exist_ok=True)
        for name in KERNEL_MODULES:
            for f in list(cache.glob(f"{name}.*.nbi")) + list(cache.glob(f"{name}.*.nbc")):
                f.unlink(missing_ok=True)
        tmp = cache / f"{_STAMP}.{os.getpid()}"
        tmp.write_text(digest + "\n")
        os.replace(tmp, stamp)  # (atomic: processes starting together agree on the stamp)
    except OSError:  # a read-only tree: numba then caches elsewhere or not at all
        return False
    return True
