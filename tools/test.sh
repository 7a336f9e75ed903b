#!/usr/bin/env bash
# Lint, type-check and test. Used by the README's test command and by .ci/run.
#   bash tools/test.sh            # default suite (marked-slow tests excluded)
#   AUTOTHINK_SLOW=1 bash tools/test.sh   # everything
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "== ruff format --check"; "$PY" -m ruff format --check .
echo "== ruff check"; "$PY" -m ruff check .
echo "== mypy (package)"; "$PY" -m mypy
MARK='not slow'
[[ "${AUTOTHINK_SLOW:-0}" == "1" ]] && MARK=''
echo "== pytest -m '${MARK}'"
exec "$PY" -m pytest -m "${MARK}" -q -p no:cacheprovider --timeout=900 --durations=25
