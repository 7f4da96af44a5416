#!/usr/bin/env bash
# GRPO demo, end to end on CPU with no download: write the arithmetic task (a 26-token character tokenizer,
# prompts "a+b=" with their sums, and a pretraining corpus in the answer format "a+b=\boxed{s}" whose sums are
# right only 30% of the time), pretrain the tiny DeepSeek-V3 on that corpus briefly, then train it with GRPO
# (8 prompts x 8 samples per step, deepscaler grader, low_var_kl to the pretrained model) and print the mean
# reward of the first and last 10 steps.
#
#   bash scripts/run_grpo_demo.sh                      # seed 1234
#   SEED=7 bash scripts/run_grpo_demo.sh
#   SHUFFLE_REWARDS=1 bash scripts/run_grpo_demo.sh    # the control: rewards permuted within each batch
#   STEPS=200 PRETRAIN_STEPS=1000 bash scripts/run_grpo_demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SEED="${SEED:-1234}"
STEPS="${STEPS:-100}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-1000}"
SHUFFLE_REWARDS="${SHUFFLE_REWARDS:-0}"
DATA_DIR="${DATA_DIR:-data/grpo_demo}"
OUTPUT_DIR="${OUTPUT_DIR:-output/grpo_demo}"
CONFIG="configs/deepseek3/grpo_arithmetic_tiny_cpu.yaml"
PYTHON=".venv/bin/python"
RUN="$PYTHON run_mindformer.py --register_path research/deepseek3 --config $CONFIG --seed $SEED"
SHUFFLE="False"; [ "$SHUFFLE_REWARDS" = "1" ] && SHUFFLE="True"
START=$(date +%s)

echo "== 1/4 install (scripts/setup_env.sh)"
bash scripts/setup_env.sh

echo "== 2/4 task: tokenizer, prompts, format corpus (mindpretrain/rl/arithmetic_task.py), BIN dataset"
rm -rf "$DATA_DIR"
"$PYTHON" -m mindpretrain.rl.arithmetic_task --output "$DATA_DIR" --true-fraction 0.3 --seed "$SEED"
"$PYTHON" tools/preprocess_data.py --input "$DATA_DIR/format_corpus.jsonl" --prepend-bos --append-eod \
    --tokenizer-model "$DATA_DIR/tokenizer/tokenizer.json" --output-prefix "$DATA_DIR/format"

echo "== 3/4 pretrain $PRETRAIN_STEPS steps on the format corpus"
rm -rf "$OUTPUT_DIR"
$RUN --run_mode train --output_dir "$OUTPUT_DIR/pretrain" --runner_config.train_steps="$PRETRAIN_STEPS" \
    --lr_schedule.learning_rate=2.e-3 --callbacks.0.per_print_times=200 \
    --train_dataset.data_loader.config.data_path="[$DATA_DIR/format_text_document]"
PRETRAINED="$(ls -d "$OUTPUT_DIR"/pretrain/checkpoint/step_* | sort | tail -1)"

echo "== 4/4 GRPO $STEPS steps from $PRETRAINED (shuffle_rewards $SHUFFLE)"
$RUN --run_mode grpo --output_dir "$OUTPUT_DIR/grpo" --load_checkpoint "$PRETRAINED" \
    --runner_config.train_steps="$STEPS" --callbacks.0.per_print_times=10 \
    --tokenizer "$DATA_DIR/tokenizer/tokenizer.json" --rl_config.data.path="$DATA_DIR/prompts.jsonl" \
    --rl_config.reward.shuffle_rewards="$SHUFFLE"

"$PYTHON" - "$OUTPUT_DIR/grpo/metrics/rank_0.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
scores = [row["critic/score/mean"] for row in rows]
steady = sorted(row["timing_s/step"] for row in rows[1:])
print(f"mean reward: first 10 steps {sum(scores[:10]) / 10:.3f}, last 10 steps {sum(scores[-10:]) / 10:.3f}; "
      f"median step {steady[len(steady) // 2]:.2f} s, "
      f"{sorted(r['perf/tokens_per_s_per_device'] for r in rows[1:])[len(rows) // 2 - 1]:.0f} tokens/s per device")
PY
echo "done in $(( $(date +%s) - START )) s; metrics: $OUTPUT_DIR/grpo/metrics/rank_0.jsonl"
