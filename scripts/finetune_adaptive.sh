#!/usr/bin/env bash
# Adaptive vision-layer finetune on the built-in shapes data with the tiny config, then the layer analysis.
#   scripts/finetune_adaptive.sh [OUT_DIR] [extra `sparsevl train` flags, e.g. --max_steps 50]
# The flags live in configs/finetune_adaptive.yaml (--use_adaptive_layer_selection True --top_k_layers 3
# --layer_classifier_loss_weight 0.1 ...); flags given here override them.
set -euo pipefail
OUT=${1:-runs/finetune_adaptive}
shift $(( $# > 0 ? 1 : 0 ))
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -f "$OUT/data/finetune.json" ]; then
  "$PYTHON" -m sparsevl data shapes --out "$OUT/data" --num_train 2000 --num_test 200 --qa_per_image 3
fi
if [ ! -f "$OUT/tokenizer/tokenizer.json" ]; then
  "$PYTHON" - "$OUT" <<'PY'
import sys
from pathlib import Path
from sparsevl.data.tokenizer import build_tokenizer, save_tokenizer, texts_from_llava_json
out = Path(sys.argv[1])
save_tokenizer(build_tokenizer(texts_from_llava_json([out / "data/captions.json", out / "data/finetune.json"])),
               out / "tokenizer")
PY
fi
"$PYTHON" -m sparsevl train --config "$HERE/configs/finetune_adaptive.yaml" \
  --tokenizer_name_or_path "$OUT/tokenizer" --data_path "$OUT/data/finetune.json" --output_dir "$OUT/model" "$@"
"$PYTHON" -m sparsevl analyze layers --model "$OUT/model" --data "$OUT/data/test_qa.json" --out "$OUT/layer_analysis"
