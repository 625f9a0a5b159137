"""Checkpoint folders: resharding arithmetic and the clear errors a broken folder gets."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint, python_module, random_state, torchrun
from llama_demo.model.quant_format import QuantSpec
from llama_demo.weights.checkpoint import (CheckpointError, expected_shapes, kv_heads_of_part, open_checkpoint, save_sharded,
                                           split_dim)
from llama_demo.config import ConfigError, ModelArgs


def test_split_table_follows_fairscale_layers():
    assert split_dim("tok_embeddings.weight") == 1
    assert split_dim("layers.7.attention.wq.weight") == 0
    assert split_dim("layers.0.attention.wo.weight") == 1
    assert split_dim("layers.3.feed_forward.w2.weight") == 1
    assert split_dim("output.weight") == 0
    assert split_dim("layers.1.ffn_norm.weight") is None


def test_kv_heads_split_or_replicate():
    assert kv_heads_of_part(8, 1, 4) == [2, 3]
    assert kv_heads_of_part(2, 3, 4) == [1]  # 4 ranks, 2 KV heads: ranks 2 and 3 share head 1
    assert kv_heads_of_part(1, 1, 2) == [0]


def test_ffn_hidden_size_matches_meta_formula():
    assert ModelArgs(dim=4096, multiple_of=256).ffn_hidden == 11008  # Llama 2 7B
    assert ModelArgs(dim=8192, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden == 28672  # 70B
    assert ModelArgs(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3).ffn_hidden == 14336  # Llama 3 8B


def split_embedding_by_vocab(folder: Path) -> None:
    """Rewrite a folder's shards the way Meta's Llama 3 code stores the embedding: each shard holds
    vocab/n whole rows (VocabParallelEmbedding) instead of dim/n columns of every row."""
    paths = sorted(folder.glob("consolidated.*.pth"))
    shards = [torch.load(p, weights_only=True) for p in paths]
    for key in [k for k in shards[0] if k.startswith("tok_embeddings.")]:
        column_split = shards[0][key].dim() == 2  # an int8 table's per-row scales are whole in every shard
        full = torch.cat([s[key] for s in shards], 1) if column_split else shards[0][key]
        for s, part in zip(shards, full.chunk(len(shards), 0)):
            s[key] = part.clone()
    for s, p in zip(shards, paths):
        torch.save(s, p)


def _assert_rank_slices_reassemble(ck, state, world):
    for name, full in state.items():
        d = split_dim(name, ck.quant)
        parts = [ck.rank_slice(name, r, world) for r in range(world)]
        if d is None:
            assert all(torch.equal(p, full) for p in parts), name
        elif "attention.wk" in name or "attention.wv" in name:
            if world <= ck.args.n_kv_heads:
                assert torch.equal(torch.cat(parts, 0), full)
            else:  # 4 ranks, 2 KV heads: each head replicated on two ranks
                assert torch.equal(torch.cat(parts[::2], 0), full) and torch.equal(parts[0], parts[1])
        else:
            assert torch.equal(torch.cat(parts, d), full), name


@pytest.mark.parametrize("layout", ["features", "vocab"])
@pytest.mark.parametrize("shards,world", [(1, 2), (2, 1), (2, 4), (4, 2), (2, 3), (3, 2)])
def test_rank_slices_reassemble_the_full_tensors(tmp_path, shards, world, layout):
    """Whichever way the files split the embedding (LLaMA 1/2 by features, Llama 3 by vocabulary),
    every rank gets its run-time slice of the full tensor."""
    args = ModelArgs(dim=96, n_layers=1, n_heads=12, n_kv_heads=2 if 3 not in (shards, world) else 6, multiple_of=48,
                     vocab_size=96)
    state = random_state(args, 0)
    save_sharded(state, args, tmp_path / "ck", shards)
    if layout == "vocab":
        split_embedding_by_vocab(tmp_path / "ck")
    ck = open_checkpoint(tmp_path / "ck", world)
    assert ck.embedding_split == (0 if layout == "vocab" and shards > 1 else 1)
    _assert_rank_slices_reassemble(ck, state, world)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_vocab_split_embedding_reassembles(tmp_path, method):
    """A quantized table split by vocabulary rows (weight, scales, zeros alike) reads back whole."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, multiple_of=32, vocab_size=96)
    quant = QuantSpec(method, 16 if method == "int4" else 0, embedding=True)
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, shape in expected_shapes(args, quant).items():
        if name.endswith(".weight") and (name.startswith("tok_") or len(shape) == 2 and "norm" not in name):
            state[name] = torch.randint(0, 255 if method == "int4" else 127, shape, generator=g,
                                        dtype=torch.uint8 if method == "int4" else torch.int8)
        else:
            state[name] = torch.rand(shape, generator=g, dtype=torch.float16 if method == "int4" else torch.float32)
    save_sharded(state, args, tmp_path / "q", 2, quant=quant)
    split_embedding_by_vocab(tmp_path / "q")
    assert torch.load(tmp_path / "q" / "consolidated.01.pth", weights_only=True)["tok_embeddings.weight"].shape[0] == 48
    for world in (1, 2, 4):
        ck = open_checkpoint(tmp_path / "q", world)
        assert ck.embedding_split == 0
        _assert_rank_slices_reassemble(ck, state, world)


def test_vocab_size_minus_one_is_read_from_either_layout(tmp_path):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, multiple_of=32, vocab_size=96)
    save_sharded(random_state(args, 0), args, tmp_path / "ck", 2, extra_params={"vocab_size": -1})
    assert open_checkpoint(tmp_path / "ck", 1).args.vocab_size == 96
    split_embedding_by_vocab(tmp_path / "ck")
    assert open_checkpoint(tmp_path / "ck", 1).args.vocab_size == 96


def test_embedding_that_fits_no_layout_is_named(tmp_path):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, multiple_of=32, vocab_size=96)
    save_sharded(random_state(args, 0), args, tmp_path / "ck", 2)
    shard = torch.load(tmp_path / "ck" / "consolidated.00.pth", weights_only=True)
    shard["tok_embeddings.weight"] = torch.zeros(96, 16)
    torch.save(shard, tmp_path / "ck" / "consolidated.00.pth")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "ck", 2)
    msg = str(e.value)
    assert "\n" not in msg and "[96, 16]" in msg and "fits no known layout" in msg
    assert "[96, 32] (LLaMA 1/2" in msg and "[48, 64] (Llama 3" in msg


@pytest.fixture()
def good(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "good", "mha", 2, seed=5)


def _cli_error(folder: Path) -> str:
    proc = python_module(["llama_demo.generate", "--ckpt_dir", str(folder), "--prompt", "hi", "--max_new_tokens", "2"])
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr  # one line, no traceback
    return lines[0]


def test_missing_params_json(good):
    (good / "params.json").unlink()
    assert "params.json" in _cli_error(good)


def test_malformed_params_json(good):
    (good / "params.json").write_text("{not json")
    assert "not valid JSON" in _cli_error(good)
    (good / "params.json").write_text(json.dumps({"dim": 64}))
    assert "lacks n_layers, n_heads" in _cli_error(good)


def test_no_shards(good):
    for p in good.glob("consolidated.*.pth"):
        p.unlink()
    assert "no consolidated.NN.pth" in _cli_error(good)


def test_missing_shard_in_sequence(good):
    (good / "consolidated.00.pth").unlink()
    assert "none missing" in _cli_error(good)


def test_shapes_that_do_not_match_params(good):
    params = json.loads((good / "params.json").read_text())
    params["dim"] = 128
    (good / "params.json").write_text(json.dumps(params))
    msg = _cli_error(good)
    assert "has shape" in msg and "expected" in msg


def test_truncated_shard(good):
    p = good / "consolidated.01.pth"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    msg = _cli_error(good)
    assert "consolidated.01.pth" in msg and "truncated" in msg


def test_file_that_is_not_a_checkpoint(good):
    (good / "consolidated.00.pth").write_text("<html>403 Forbidden</html>")
    assert "consolidated.00.pth is not a readable PyTorch checkpoint" in _cli_error(good)


def test_pickled_code_is_refused(good, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, good / "consolidated.00.pth", pickle_module=pickle)
    msg = _cli_error(good)
    assert "not a readable PyTorch checkpoint" in msg


def test_rank_count_that_cannot_split_heads(good):
    with pytest.raises(ConfigError, match="3 ranks cannot split 4 attention heads"):
        open_checkpoint(good, 3)
    proc = torchrun(3, ["-m", "llama_demo.generate", "--ckpt_dir", str(good), "--prompt", "hi"], check=False, timeout=120)
    assert proc.returncode != 0
    assert "error: 3 ranks cannot split 4 attention heads" in proc.stderr


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope", 1)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_hugging_face_repo_folder_finds_its_original_subfolder(tmp_path):
    """Meta-Llama-3-8B-Instruct/original/{params.json, consolidated.00.pth, tokenizer.model}: the
    repo folder is enough for the loader and the tokenizer search."""
    from llama_demo.text.tokenizer import find_tokenizer

    repo = tmp_path / "Meta-Llama-3-8B-Instruct"
    make_checkpoint(repo / "original", "mha", 2, seed=4)
    (repo / "original" / "tokenizer.json").rename(repo / "original" / "tokenizer.model")  # stands in for Meta's file
    ck = open_checkpoint(repo, 2)
    assert ck.paths[0] == repo / "original" / "consolidated.00.pth" and ck.n == 2
    assert find_tokenizer(repo, None) == repo / "original" / "tokenizer.model"
    (repo / "tokenizer.json").write_text("{}")  # the repo's own Hugging Face tokenizer comes first
    assert find_tokenizer(repo, None) == repo / "tokenizer.json"


def test_checklist_names_a_shard_that_is_missing(good):
    """Meta's download writes checklist.chk: a missing last shard (no gap in the numbering) is named."""
    (good / "checklist.chk").write_text("".join(f"{'0' * 32}  {name}\n" for name in
                                                ("params.json", "consolidated.00.pth", "consolidated.01.pth", "consolidated.02.pth")))
    msg = _cli_error(good)
    assert "checklist.chk lists consolidated.02.pth, which is missing" in msg
    (good / "checklist.chk").write_text(f"{'0' * 32}  consolidated.00.pth\n{'0' * 32}  consolidated.01.pth\n")
    assert open_checkpoint(good, 1).n == 2


def _launch(tmp_path: Path, *argv: str, llama_dir: Path) -> subprocess.CompletedProcess:
    """launch.sh with a stand-in virtual environment whose torchrun prints its arguments."""
    import hashlib
    import os

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    if not (venv / "bin" / "python").exists():
        (venv / "bin" / "python").symlink_to(sys.executable)  # launch.sh only checks it is there
    (venv / "bin" / "torchrun").write_text('#!/bin/sh\necho "$@"\n')
    (venv / "bin" / "torchrun").chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    (venv / ".requirements.md5").write_text(hashlib.md5((root / "requirements.txt").read_bytes()).hexdigest() + "\n")
    env = dict(os.environ, LLAMA_DEMO_VENV=str(venv), LLAMA_DIR=str(llama_dir))
    return subprocess.run(["bash", str(root / "launch.sh"), *argv], capture_output=True, text=True, env=env, timeout=60)


def test_launch_takes_meta_and_hugging_face_folders(tmp_path):
    models = tmp_path / "models"
    (models / "Llama3.1-8B-Instruct").mkdir(parents=True)
    (models / "Llama3.1-8B-Instruct" / "params.json").write_text("{}")  # Meta's download
    (models / "Meta-Llama-3-8B-Instruct" / "original").mkdir(parents=True)
    (models / "Meta-Llama-3-8B-Instruct" / "original" / "params.json").write_text("{}")  # Hugging Face repo
    for name in ("Llama3.1-8B-Instruct", "Meta-Llama-3-8B-Instruct"):
        proc = _launch(tmp_path, name, "2", "--port", "8000", llama_dir=models)
        assert proc.returncode == 0, proc.stderr
        assert "--nproc_per_node 2" in proc.stdout and f"app.py --ckpt_dir {models / name} --port 8000" in proc.stdout
    proc = _launch(tmp_path, str(models / "Meta-Llama-3-8B-Instruct"), "1", llama_dir=tmp_path / "elsewhere")
    assert proc.returncode == 0 and f"--ckpt_dir {models / 'Meta-Llama-3-8B-Instruct'}" in proc.stdout, proc.stderr
    proc = _launch(tmp_path, "70B", "8", llama_dir=models)
    assert proc.returncode == 2 and "no model at" in proc.stderr and "original/" in proc.stderr
