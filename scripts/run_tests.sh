#!/usr/bin/env bash
# Install what the tests need, then run the whole suite. Extra arguments go to pytest.
# Strict mode turns "reference implementation missing" and "C++ helpers not built" from skips into
# failures, so a broken install can never pass as green.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh" --test
cd "$ROOT"
MINDPRETRAIN_STRICT_TESTS=1 MINDPRETRAIN_REQUIRE_CPP=1 "${MINDPRETRAIN_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
