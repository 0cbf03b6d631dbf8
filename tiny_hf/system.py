"""Process-level helpers: memory settings that make CPU training and inference faster (nothing here changes
results), and atomic file writes."""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS after every large tensor.

    A training step allocates and frees tensors of tens to hundreds of MB (logits are batch x length x vocab).
    By default glibc serves those with mmap and unmaps them on free, so every step page-faults the same memory in
    again: on a 2-core CPU that was a third of the step time (measured: sys time 15 s -> 2 s over 25 steps of
    tiny-3m, step 1.3 s -> 1.0 s). Raising the mmap and trim thresholds keeps the memory in the heap for reuse.
    Returns False where there is no glibc (macOS, Windows, musl), where it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    one_gib = ctypes.c_int(1 << 30)
    return bool(libc.mallopt(m_trim_threshold, one_gib)) and bool(libc.mallopt(m_mmap_threshold, one_gib))


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` so that a crash mid-write leaves the old file (or none), never half of one: into a
    temporary file beside it, flushed to disk, then renamed over it. Text is written as UTF-8 with "\n" newlines."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
