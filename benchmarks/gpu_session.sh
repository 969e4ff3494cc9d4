#!/usr/bin/env bash
# One GPU device call (H100/H200, fits in ~10 minutes): everything issue 7 needs measured on a GPU.
#   1. attention kernels: cudnn vs xla numerics and forward+backward time (benchmarks/attention_check.py)
#   2. the MFU sweep (benchmarks/mfu.py --preset gpu): gpt2_124m and llama_1b variants
#   3. maxlm vs nanoGPT-style PyTorch + torch.compile on gpt2_124m (benchmarks/nanogpt_compare.py)
#   4. the deviceless GPU compile's memory prediction against the device (benchmarks/gpu_memory_check.py)
# Results go to $OUT (the device tool brings them back) and are then copied into benchmarks/results/.
#
# Before the call, here: `bash benchmarks/gpu_session.sh --fetch-wheels` downloads the packages the GPU
# image lacks into .whl/ (git-ignored); then run it there with carry=[".whl"]:
#   bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker==1.6.0 tensorboardX==2.6.5 qwix==0.1.8"
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl $WHEELS
  exit
fi
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT/results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
timeout 150 python3 benchmarks/attention_check.py --results_dir "$OUT/results" 2>&1 | tail -20
timeout 300 python3 benchmarks/mfu.py --preset gpu --steps 10 --results_dir "$OUT/results" 2>&1 | tail -20
timeout 150 python3 benchmarks/nanogpt_compare.py --config gpt2_124m --batch 16 --steps 10 \
  --results_dir "$OUT/results" 2>&1 | tail -5
# The compass check of the deviceless GPU compile (benchmarks/aot_memory.py --gpu, rows h100:1/h200:1): the real
# device's compile and allocator peak within 10% of the prediction for the mfu sweep's gpt2_124m and llama_1b steps.
timeout 120 python3 benchmarks/gpu_memory_check.py --measured "$OUT/results/mfu_sweep_gpu.json" --out "$OUT/results" \
  2>&1 | tail -5
