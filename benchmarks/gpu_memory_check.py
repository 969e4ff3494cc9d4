"""On a lent GPU: is the memory the deviceless compile predicted (benchmarks/aot_memory.py --gpu, rows h100:1 and
h200:1) within 10% of what the real device uses?

For each configuration in DEVICE_CHECK (the `benchmarks/mfu.py --preset gpu` variants of the same names), three
figures per device: the prediction made on a CPU host with the CUDA compiler plugin (`peak` of
benchmarks/results/gpu_aot_memory.json), the real device's compile of the same step (`maxlm compile --json`: XLA's
buffer assignment after autotuning), and the allocator's peak while the step runs (`peak_memory_bytes` of the
`maxlm bench` record in mfu_sweep_gpu.json). The check passes when both real figures are within 10% of the
prediction; the result goes to --out and the exit code is 1 when a row is off (a device-specific kernel choice, a
target config that does not match the card, or a jax version difference: the GPU machine runs its own jax).

  python benchmarks/gpu_memory_check.py --measured $OUT/results/mfu_sweep_gpu.json --out $OUT/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 0.10
# config -> the overrides of the mfu.py gpu variant of that name; aot_memory.py predicts them for h100:1 and h200:1.
DEVICE_CHECK = {
  "gpt2_124m/cudnn": (
    "gpt2_124m",
    ["--config.train.global_batch=16", "--config.train.microbatches=1", "--config.model.attention=cudnn"],
  ),
  "llama_1b/dots_no_batch": ("llama_1b", ["--config.train.global_batch=8", "--config.model.remat=dots_no_batch"]),
}
CARDS = {"H200": "h200:1", "H100": "h100:1"}  # device_kind substring -> the topology of its prediction


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--measured", required=True, help="mfu_sweep_gpu.json of benchmarks/mfu.py --preset gpu")
  parser.add_argument("--prediction", default=os.path.join(REPO, "benchmarks", "results", "gpu_aot_memory.json"))
  parser.add_argument("--out", required=True, help="directory for gpu_memory_check.json")
  args = parser.parse_args()
  with open(args.prediction) as f:
    predicted = {(r["config"], r["topology"], r["overrides"]): r for r in json.load(f)["rows"]}
  with open(args.measured) as f:
    measured = {r["variant"]: r for r in json.load(f) if "error" not in r}  # mfu.py writes a list of records
  rows, ok = [], True
  for variant, (name, overrides) in DEVICE_CHECK.items():
    record = measured.get(variant)
    if record is None:
      rows.append({"variant": variant, "error": "not measured (the mfu sweep failed or skipped it)"})
      ok = False
      continue
    card = next((t for k, t in CARDS.items() if k in record["device"]), None)
    key = (name, card, " ".join(o.replace("--config.", "") for o in overrides))
    if key not in predicted:
      rows.append({"variant": variant, "error": f"no prediction for {key}: run benchmarks/aot_memory.py --gpu"})
      ok = False
      continue
    prediction = predicted[key]["memory_per_device"]["peak"]
    compiled = _compile_on_device(name, overrides)
    row = {
      "variant": variant,
      "device": record["device"],
      "predicted_peak_bytes": prediction,
      "device_compile_peak_bytes": compiled,
      "allocator_peak_bytes": record["peak_memory_bytes"],
      "allocator_peak_source": record.get("peak_memory_source"),
    }
    row["compile_ratio"] = compiled / prediction
    row["allocator_ratio"] = record["peak_memory_bytes"] / prediction
    row["within_10pct"] = all(abs(row[k] - 1) <= TOLERANCE for k in ("compile_ratio", "allocator_ratio"))
    ok &= row["within_10pct"]
    rows.append(row)
    print(
      f"{variant:24} predicted {prediction / 2**30:7.2f} GiB  device compile {compiled / 2**30:7.2f} "
      f"({row['compile_ratio']:.3f}x)  allocator peak {record['peak_memory_bytes'] / 2**30:7.2f} "
      f"({row['allocator_ratio']:.3f}x)  {'ok' if row['within_10pct'] else 'OFF BY MORE THAN 10%'}",
      flush=True,
    )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "gpu_memory_check.json"), "w") as f:
    json.dump({"benchmark": "gpu_memory_check", "tolerance": TOLERANCE, "ok": ok, "rows": rows}, f, indent=2)
  sys.exit(0 if ok else 1)


def _compile_on_device(name: str, overrides: list[str]) -> int:
  proc = subprocess.run(
    [sys.executable, "-m", "maxlm", "compile", f"--config={REPO}/configs/{name}.py", "--json", *overrides],
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  if proc.returncode not in (0, 1):  # 1: does not fit, still a report
    raise SystemExit(f"maxlm compile failed for {name}: {proc.stderr.strip().splitlines()[-1:]}")
  return json.loads(proc.stdout)["memory_per_device"]["peak"]


if __name__ == "__main__":
  main()
