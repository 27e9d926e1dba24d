#!/bin/bash
# A replication of the compressor rule (detect_ood.py --compressor auto) on a model that did
# not exist when the rule was written. Protocol, fixed before the model is trained:
#   model: scripts/train_svi.py defaults on Fashion-MNIST with --seed 1 and --epochs 40 (the
#          time available; the benchmarked model had seed 0 and 70 epochs);
#   test:  detect_ood.py --ood mnist, auto compressor (chosen on 1,000 validation images),
#          the first 1,000 test images of each set, K = 500;
#   success: AUROC of the complexity ratio >= 0.95 (the issue's target).
# Usage: bash benchmarks/ood_replication.sh OUT_DIR [THREADS]
set -euo pipefail
out=${1:?usage: ood_replication.sh OUT_DIR [THREADS]}
threads=${2:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
if [ ! -f "$out/evaluation.json" ]; then
  if [ -f "$out/config.json" ]; then
    "$py" "$here/scripts/train_svi.py" --resume "$out" --quiet --threads "$threads"
  else
    "$py" "$here/scripts/train_svi.py" --dataset fashion-mnist --seed 1 --epochs 40 \
      --eval-particles 0 --quiet --threads "$threads" --out "$out"
  fi
fi
"$py" "$here/scripts/detect_ood.py" --checkpoint "$out" --ood mnist --images 1000 \
  --num-particles 500 --threads "$threads"
