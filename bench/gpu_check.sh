#!/usr/bin/env bash
# One prepared GPU session (device tool) for the speed issue's GPU targets: CUDA smoke test with
# compiled sampling, training throughput of the 35 M preset, compiled guided sampling with the
# memory-sized batch, and time to 98 % on MNIST. Every benchmark includes its fp32 eager baseline,
# and every compiled training step is checked against eager (the "!" mark, the "compile:" lines).
# Expects .carry/data (MNIST cache + classifiers/, from ~/.cache/cfgdiff/data) and writes under $OUT.
#
# DRY=1 bash bench/gpu_check.sh runs every command on the CPU with tiny settings (about two
# minutes): check the script there before spending device time on it.
set -u
export PYTHONPATH=src
[ -d .carry/data ] && export CFGDIFF_DATA_DIR=$PWD/.carry/data
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; Q=--quick; BIG=tiny; MNIST=tiny; B256=16; TTQ="--quick"
else
  DEV=cuda; Q=; BIG=lesson-35m; MNIST=mnist; B256=256
  TTQ="--preset mnist --budget 60 --every 100 --n 500"
fi
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  echo "== smoke: tiny train (compiled, checked) + compiled sample on $DEV (t=$(el)s)"
  rm -rf /tmp/smoke
  python3 -m cfgdiff train --dataset mnist --preset tiny --steps 30 --device $DEV --out /tmp/smoke \
      --no-progress --image-size 28 --compile on 2>&1 | grep -E "compile|done"
  python3 -m cfgdiff sample --checkpoint /tmp/smoke --scale 3 --out /tmp/smoke/s.npz --device $DEV \
      --sampler dpmpp-2m --steps 10 --compile on
  echo "== train throughput, $BIG preset (t=$(el)s)"
  python3 bench/train_throughput.py --device $DEV --presets $BIG $Q \
      --variants fp32,bf16,bf16-cl,bf16-compile-cl --json "$OUT/train_35m.json"
  python3 bench/train_throughput.py --device $DEV --presets $BIG --batch $B256 $Q \
      --variants fp32,bf16-compile-cl --json "$OUT/train_35m_b256.json"
  echo "== guided sampling throughput, compiled + CUDA graphs (t=$(el)s)"
  python3 bench/sample_throughput.py --device $DEV --preset $MNIST $Q --compile
  echo "== time to 98 % at s = 3, $MNIST preset (t=$(el)s)"
  python3 bench/time_to_quality.py --device $DEV $TTQ --compile
  echo "== done (t=$(el)s)"
} 2>&1 | tee "$OUT/gpu_check.log"
