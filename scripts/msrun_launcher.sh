#!/usr/bin/env bash
# Launch a distributed job with MindSpore's `msrun`, with MindFormers' argument forms:
#
#   bash scripts/msrun_launcher.sh "<cmd>"                       # one node, 8 workers
#   bash scripts/msrun_launcher.sh "<cmd>" WORKER_NUM            # one node, WORKER_NUM workers
#   bash scripts/msrun_launcher.sh "<cmd>" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT \
#                                          NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT       # multi-node
#
# Defaults: 8 8 127.0.0.1 8118 0 output/msrun_log False 7200. Trailing positional arguments may be
# left out (they take the defaults; LOCAL_WORKER defaults to WORKER_NUM). <cmd> is a Python script
# and its arguments, e.g. "run_mindformer.py --register_path research/deepseek3 --config x.yaml".
# Worker N writes LOG_DIR/worker_N.log (msrun's naming); the scheduler writes LOG_DIR/scheduler.log.
#
# With JOIN False (MindFormers' default) msrun returns once the workers are started and they keep
# running in the background; JOIN True waits for them, prints their logs and fails if one fails.
#
# MSRUN_LAUNCHER_DRY_RUN=1 (or --dry-run as the first argument) prints the resolved command and
# exits without starting anything, so the parsing can be tested and checked before a long job.
# MSRUN_EXTRA_ARGS adds msrun options, e.g. MSRUN_EXTRA_ARGS="--tail_worker_log=0" (JOIN True: show
# only worker 0's log on the console) or "--bind_core=True".
# When a worker fails (JOIN True), the console ends with one line per failed worker naming its log and its
# `run_mindformer.py: error:` line, and the exit status is 1 (instead of msrun's own Python traceback).
# GLOG_v is MindSpore's own log level in msrun, the scheduler and the workers (0 debug, 1 info,
# 2 warning, 3 error). Unset, it is 3 and MindSpore logs to files in LOG_DIR/mindspore, copying only
# its errors to the worker logs, which then hold the run's own lines (MindSpore's threads print two
# [INFO] lines at every worker's exit whatever GLOG_v says; only logging to files keeps them out).
# A GLOG_v you set is kept, with MindSpore's console logging, e.g. GLOG_v=2 for its warnings;
# GLOG_logtostderr, GLOG_log_dir and GLOG_stderrthreshold are kept too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${MSRUN_LAUNCHER_DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then
    DRY_RUN=1
    shift
fi

usage() {
    # the comment block at the top of this file, without its "# "
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
}

fail() {
    echo "msrun_launcher.sh: error: $*" >&2
    exit 2
}

if [ $# -lt 1 ] || [ $# -gt 9 ]; then
    usage
    fail "expected \"<cmd>\" and up to 8 positional arguments, got $# arguments"
fi

EXECUTE_ORDER="$1"
WORKER_NUM="${2:-8}"
LOCAL_WORKER="${3:-$WORKER_NUM}"
MASTER_ADDR="${4:-127.0.0.1}"
MASTER_PORT="${5:-8118}"
NODE_RANK="${6:-0}"
LOG_DIR="${7:-output/msrun_log}"
JOIN="${8:-False}"
CLUSTER_TIME_OUT="${9:-7200}"

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

[ -n "${EXECUTE_ORDER// /}" ] || fail "the command (first argument) is empty"
is_int "$WORKER_NUM" && [ "$WORKER_NUM" -ge 1 ] || fail "WORKER_NUM ($WORKER_NUM) must be a positive integer"
is_int "$LOCAL_WORKER" && [ "$LOCAL_WORKER" -ge 1 ] || fail "LOCAL_WORKER ($LOCAL_WORKER) must be a positive integer"
[ "$LOCAL_WORKER" -le "$WORKER_NUM" ] || fail "LOCAL_WORKER ($LOCAL_WORKER) must not exceed WORKER_NUM ($WORKER_NUM)"
is_int "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1024 ] && [ "$MASTER_PORT" -le 65535 ] \
    || fail "MASTER_PORT ($MASTER_PORT) must be an integer in [1024, 65535]"
is_int "$NODE_RANK" || fail "NODE_RANK ($NODE_RANK) must be a non-negative integer"
NODES=$(( (WORKER_NUM + LOCAL_WORKER - 1) / LOCAL_WORKER ))
[ "$NODE_RANK" -lt "$NODES" ] \
    || fail "NODE_RANK ($NODE_RANK) must be below the node count WORKER_NUM/LOCAL_WORKER ($NODES)"
[[ "$MASTER_ADDR" =~ ^[A-Za-z0-9._:-]+$ ]] || fail "MASTER_ADDR ($MASTER_ADDR) is not an IP address or host name"
[ -n "$LOG_DIR" ] || fail "LOG_DIR is empty"
case "$JOIN" in
    True|true) JOIN=True ;;
    False|false) JOIN=False ;;
    *) fail "JOIN ($JOIN) must be True or False" ;;
esac
[[ "$CLUSTER_TIME_OUT" =~ ^-?[0-9]+$ ]] || fail "CLUSTER_TIME_OUT ($CLUSTER_TIME_OUT) must be an integer (seconds)"

# msrun starts workers as `python <script> ...`, so the project's interpreter must come first on PATH.
VENV="${MINDPRETRAIN_VENV:-$ROOT/.venv}"
if [ -x "$VENV/bin/msrun" ]; then
    export PATH="$VENV/bin:$PATH"
    MSRUN="$VENV/bin/msrun"
elif command -v msrun >/dev/null 2>&1; then
    MSRUN="$(command -v msrun)"
else
    fail "msrun not found: run 'bash scripts/setup_env.sh' (MindSpore installs it into $VENV/bin)"
fi

# The first word of <cmd> is the script; msrun runs a bare `python` or `pytest` as given.
read -r -a ORDER <<< "$EXECUTE_ORDER"
SCRIPT="${ORDER[0]}"
case "$SCRIPT" in
    python|python3|pytest) ;;
    *) [ -f "$SCRIPT" ] || fail "script $SCRIPT (first word of the command) does not exist in $(pwd)" ;;
esac

# Let the workers import the project and see each other's rank through the launcher's environment.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# MindSpore reads its GLOG_* variables when it starts; msrun hands them to the scheduler and every worker.
if [ -z "${GLOG_v:-}" ]; then
    export GLOG_v=3 GLOG_logtostderr="${GLOG_logtostderr:-0}"
fi
[[ "$GLOG_v" =~ ^[0-4]$ ]] || fail "GLOG_v ($GLOG_v) must be a MindSpore log level: 0 debug, 1 info, 2 warning, 3 error, 4 critical"
MINDSPORE_LOGS="the worker logs"
if [ "${GLOG_logtostderr:-1}" = 0 ]; then
    case "$LOG_DIR" in /*) ABSOLUTE_LOG_DIR="$LOG_DIR" ;; *) ABSOLUTE_LOG_DIR="$(pwd)/$LOG_DIR" ;; esac
    export GLOG_log_dir="${GLOG_log_dir:-$ABSOLUTE_LOG_DIR/mindspore}" GLOG_stderrthreshold="${GLOG_stderrthreshold:-$GLOG_v}"
    MINDSPORE_LOGS="$GLOG_log_dir (level $GLOG_stderrthreshold and up also to the worker logs)"
fi

COMMAND=("$MSRUN" "--worker_num=$WORKER_NUM" "--local_worker_num=$LOCAL_WORKER"
         "--master_addr=$MASTER_ADDR" "--master_port=$MASTER_PORT" "--node_rank=$NODE_RANK"
         "--log_dir=$LOG_DIR" "--join=$JOIN" "--cluster_time_out=$CLUSTER_TIME_OUT")
if [ -n "${MSRUN_EXTRA_ARGS:-}" ]; then
    read -r -a EXTRA <<< "$MSRUN_EXTRA_ARGS"
    COMMAND+=("${EXTRA[@]}")
fi
COMMAND+=("${ORDER[@]}")

echo "msrun_launcher.sh: ${COMMAND[*]}"
echo "msrun_launcher.sh: worker logs in $LOG_DIR/worker_<rank>.log (scheduler: $LOG_DIR/scheduler.log)"
echo "msrun_launcher.sh: MindSpore logs at GLOG_v=$GLOG_v (0 debug .. 3 error) to $MINDSPORE_LOGS"
if [ "$DRY_RUN" = 1 ]; then
    exit 0
fi
mkdir -p "$LOG_DIR" ${GLOG_log_dir:+"$GLOG_log_dir"}
# msrun ends a job whose worker failed with a Python traceback of its own; scripts/msrun_console.py runs the
# same msrun in the same interpreter (its script's #! line) and prints which worker failed and why instead.
read -r -a SHEBANG <<< "$(head -n 1 "$MSRUN" 2>/dev/null | sed -n 's/^#! *//p')"
if [ "${#SHEBANG[@]}" -gt 0 ] && [[ "${SHEBANG[*]}" == *python* ]]; then
    exec "${SHEBANG[@]}" "$ROOT/scripts/msrun_console.py" "${COMMAND[@]:1}"
fi
exec "${COMMAND[@]}"
