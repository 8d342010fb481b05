#!/usr/bin/env bash
# The project's test command (README and .ci/run both call this). Extra arguments go to pytest,
# e.g. scripts/test.sh tests/framework -x -q
set -uo pipefail
cd "$(dirname "$0")/.."

PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests (exit 5)" >&2
fi
exit "$status"
