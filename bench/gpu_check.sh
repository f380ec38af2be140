#!/usr/bin/env bash
# One prepared GPU session (device tool): CUDA smoke test, throughput, and the demo-preset sweep.
# Expects .carry/data/mnist.pkl.gz (+ classifiers/) and writes figures under $OUT.
set -u
export PYTHONPATH=src CFGDIFF_DATA_DIR=$PWD/.carry/data
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  echo "== smoke: tiny train + sample on cuda (t=$(el)s)"
  python3 -m cfgdiff train --dataset mnist --preset tiny --steps 30 --device cuda --out /tmp/smoke \
      --no-progress --image-size 28 2>&1 | tail -3
  python3 -m cfgdiff sample --checkpoint /tmp/smoke --scale 3 --out /tmp/smoke/s.npz --device cuda \
      --sampler dpmpp-2m --steps 10
  echo "== train throughput (t=$(el)s)"
  python3 bench/train_throughput.py --device cuda --presets cpu-demo,mnist,cifar10 \
      --json "$OUT/gpu_train_throughput.json"
  echo "== sample throughput (t=$(el)s)"
  python3 bench/sample_throughput.py --device cuda --preset cpu-demo
  python3 bench/sample_throughput.py --device cuda --preset mnist
  echo "== demo-preset sweep at equal CPU seconds (t=$(el)s)"
  python3 bench/tune_demo.py --throughput bench/results/cpu_throughput.json --budget "${BUDGET:-400}" \
      --device cuda --only "${ONLY:-base,b128,b32,c48,eps-linear,minsnr,lr1e-3,lr4e-3,ema0.999,mult124}" \
      --json "$OUT/tune_demo.json"
  echo "== done (t=$(el)s)"
} 2>&1 | tee "$OUT/gpu_check.log"
