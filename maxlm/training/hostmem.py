"""Host memory for XLA:CPU: freed blocks stay in the process, so each train step reuses the last one's pages.

XLA:CPU allocates an execution's temporaries and outputs with malloc. glibc serves blocks above its mmap
threshold (32 MiB at most, by default) with fresh pages from the kernel and unmaps them at free, and XLA's
worker threads allocate from per-thread arenas that cannot hold such blocks at all. So every step faults its
whole working set in again: ~200K page faults (800 MB) per `cpu_10m` step, a third of its time
(benchmarks/NOTES.md). With one arena and neither mmap nor trimming below 2 GiB, a step reuses the pages the
previous one freed. Resident memory then stays at its peak, which a training process reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import os
import platform

from maxlm.parallel import distributed

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # <malloc.h>
LIMIT = 2**31 - 1  # mallopt takes a C int: blocks above 2 GiB are still mapped and unmapped.
USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(environ=os.environ) -> bool:
  """Sets glibc malloc to one arena that keeps freed memory, if XLA:CPU is the only backend JAX can start here.

  Call before the first JAX computation (later, threads that already allocated keep their own arenas).
  Returns whether it changed anything: nothing on another C library, on a host with an accelerator, or when
  the environment sets malloc itself (MALLOC_* variables or glibc.malloc tunables, which then win).
  """
  if platform.libc_ver()[0] != "glibc" or distributed.accelerator_possible(environ):
    return False
  if any(k in environ for k in USER_SETTINGS) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
    return False
  libc = ctypes.CDLL(None)  # The C library this process is linked against.
  return all(
    libc.mallopt(param, value) == 1
    for param, value in ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, LIMIT), (M_TRIM_THRESHOLD, LIMIT))
  )
