#!/usr/bin/env bash
# GPU smoke run: bf16 training (SDPA, transformers' default attention) of the mid-size preset (mid-qwen3 +
# mid-clip: 576 visual tokens per image) on 1 device and on N devices with FSDP2, then the pruning prefill
# benchmark at 576 visual tokens; prints samples/s, tokens/s and peak memory of each training run.
#   benchmarks/gpu_smoke.sh [--devices N] [--steps S] [--out DIR] [--dry_run]
# --dry_run prints the commands without running them (and needs no GPU).
set -euo pipefail
DEVICES=""; STEPS=30; OUT=runs/gpu_smoke; DRY_RUN=0; PY=${PYTHON:-python}
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    *) echo "gpu_smoke.sh: unknown argument $1 (--devices N, --steps S, --out DIR, --dry_run)" >&2; exit 2 ;;
  esac
done
if [ -z "$DEVICES" ]; then
  if [ $DRY_RUN = 1 ]; then DEVICES=2; else DEVICES=$($PY -c "import torch; print(torch.cuda.device_count())"); fi
fi
if [ $DRY_RUN = 0 ] && [ "$DEVICES" -lt 1 ]; then
  echo "gpu_smoke.sh: no CUDA device found (use --dry_run to see the commands)" >&2; exit 2
fi
run() { echo "+ $*"; if [ $DRY_RUN = 0 ]; then "$@"; fi; }

run $PY -m sparsevl data shapes --out "$OUT/data" --num_train 256 --num_test 16 --image_size 336
run $PY -c "from sparsevl.data.tokenizer import build_tokenizer, save_tokenizer, texts_from_llava_json as t; \
save_tokenizer(build_tokenizer(t(['$OUT/data/captions.json', '$OUT/data/finetune.json'])), '$OUT/tokenizer')"
TRAIN=(--model_name_or_path mid-qwen3 --vision_tower mid-clip --tokenizer_name_or_path "$OUT/tokenizer"
       --data_path "$OUT/data/finetune.json" --bf16 True --per_device_train_batch_size 8 --max_steps "$STEPS"
       --learning_rate 1e-4 --logging_steps 10 --save_steps 100000 --report_to none
       --include_num_input_tokens_seen True --skip_memory_metrics False)
run $PY -m sparsevl train "${TRAIN[@]}" --output_dir "$OUT/train_1"
if [ "$DEVICES" -gt 1 ]; then
  run torchrun --nproc_per_node "$DEVICES" -m sparsevl train "${TRAIN[@]}" --fsdp --output_dir "$OUT/train_$DEVICES"
fi
run $PY -m benchmarks.pruning_prefill --visual 576 --kept 64 --layer 2 --device cuda --dtype bfloat16
run $PY -m benchmarks.gpu_smoke_report --visual_tokens 576 "$OUT/train_1" $( [ "$DEVICES" -gt 1 ] && echo "$OUT/train_$DEVICES")
