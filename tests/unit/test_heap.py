"""Freed body buffers stay on glibc's heap instead of going back to the system at once."""

from __future__ import annotations

import ctypes
import sys

import pytest

from sidecar.server import keep_freed_heap


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mallinfo() -> _MallInfo2:
    libc = ctypes.CDLL(None)
    function = getattr(libc, "mallinfo2", None)
    if function is None:
        pytest.skip("not glibc 2.33 or later")
    function.restype = _MallInfo2
    info: _MallInfo2 = function()
    return info


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_buffers_are_kept_for_the_next_bodies() -> None:
    _mallinfo()  # skips on another C library
    keep_freed_heap()
    before = _mallinfo()
    # 6 MiB of 64 KiB and 512 KiB bodies (the second over glibc's default
    # 128 KiB mmap threshold): from the heap, and kept there once freed.
    buffers = [b"y" * (64 * 1024) + bytes([i % 256]) for i in range(64)]
    buffers += [b"z" * (512 * 1024) + bytes([i]) for i in range(4)]
    during = _mallinfo()
    assert during.hblkhd - before.hblkhd < 512 * 1024  # none of them mapped on its own
    del buffers
    after = _mallinfo()
    assert after.arena >= during.arena - 256 * 1024  # the heap was not trimmed
