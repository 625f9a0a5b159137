"""A model folder's files: where params.json and the shards are (a Hugging Face repo keeps Meta's
files in original/), the shards checked against Meta's checklist.chk (md5sum's format), one shard
memory-mapped, the tokenizer files a converted or quantized copy takes along, and a folder
written aside and renamed only when complete. What the tensors in the shards are, and how they
split over ranks, is checkpoint.py's.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import torch

from ..config import ConfigError, ModelArgs, first_line


class CheckpointError(ConfigError):
    """A checkpoint folder or file is broken; the message names the file and what was expected."""


SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")
_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")
# The files of a model folder's tokenizer, copied along when a folder is converted or quantized.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def model_folder(path: str | Path) -> Path:
    """The folder holding params.json and the shards: `path` itself (Meta's download, e.g.
    Llama3.1-8B-Instruct/ with checklist.chk), or its original/ subfolder (a Hugging Face repo such
    as Meta-Llama-3-8B-Instruct/, whose original/ holds Meta's files beside the safetensors)."""
    path = Path(path)
    if not (path / "params.json").is_file() and (path / "original" / "params.json").is_file():
        return path / "original"
    return path


def find_shards(ckpt_dir: str | Path) -> list[Path]:
    ckpt_dir = model_folder(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt_dir} does not exist; expected a folder with params.json and consolidated.00.pth, ...")
    shards = sorted((p for p in ckpt_dir.iterdir() if SHARD_RE.search(p.name)), key=lambda p: int(SHARD_RE.search(p.name).group(1)))
    listed = _checklist_shards(ckpt_dir)
    absent = [name for name in listed if not (ckpt_dir / name).is_file()]
    if absent:  # e.g. an interrupted download: the shards present may still be numbered 00..NN without a gap
        raise CheckpointError(f"{ckpt_dir / 'checklist.chk'} lists {absent[0]}, which is missing ({len(absent)} of "
                              f"{len(listed)} shards missing); finish the download (python -m llama_demo.download resumes it)")
    if not shards:
        raise CheckpointError(f"no consolidated.NN.pth files in {ckpt_dir}; expected Meta's layout (params.json, consolidated.00.pth, ...)")
    numbers = [int(SHARD_RE.search(p.name).group(1)) for p in shards]
    if numbers != list(range(len(shards))):
        raise CheckpointError(f"shards in {ckpt_dir} are numbered {numbers}; expected consolidated.00.pth to consolidated.{len(shards) - 1:02d}.pth with none missing")
    return shards


def _checklist_shards(folder: Path) -> list[str]:
    """The shard names Meta's checklist.chk (md5sum lines) lists, when the folder has one. The
    md5 sums themselves are checked by python -m llama_demo.download, not at every start."""
    path = folder / "checklist.chk"
    if not path.is_file():
        return []
    names = parse_checklist(path.read_text(errors="replace"), str(path))
    return sorted(name for name in names if SHARD_RE.search(name))


def load_model_args(ckpt_dir: str | Path, **overrides) -> ModelArgs:
    return ModelArgs.from_params_file(model_folder(ckpt_dir) / "params.json", **overrides)


def open_shard(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map one shard without running pickled code."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty; re-download it (see checklist.chk)")
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" in str(e) and "zipfile" in str(e):  # legacy (pre-1.6) format cannot be mapped
            sd = _load_unmapped(path)
        else:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupted?): {first_line(e)}") from None
    except Exception as e:  # pickle errors, zip errors, weights_only refusals
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupted?): {first_line(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path} does not hold a dict of named tensors; expected a Meta consolidated.NN.pth")
    return sd


def _load_unmapped(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {first_line(e)}") from None


def parse_checklist(text: str, source: str) -> dict[str, str]:
    """`<md5>  <file name>` lines (md5sum's format) -> {file name: md5}."""
    entries: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or not _MD5_RE.match(parts[0]):
            raise CheckpointError(f"{source} line {n} is not '<md5>  <file name>': {line!r}")
        md5, name = parts[0].lower(), parts[1].lstrip("*").strip()  # md5sum marks binary mode with '*'
        # The checklist comes from the server: never let it write outside the folder.
        if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise CheckpointError(f"{source} line {n} names {name!r}; expected a plain file name")
        entries[name] = md5
    return entries


def check_out_dir(out_dir: Path) -> None:
    """Refuse a folder that exists with something in it: converting or quantizing never overwrites.
    Callers check before their slow part, so a wrong --out fails at once, not after minutes."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir} already exists and is not empty; choose a new folder or delete it")


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling folder that becomes out_dir only when the body finishes, so an
    interrupted conversion never leaves a folder that looks complete."""
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stick to the renamed folder
    try:
        yield tmp
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a folder
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
