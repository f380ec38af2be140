#!/usr/bin/env bash
# One prepared GPU session (device tool) for the speed issue's GPU targets: CUDA smoke test with
# compiled sampling, training throughput of the 35 M preset, compiled guided sampling with the
# memory-sized batch, and time to 98 % on MNIST. Every benchmark includes its fp32 eager baseline.
# Expects .carry/data (MNIST cache + classifiers/, from ~/.cache/cfgdiff/data) and writes under $OUT.
set -u
export PYTHONPATH=src CFGDIFF_DATA_DIR=$PWD/.carry/data
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  echo "== smoke: tiny train + compiled sample on cuda (t=$(el)s)"
  python3 -m cfgdiff train --dataset mnist --preset tiny --steps 30 --device cuda --out /tmp/smoke \
      --no-progress --image-size 28 2>&1 | tail -3
  python3 -m cfgdiff sample --checkpoint /tmp/smoke --scale 3 --out /tmp/smoke/s.npz --device cuda \
      --sampler dpmpp-2m --steps 10 --compile on
  echo "== train throughput, 35 M preset (t=$(el)s)"
  python3 bench/train_throughput.py --device cuda --presets lesson-35m \
      --variants fp32,bf16,bf16-cl,bf16-compile-cl --json "$OUT/train_35m.json"
  python3 bench/train_throughput.py --device cuda --presets lesson-35m --batch 256 \
      --variants fp32,bf16-compile-cl --json "$OUT/train_35m_b256.json"
  echo "== guided sampling throughput, compiled + CUDA graphs (t=$(el)s)"
  python3 bench/sample_throughput.py --device cuda --preset mnist
  echo "== time to 98 % at s = 3, mnist preset, 60 s budget (t=$(el)s)"
  python3 bench/time_to_quality.py --device cuda --preset mnist --budget 60 --every 100 --n 500 \
      --compile
  echo "== done (t=$(el)s)"
} 2>&1 | tee "$OUT/gpu_check.log"
