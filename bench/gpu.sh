#!/usr/bin/env bash
# GPU benchmarks that need no Kafka/Redis and no network: model-only step
# throughput (fp32 and bf16 autocast) on CPU and CUDA, and the incremental-vs-
# recompute cost.  Runs in well under 5 minutes on one GPU.
#   usage: bench/gpu.sh OUT_DIR        (writes OUT_DIR/model.json)
set -euo pipefail
out="${1:?usage: bench/gpu.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 280 "$PY" -m fbp.cli bench model --batch-sizes 1,16,256,4096,65536 --json "$out/model.json"
