"""Where a result came from: the maxlm version and commit, and the host, recorded with runs and benchmarks."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import subprocess


def cache_root() -> str:
  """Where maxlm keeps what it can rebuild (compiled programs, the demo corpus): $MAXLM_CACHE, else ~/.cache/maxlm."""
  return os.environ.get("MAXLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "maxlm")


@functools.cache
def version() -> dict:
  """{"version": the installed maxlm version, "commit": the git commit of this checkout (+"-dirty" with uncommitted
  changes to tracked files), or None when maxlm does not run from a git checkout}."""
  try:
    installed = importlib.metadata.version("maxlm")
  except importlib.metadata.PackageNotFoundError:
    installed = "unknown"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  commit = None
  try:
    run = lambda *args: subprocess.run(  # noqa: E731
      ["git", "-C", repo, *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    commit = run("rev-parse", "--short=12", "HEAD") + ("-dirty" if run("status", "--porcelain", "-uno") else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return {"version": installed, "commit": commit}


def host_description() -> str:
  """This host's CPU as far as Linux says: 'AMD EPYC, x86_64, 2 cores, AVX2, L3 16 MiB' (CPU figures depend on it)."""
  model, isa = platform.processor() or "unknown CPU", ""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    names = re.findall(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = set((re.findall(r"^flags\s*:\s*(.+)$", info, re.M) or [""])[0].split())
    model = names[0].strip() if names else model
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
  except OSError:
    pass
  parts = [model, platform.machine(), f"{os.cpu_count()} cores", isa]
  try:
    with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
      size = f.read().strip()
    kib = int(size[:-1]) * {"K": 1, "M": 1024}[size[-1]]
    parts.append(f"L3 {kib // 1024} MiB" if kib % 1024 == 0 else f"L3 {kib} KiB")
  except (OSError, ValueError, KeyError, IndexError):
    pass
  return ", ".join(p for p in parts if p)
