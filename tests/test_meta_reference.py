"""Meta's own code as the oracle: checkpoints written by Meta's model classes under a real
model-parallel torchrun group (the way consolidated.NN.pth files are made), Meta's forward for the
reference logits, Meta's ChatFormat and tokenizer for Llama 3 prompts, Meta's list of released
models for params.json. All from `llama-models` (a test dependency, requirements-test.txt)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import llama_models  # a test dependency (requirements-test.txt): no skip, a missing install must fail
import pytest
import torch

from conftest import torchrun
from llama_demo.config import LLAMA3_ROPE_SCALING, ConfigError, ModelArgs, rope_frequencies

# Two rows, so batched prefill and decode are covered; the last token of each is the decode step.
PROMPT = [[5, 6, 7, 8, 9, 10, 11, 12], [100, 200, 300, 383, 1, 2, 3, 4]]
FAMILIES = ("llama3", "llama2")
SHARDS = (1, 2, 3)
RANKS = (1, 2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{(family, shards): Meta's folder} and {(family, shards, ranks): our logits}: Meta writes both
    families with 1, 2 and 3 ranks (one torchrun per rank count), then we load every folder on 1, 2
    and 3 ranks (one torchrun per rank count)."""
    base = tmp_path_factory.mktemp("meta")
    folders = {}
    for shards in SHARDS:
        torchrun(shards, ["tests/workers/meta_checkpoint.py", str(base / f"{{family}}-{shards}"), ",".join(FAMILIES),
                          str(10 + shards), json.dumps(PROMPT)], timeout=240)
        folders.update({(family, shards): base / f"{family}-{shards}" for family in FAMILIES})
    # int8 written by python -m llama_demo.quantize from Meta's vocab-split shards (embedding too)
    from llama_demo.weights.quantize import quantize_checkpoint

    quantize_checkpoint(folders["llama3", 2], base / "int8", "int8", shards=2)
    folders["int8", 2] = base / "int8"
    keys = sorted(folders)
    ours = {}
    for ranks in RANKS:
        out = base / f"ours-{ranks}"
        out.mkdir()
        torchrun(ranks, ["tests/workers/logits_of.py", str(out), json.dumps(PROMPT), *(str(folders[k]) for k in keys)],
                 timeout=240)
        for i, k in enumerate(keys):
            ours[(*k, ranks)] = torch.load(out / f"{i}.pt")
    return {"folders": folders, "ours": ours}


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_metas_reference(runs, family, shards, ranks):
    """Meta's shards (Llama 3: embedding split by vocabulary; Llama 2: by features, vocab_size -1)
    on any rank count: prefill and decode logits equal Meta's forward to 1e-4 in float32."""
    folder = runs["folders"][family, shards]
    meta = torch.load(folder / "meta_logits.pt")
    ours = runs["ours"][family, shards, ranks]
    assert ours["args"]["vocab_size"] == 384  # Llama 2's params.json says -1
    for step in ("prefill", "decode"):
        assert ours[step].shape == meta[step].shape
        assert meta[step].abs().max() > 1.0  # not a degenerate all-zero model
        assert (ours[step] - meta[step]).abs().max().item() < 1e-4, step


def test_metas_shards_hold_the_layouts_we_read(runs):
    """What the loader has to cope with, as Meta's layers wrote it."""
    l3 = torch.load(runs["folders"]["llama3", 2] / "consolidated.01.pth", weights_only=True)
    l2 = torch.load(runs["folders"]["llama2", 2] / "consolidated.01.pth", weights_only=True)
    assert l3["tok_embeddings.weight"].shape == (192, 96)  # VocabParallelEmbedding: half the rows
    assert l2["tok_embeddings.weight"].shape == (384, 48)  # ParallelEmbedding: half the features
    assert l3["output.weight"].shape == l2["output.weight"].shape == (192, 96)
    assert json.loads((runs["folders"]["llama2", 2] / "params.json").read_text())["vocab_size"] == -1


@pytest.mark.parametrize("ranks", RANKS)
def test_quantized_copy_of_a_meta_checkpoint_loads(runs, ranks):
    """int8 written by python -m llama_demo.quantize from Meta's vocab-split shards (embedding
    quantized too) loads on 1, 2 and 3 ranks, close to Meta's float logits."""
    meta = torch.load(runs["folders"]["llama3", 2] / "meta_logits.pt")
    got = runs["ours"]["int8", 2, ranks]["prefill"]
    rel = ((got - meta["prefill"]).norm() / meta["prefill"].norm()).item()
    assert 0 < rel < 0.06, rel  # int8 on random weights: a few percent (tests/test_quant.py)


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_frequencies_match_metas(scaled):
    """Meta's precompute_freqs_cis (Llama 3.1 scaling: apply_scaling) at a real head size."""
    from llama_models.llama3.model import precompute_freqs_cis

    from llama_demo.model.transformer import rope_table

    args = ModelArgs(dim=4096, n_heads=32, rope_theta=500000.0, use_scaled_rope=scaled)
    meta = precompute_freqs_cis(128, 1024, 500000.0, scaled)
    # Meta computes the frequencies in float32, we in float64: the angles part by position x
    # float32 rounding (2e-4 radians at position 4096), within 1e-4 up to 1024
    assert torch.allclose(rope_table(args, 1024), meta, atol=1e-4)
    ours = torch.tensor(rope_frequencies(128, 500000.0, args.rope_scaling))
    assert torch.allclose(ours.float(), meta[1].angle(), rtol=1e-6)
    assert scaled == (not torch.allclose(ours, torch.tensor(rope_frequencies(128, 500000.0))))


def test_llama32_rope_factor_matches_transformers():
    """Llama 3.2 1B/3B's factor 32 (their config.json; Meta's reference code applies 8,
    meta-llama/llama-models#241): our formula against transformers' llama3 rope."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(LLAMA3_ROPE_SCALING, factor=32.0)
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = torch.tensor(rope_frequencies(64, 500000.0, scaling))
    assert torch.allclose(ours.float(), hf, rtol=1e-6)
    assert ours[-1] * 32 == pytest.approx(rope_frequencies(64, 500000.0)[-1])  # longest wavelength: 32x slower


def test_every_released_text_models_params_are_understood():
    """Each params.json Meta lists (sku_list arch_args), scaled down with the same keys and ratios:
    text models load with every field as Meta's ModelArgs reads it; vision and Meta-quantized ones
    are refused with a one-line reason naming the key."""
    from dataclasses import fields

    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.sku_list import all_registered_models

    from llama_demo.config import PARAMS_ALIASES, PARAMS_REFUSED

    understood = {f.name for f in fields(ModelArgs)} | set(PARAMS_ALIASES) | set(PARAMS_REFUSED)
    seen = 0
    for m in all_registered_models():
        raw = dict(m.arch_args)
        if not raw:  # Llama 4 (mixture of experts): its params are not in the list
            continue
        seen += 1
        assert set(raw) <= understood, (m.descriptor(), set(raw) - understood)  # none silently ignored
        small = dict(raw, dim=raw["dim"] // 32, n_layers=2, vocab_size=256)
        for key in ("hidden_dim", "multiple_of"):
            if key in small:
                small[key] = max(1, raw[key] // 32)
        refused = [k for k in raw if k.startswith("vision_") or k in ("quantization_args", "lora_args")]
        if refused:
            with pytest.raises(ConfigError) as e:
                ModelArgs.from_params(small, source=m.descriptor())
            assert refused[0] in str(e.value) and "\n" not in str(e.value)
            continue
        ours = ModelArgs.from_params(json.loads(json.dumps(small)), source=m.descriptor())
        ours.validate()
        meta = MetaArgs(**small)
        assert (ours.dim, ours.n_layers, ours.n_heads, ours.n_kv_heads, ours.norm_eps) == (
            meta.dim, meta.n_layers, meta.n_heads, meta.n_kv_heads, meta.norm_eps), m.descriptor()
        assert ours.rope_theta == small.get("rope_theta", small.get("rope_freq_base")), m.descriptor()
        assert ours.use_scaled_rope == small["use_scaled_rope"]
        if "hidden_dim" in small:  # Llama Guard 3 1B INT4 (pruned): FFN size given outright
            assert ours.ffn_hidden == small["hidden_dim"]
        else:  # Meta's FeedForward sizing (llama3/model.py), not ours restated
            h = int(2 * 4 * meta.dim / 3)
            h = int(meta.ffn_dim_multiplier * h) if meta.ffn_dim_multiplier is not None else h
            assert ours.ffn_hidden == meta.multiple_of * math.ceil(h / meta.multiple_of), m.descriptor()
    assert seen >= 30


def test_llama3_chat_prompt_ids_match_metas_chat_format():
    """Our Llama 3 chat format on our tiktoken reader of Meta's tokenizer.model gives the ids
    Meta's ChatFormat gives, for system + multi-turn dialogs with non-ASCII text."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from llama_demo.text.chat_format import Llama3ChatFormat, Message
    from llama_demo.text.tokenizer import TiktokenTokenizer, load_tokenizer

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    ours = load_tokenizer(path)
    assert isinstance(ours, TiktokenTokenizer) and ours.vocab_size == 128256
    meta = MetaChatFormat(MetaTokenizer(path))
    dialogs = [
        [("user", "What is the capital of France?")],
        [("system", "You are a terse assistant."), ("user", "Name three llamas."),
         ("assistant", "Alpaca, guanaco, vicuña."), ("user", "Und auf Deutsch? 東京 🦙")],
        [("user", "def f(x):\n    return x  # code\n\n\nkeep   spaces"), ("assistant", "OK."), ("user", "<|eot_id|> is text here")],
        # whitespace around a message is the message's: Meta's format keeps it (a pasted code
        # block's indentation, a trailing newline)
        [("system", "  indented\n"), ("user", "\n    x = 1\n\n"), ("assistant", " a "), ("user", "\t")],
    ]
    for dialog in dialogs:
        want = meta.encode_dialog_prompt([RawMessage(role=r, content=c) for r, c in dialog]).tokens
        got = Llama3ChatFormat(ours).encode_dialog([Message(r, c) for r, c in dialog])
        assert got == want, dialog


def test_metas_llama31_in_a_hugging_face_repo_folder_generates_on_two_ranks(tmp_path):
    """The issue's case: Llama 3.1 params.json and 128256-token vocabulary, 2 shards from Meta's
    layers, Meta's tiktoken tokenizer.model, all in a Hugging Face repo's original/ subfolder. The
    repo folder is enough: 2 ranks start, and the first greedy token is Meta's logits' argmax."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    repo = tmp_path / "Meta-Llama-3.1-8B-Instruct"
    tok_path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    prompt = MetaTokenizer(tok_path).encode("The capital of France is", bos=True, eos=False)
    torchrun(2, ["tests/workers/meta_checkpoint.py", str(repo / "original"), "llama3-128k", "7", json.dumps([prompt])],
             timeout=240)
    (repo / "original" / "tokenizer.model").write_bytes(tok_path.read_bytes())
    (repo / "config.json").write_text("{}")  # the Hugging Face side of the repo, not read
    meta = torch.load(repo / "original" / "meta_logits.pt")
    proc = torchrun(2, ["-m", "llama_demo.generate", "--ckpt_dir", str(repo), "--prompt", "The capital of France is",
                        "--max_new_tokens", "3", "--temperature", "0", "--json"], timeout=240)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Meta's prefill saw all but the prompt's last token, its decode step the last one
    assert out["tokens"][0] == int(meta["decode"][0, -1].argmax()), out
    assert len(out["tokens"]) == 3
