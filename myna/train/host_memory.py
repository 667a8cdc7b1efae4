"""Keep the host memory a CPU training step frees, so the next step reuses it instead of faulting it in again.

glibc's malloc serves large blocks (here: logits, MLP activations and their gradients, megabytes each) with a
fresh mmap and unmaps them on free, and hands the top of its heap back to the kernel; every training step then
page-faults the same memory in again and has the kernel zero it. On the `cpu` preset that was 25,000-37,000
faults and about 60 ms of system time per step (bench/speedrun.py's shape, 2 cores): `kept()` turns both off for
the duration of training, which removes them for a few percent more resident memory, and restores glibc's
defaults afterwards (returning what it can with malloc_trim). Elsewhere (not glibc, or on a GPU, where host
allocations are small) it does nothing.
"""

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults
KEEP_TRIM_THRESHOLD = 2**31 - 1  # the largest an int allows: free heap top is kept up to 2 GiB


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)  # the C library this process already uses
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def kept(enabled: bool = True) -> Iterator[bool]:
    """Inside: large blocks come from the heap and freed ones stay with the process. Yields whether it applied."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
    try:
        yield True
    finally:
        # an explicit trim threshold stops glibc adapting it to the program, which is harmless at its default
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
