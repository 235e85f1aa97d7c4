"""numba's caches of the kernel modules are dropped together when any kernel source changes
(envs/kernelcache.py), and kept while none does."""
from __future__ import annotations

from pathlib import Path

from envs.kernelcache import KERNEL_MODULES, drop_stale_caches


def _tree(tmp_path: Path) -> Path:
    for name in KERNEL_MODULES:
        (tmp_path / f"{name}.py").write_text(f"# {name}\n")
    (tmp_path / "__pycache__").mkdir()
    return tmp_path


def _cached(root: Path) -> list[str]:
    for name in KERNEL_MODULES:
        for suffix in ("_f-10.py311.nbi", "_f-10.py311.1.nbc"):
            (root / "__pycache__" / f"{name}.{suffix}").write_bytes(b"x")
    return sorted(p.name for p in (root / "__pycache__").glob("*.nb?"))


def test_caches_are_dropped_when_a_kernel_source_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    root = _tree(tmp_path)
    (root / "__pycache__" / "world.cpython-311.pyc").write_bytes(b"keep")
    _cached(root)
    assert drop_stale_caches(root)  # no stamp yet: dropped
    assert not list((root / "__pycache__").glob("*.nb?"))
    files = _cached(root)
    assert not drop_stale_caches(root)  # the same sources: kept
    assert sorted(p.name for p in (root / "__pycache__").glob("*.nb?")) == files
    (root / "stepkernel.py").write_text("# stepkernel, edited\n")
    assert drop_stale_caches(root)  # one source changed: every kernel module's caches go
    assert not list((root / "__pycache__").glob("*.nb?"))
    assert (root / "__pycache__" / "world.cpython-311.pyc").read_bytes() == b"keep"


def test_a_numba_cache_dir_elsewhere_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "elsewhere"))
    root = _tree(tmp_path)
    files = _cached(root)
    assert not drop_stale_caches(root)
    assert sorted(p.name for p in (root / "__pycache__").glob("*.nb?")) == files
