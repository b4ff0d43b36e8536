"""Process-wide allocator settings for inference, so that the resident set follows the live tensors.

Values are unaffected: only where the C library places freed and fresh blocks changes.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
# glibc's own starting threshold; fixed here instead of left to grow.
MMAP_THRESHOLD_BYTES = 128 * 1024


def map_large_blocks(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc's malloc serve every block of at least `threshold_bytes` by a mapping of its own,
    returned to the system when freed. Returns False where the C library is not glibc.

    glibc raises its threshold to the size of every mapped block that is freed (up to 32 MB), so
    after the first activations are freed, later ones of a few MB come from the heap, whose freed
    space stays resident: a paper-size `midms translate` then held ~100 MB more than it used
    (benchmarks/README.md). Setting the threshold once turns that adjustment off.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))
