"""Checkpoint folders: resharding arithmetic and the clear errors a broken folder gets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint, python_module, random_state, torchrun
from llama_demo.weights.checkpoint import CheckpointError, kv_heads_of_part, open_checkpoint, split_dim
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


@pytest.mark.parametrize("shards,world", [(1, 2), (2, 1), (2, 4), (4, 2)])
def test_rank_slices_reassemble_the_full_tensors(tmp_path, shards, world):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=96)
    state = random_state(args, 0)
    make = tmp_path / "ck"
    from llama_demo.weights.checkpoint import save_sharded

    save_sharded(state, args, make, shards)
    ck = open_checkpoint(make, world)
    for name, full in state.items():
        d = split_dim(name)
        parts = [ck.rank_slice(name, r, world) for r in range(world)]
        if d is None:
            assert all(torch.equal(p, full) for p in parts)
        elif "attention.wk" in name or "attention.wv" in name:
            if world <= 2:
                assert torch.equal(torch.cat(parts, 0), full)
            else:  # 4 ranks, 2 KV heads: each head replicated on two ranks
                assert torch.equal(torch.cat(parts[::2], 0), full) and torch.equal(parts[0], parts[1])
        else:
            assert torch.equal(torch.cat(parts, d), full)


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
