#!/usr/bin/env bash
# MoE-Tuning's three stages (configs/moe_tuning/stage{1,2,3}.yaml) on the built-in shapes data with tiny presets,
# then evaluation, routing analysis and export of the upcycled LLM to transformers' Qwen3-MoE.
# A CPU smoke run of the recipe (a few minutes): the tiny models start from random weights, so the stage lengths
# and learning rates below are for seeing every step work, not for accuracy (see `sparsevl demo` for that).
#   scripts/moe_tuning.sh [OUT]        environment: PYTHON (default python), STEPS (optimizer steps per stage, 20)
set -euo pipefail
OUT=${1:-runs/moe_tuning}
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-20}
sparsevl() { "$PYTHON" -m sparsevl "$@"; }

sparsevl data shapes --out "$OUT/data" --num_train 256 --num_test 32 --qa_per_image 3
"$PYTHON" - "$OUT" <<'PY'
import sys
from pathlib import Path
from sparsevl.data.tokenizer import build_tokenizer, save_tokenizer, texts_from_llava_json
data = Path(sys.argv[1]) / "data"
save_tokenizer(build_tokenizer(texts_from_llava_json([data / "captions.json", data / "finetune.json"])),
               Path(sys.argv[1]) / "tokenizer")
PY

COMMON=(--max_steps "$STEPS" --learning_rate 1e-3 --per_device_train_batch_size 16 --logging_steps 5
        --save_steps 100000 --report_to none --seed 0)
sparsevl train --config configs/moe_tuning/stage1.yaml --model_name_or_path tiny-qwen3 --vision_tower tiny-clip \
    --tokenizer_name_or_path "$OUT/tokenizer" --data_path "$OUT/data/captions.json" \
    --output_dir "$OUT/stage1" "${COMMON[@]}"
sparsevl train --config configs/moe_tuning/stage2.yaml --model_name_or_path "$OUT/stage1" \
    --unfreeze_mm_vision_tower True --data_path "$OUT/data/finetune.json" --output_dir "$OUT/stage2" "${COMMON[@]}"
sparsevl train --config configs/moe_tuning/stage3.yaml --model_name_or_path "$OUT/stage2" \
    --data_path "$OUT/data/finetune.json" --output_dir "$OUT/stage3" "${COMMON[@]}"

sparsevl eval --model "$OUT/stage3" --data "$OUT/data/test_qa.json" --out "$OUT/eval"
sparsevl analyze routing --model "$OUT/stage3" --data "$OUT/data/test_qa.json" --out "$OUT/routing"
# Qwen3-MoE routes the second expert by argmax; stage 3 sampled it (MoE-LLaVA): export that routing explicitly
sparsevl export --to qwen3-moe --model "$OUT/stage3" --out "$OUT/qwen3_moe" --second_expert_policy argmax
