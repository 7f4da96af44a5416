#!/usr/bin/env bash
# Create the project's virtualenv (.venv) and install the package with its C++ dataset helpers.
#   bash scripts/setup_env.sh          # runtime only
#   bash scripts/setup_env.sh --test   # plus the test-only reference implementations
# Re-running is cheap: nothing is reinstalled unless setup.py, pyproject.toml, the C++ source or
# requirements-test.txt changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MINDPRETRAIN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
WITH_TESTS=0
[ "${1:-}" = "--test" ] && WITH_TESTS=1

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi

fingerprint() {
    cat "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/mindpretrain/data/index_helpers.cpp" | sha256sum | cut -c1-16
}
STAMP="$VENV/.mindpretrain-installed-$(fingerprint)"
if [ ! -f "$STAMP" ] || ! ls "$ROOT"/mindpretrain/data/_index_helpers*.so >/dev/null 2>&1; then
    echo "[setup] installing mindpretrain (mindspore, tokenizers, C++ index helpers)"
    rm -f "$VENV"/.mindpretrain-installed-*
    "$VENV/bin/python" -m pip install -q -e "$ROOT"
    touch "$STAMP"
fi

if [ "$WITH_TESTS" = 1 ]; then
    TEST_STAMP="$VENV/.mindpretrain-test-$(cat "$ROOT/requirements-test.txt" "$ROOT/requirements-test-nodeps.txt" | sha256sum | cut -c1-16)"
    if [ ! -f "$TEST_STAMP" ]; then
        echo "[setup] installing test-only references (pytest, torch CPU, megatron-core, transformers, verl, trl)"
        "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-test.txt"
        # RL references whose own pins clash with ours: installed without their dependencies (the tests stub
        # the heavy imports they never use; see tests/rl/test_algorithms.py)
        "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements-test-nodeps.txt"
        touch "$TEST_STAMP"
    fi
fi
