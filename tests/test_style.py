"""How the code reads: one formatter and linter configuration (pyproject.toml), and shape suffixes that the model
package's legend explains."""

import glob
import os
import re
import subprocess
import sys

import pytest

import maxlm.model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPED = [
  "maxlm/model/*.py",
  "maxlm/parallel/context.py",
  "maxlm/training/step.py",
  "maxlm/interop/sample.py",
  "maxlm/interop/evaluate.py",
]
# A name's shape suffix: dimensions joined by "x" after the last underscore, e.g. `x_BxTxD`, `q_bxkxGxTxDh`, `w_2xDxF`.
DIM = r"(?:[A-Z][a-z]*|[0-9]+|[a-z])"
SUFFIX = re.compile(rf"\b[a-z][a-z0-9_]*?_({DIM}(?:x{DIM})*)\b")


@pytest.mark.parametrize("args", [["format", "--check", "."], ["check", "."]], ids=["format", "lint"])
def test_ruff_is_clean(args):
  proc = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, f"run `ruff {' '.join(args)}` (with --fix for lint) and commit:\n{proc.stdout}"


def _legend() -> set[str]:
  text = maxlm.model.__doc__.split("legend covers them:")[1]
  names = set(re.findall(r"^\s+(\S+(?:, \S+)*)\s{2,}", text, re.M))
  names |= set(re.findall(r"\s{2,}(\S+)\s{2,}\S", text))
  return {n for group in names for n in group.split(", ")}


def test_every_shape_suffix_is_in_the_legend():
  legend = _legend()
  assert {"B", "T", "D", "Dh", "Half", "b", "1", "2"} <= legend, legend
  missing = {}
  for pattern in SHAPED:
    for path in glob.glob(os.path.join(REPO, pattern)):
      with open(path) as f:
        source = f.read()
      for match in SUFFIX.finditer(source):
        dims = match.group(1).split("x")
        if not any(d[0].isupper() for d in dims):
          continue  # not a shape suffix (e.g. `use_cache`)
        for dim in dims:
          if dim not in legend:
            missing.setdefault(dim, f"{os.path.relpath(path, REPO)}: {match.group(0)}")
  assert not missing, f"shape dimensions the legend in maxlm/model/__init__.py does not explain: {missing}"
