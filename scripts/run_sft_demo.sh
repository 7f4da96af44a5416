#!/usr/bin/env bash
# Supervised fine-tuning demo, end to end on CPU with no download: make a small reasoning-chat corpus, preprocess
# it with the DeepSeek-V3 tokenizer and chat template, fine-tune the tiny DeepSeek-V3 on packed conversations with
# 2 data-parallel CPU workers under msrun (per-token loss), export the result as an HF directory with the
# tokenizer (what `vllm serve` takes), and check the export: the same logits as the native checkpoint and the
# tokenizer files the data was preprocessed with.
#
#   bash scripts/run_sft_demo.sh                  # from the pretraining demo's checkpoint when there is one
#   INIT=fresh bash scripts/run_sft_demo.sh       # from freshly initialised weights
#   CONVERSATIONS=3000 WORKERS=2 bash scripts/run_sft_demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONVERSATIONS="${CONVERSATIONS:-1200}"
WORKERS="${WORKERS:-2}"
PORT="${PORT:-8128}"
INIT="${INIT:-auto}"
DATA_DIR="data/sft_demo"
OUTPUT_DIR="${OUTPUT_DIR:-output/sft_demo}"
PRETRAINED_DIR="${PRETRAINED_DIR:-output/demo/checkpoint}"
CONFIG="configs/deepseek3/finetune_deepseek3_tiny_cpu.yaml"
PYTHON=".venv/bin/python"
START=$(date +%s)

echo "== 1/6 install (scripts/setup_env.sh)"
bash scripts/setup_env.sh
TOKENIZER_DIR="$("$PYTHON" -c 'import os; from mindpretrain.data.tokenizer import default_deepseek_v3_tokenizer_path as p; print(os.path.dirname(p()))')"
echo "tokenizer: $TOKENIZER_DIR"

echo "== 2/6 corpus: $CONVERSATIONS arithmetic conversations with reasoning (tools/make_sft_demo_corpus.py)"
mkdir -p "$DATA_DIR"
"$PYTHON" tools/make_sft_demo_corpus.py --output "$DATA_DIR/chats.jsonl" --conversations "$CONVERSATIONS"

echo "== 3/6 preprocess (tools/preprocess_sft_data.py: chat template, target masks, one document per conversation)"
rm -f "$DATA_DIR"/chat_*
"$PYTHON" tools/preprocess_sft_data.py --input "$DATA_DIR/chats.jsonl" --output-prefix "$DATA_DIR/chat" \
    --tokenizer-model "$TOKENIZER_DIR" --seq-length 256 --workers 1

LOAD_ARGS=""
if [ "$INIT" != "fresh" ] && [ -d "$PRETRAINED_DIR" ]; then
    LATEST="$(ls -d "$PRETRAINED_DIR"/step_* 2>/dev/null | sort | tail -1 || true)"
    if [ -n "$LATEST" ]; then
        LOAD_ARGS="--load_checkpoint $LATEST"
        echo "starting from the pretraining demo's checkpoint $LATEST"
    fi
fi
[ -z "$LOAD_ARGS" ] && echo "starting from freshly initialised weights (run scripts/run_demo.sh first to start from pretrained ones)"

echo "== 4/6 fine-tune the tiny DeepSeek-V3: one epoch, $WORKERS CPU workers (msrun)"
rm -rf "$OUTPUT_DIR"
MSRUN_EXTRA_ARGS="--tail_worker_log=0" bash scripts/msrun_launcher.sh \
    "run_mindformer.py --register_path research/deepseek3 --config $CONFIG --run_mode finetune --output_dir $OUTPUT_DIR $LOAD_ARGS --train_dataset.data_loader.config.data_path=[$DATA_DIR/chat]" \
    "$WORKERS" "$WORKERS" 127.0.0.1 "$PORT" 0 "$OUTPUT_DIR/msrun_log" True 900

FINAL="$(ls -d "$OUTPUT_DIR"/checkpoint/step_* | sort | tail -1)"
echo "== 5/6 export $FINAL to HF with the tokenizer (tools/convert_native_to_hf.py)"
"$PYTHON" tools/convert_native_to_hf.py --checkpoint "$FINAL" --output-dir "$OUTPUT_DIR/hf" --dtype fp32 \
    --tokenizer-dir "$TOKENIZER_DIR"

echo "== 6/6 check the export (tools/logits.py on both, tokenizer sha256 against the preprocessing summary)"
"$PYTHON" tools/check_sft_export.py --native "$FINAL" --hf "$OUTPUT_DIR/hf" --summary "$DATA_DIR/chat_summary.json" \
    --metrics "$OUTPUT_DIR/metrics/rank_0.jsonl"

echo "== done in $(( $(date +%s) - START )) s; HF export in $OUTPUT_DIR/hf, logs in $OUTPUT_DIR/msrun_log"
