"""One read-only numpy array over many files: a reserved range of virtual memory with each file mapped into it.

    region = Region(places, dtype)      # places[k]: where file k starts in the array (page-aligned, in items)
    region.map(k, path, count)          # map file k there (once, before reading it)
    region.array[a:b]                   # a zero-copy view, whichever file it lies in

Why: a batch of 64 samples from 64 shards, read as views of 64 separate arrays, costs 4-5x the same batch from one
array (bench/shards.py), the cost of touching 64 cold array objects. Mapped side by side into one reservation, the
shards are one array again, and a sample is one slice of it, as in a single store.

The reservation is PROT_NONE and MAP_NORESERVE: it costs address space only, no memory and no swap commitment.
Each file is mapped over its place with MAP_FIXED (its place starts on a page boundary; the gap after it stays
PROT_NONE). The array is read-only. It is unmapped when the last view of it is gone (the region hangs on the
buffer every view refers to), never while a view could still read it. Each mapped file is a kernel memory area
(vm.max_map_count, 65530 by default, allows ~30,000 shards per process). Linux (and other POSIX systems with the
same flag values) only.
"""

import ctypes
import mmap
import os

import numpy as np

PAGE = mmap.PAGESIZE
_PROT_NONE, _MAP_FIXED, _MAP_NORESERVE = 0, 0x10, 0x4000
_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def page_aligned_places(byte_sizes, itemsize: int) -> np.ndarray:
    """Where each of files of these sizes starts (in items) when each starts on a page boundary; plus the end."""
    rounded = (np.asarray(byte_sizes, dtype=np.int64) + PAGE - 1) // PAGE * PAGE
    return np.concatenate([[0], np.cumsum(rounded)]).astype(np.int64) // itemsize


class Region:
    """See the module docstring."""

    def __init__(self, places: np.ndarray, dtype: np.dtype):
        self.places, self.dtype = places, np.dtype(dtype)
        self.nbytes = max(int(places[-1]) * self.dtype.itemsize, PAGE)
        self.base = _libc.mmap(None, self.nbytes, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                               -1, 0)
        if self.base in (None, _FAILED):
            raise OSError(ctypes.get_errno(), f"cannot reserve {self.nbytes:,} bytes of address space")
        buffer = (ctypes.c_char * self.nbytes).from_address(self.base)
        buffer.region = self  # every view refers to this buffer: the region lives as long as any view
        self.array = np.frombuffer(buffer, dtype=self.dtype)
        self.array.flags.writeable = False  # the pages are PROT_READ: a write would be a crash, not an error

    def map(self, k: int, path: str, count: int) -> None:
        """Map `count` items of file `path` at place k (its size is checked by the caller)."""
        if count:
            fd = os.open(path, os.O_RDONLY)
            try:
                at = self.base + int(self.places[k]) * self.dtype.itemsize
                got = _libc.mmap(at, count * self.dtype.itemsize, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
            finally:
                os.close(fd)
            if got != at:
                raise OSError(ctypes.get_errno(), f"cannot map {path} (vm.max_map_count reached?)")

    def __del__(self):
        if getattr(self, "base", None) not in (None, _FAILED):
            _libc.munmap(self.base, self.nbytes)
            self.base = None
