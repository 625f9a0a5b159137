"""llama.cpp's GGUF files (llama architecture) into Meta's layout: metadata to params.json, tensors
dequantized and renamed, and the tokenizer rebuilt from the GGUF's metadata (a SentencePiece
protobuf for Llama 1/2 vocabularies, a byte-level BPE tokenizer.json for GPT-2 style ones).

    python -m llama_demo.convert --gguf model.gguf --out models/smollm2 --shards 1
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from .folder import atomic_dir, check_out_dir
from .convert import CONVERTER_VERSION, ConvertError, ffn_params, resolve_dtype, save_converted
from ..config import LLAMA3_ROPE_SCALING, ModelArgs, rope_frequencies
from ..text.tokenizer_files import LLAMA3_PAT_STR, gpt2_bytes_to_unicode


def _nice_float(x: float) -> float:
    """GGUF stores float32: 1e-5 arrives as 9.999999747e-06. Keep the float32's shortest spelling."""
    return float(str(np.float32(x)))


def meta_rope_scale_factors(head_dim: int, theta: float, factor: float = LLAMA3_ROPE_SCALING["factor"]) -> torch.Tensor:
    """freq / scaled_freq for each rotary pair under Meta's Llama 3 scaling (llama.cpp's rope_freqs)."""
    plain = torch.tensor(rope_frequencies(head_dim, theta), dtype=torch.float64)
    return plain / torch.tensor(rope_frequencies(head_dim, theta, dict(LLAMA3_ROPE_SCALING, factor=factor)), dtype=torch.float64)



_GGUF_LAYER_NAMES = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                   "output.weight": "output.weight"}
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# Pre-tokenizer splits for byte-level BPE vocabularies, by `tokenizer.ggml.pre`, as llama.cpp's
# llama-vocab.cpp applies them. None: GPT-2's own regex (tokenizers' ByteLevel with use_regex).
# "digits": every digit alone first, then GPT-2's regex -- SmolLM/StarCoder's Digits pre-tokenizer.
_LLAMA3_SPLIT = LLAMA3_PAT_STR  # Meta's tiktoken split pattern (text/tokenizer.py)
BYTE_LEVEL_PRE_TOKENIZERS: dict[str, str | None] = {
    "default": None, "gpt2": None, "gpt-2": None, "mpt": None, "olmo": None, "jais": None,
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "command-r": "digits",
    "codeshell": "digits", "exaone": "digits",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
}
_BOS_BY_DEFAULT_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}  # Llama 3 vocabularies want BOS


class _GGUF:
    """The metadata and tensors of one GGUF file, read through the `gguf` package."""

    def __init__(self, path: Path):
        import gguf
        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:
            raise ConvertError(f"{path} is not a readable GGUF file: {e}") from None
        self.arch = self.get("general.architecture")

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConvertError(f"{self.path} lacks the metadata key {key}")
        return value

    def tensors(self) -> dict:
        return {t.name: t for t in self.reader.tensors}


def _gguf_tensor(t) -> torch.Tensor:
    """Dequantize one GGUF tensor to float32 in PyTorch's shape (GGUF lists the fastest dim first)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    if t.tensor_type in (Q.I8, Q.I16, Q.I32, Q.I64, Q.F64):
        raise ConvertError(f"tensor {t.name} has type {t.tensor_type.name}; expected float or quantized weights")
    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ConvertError(f"tensor {t.name}: the gguf package cannot dequantize {t.tensor_type.name}; "
                           "requantize the file (llama-quantize) to Q8_0 / Q4_K or a float type") from None
    shape = tuple(int(n) for n in reversed(t.shape))
    if not arr.flags.writeable:  # F32 comes back as a view of the read-only file mapping
        arr = arr.copy()
    return torch.from_numpy(arr.astype(np.float32, copy=False).reshape(shape))


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, shards: int = 1,
                 dtype: str | torch.dtype | None = None) -> Path:
    """Convert a llama-architecture GGUF file into Meta's layout in out_dir (a new or empty folder)."""
    path, out = Path(gguf_path), Path(out_dir)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist; expected a .gguf file")
    check_out_dir(out)  # before the slow part
    want_dtype = resolve_dtype(dtype)
    g = _GGUF(path)
    if g.arch != "llama":
        raise ConvertError(f"{path} has architecture {g.arch!r}; only 'llama' GGUF files can be converted")
    args, extra = _gguf_model_args(g)
    tokenizer_files = _gguf_tokenizer(g)  # before the weights: a tokenizer we cannot build stops early

    state = _gguf_state(g, args, want_dtype or _gguf_float_dtype(g))
    extra["converted_from"] = {"file": path.name, "size": path.stat().st_size, "converter_version": CONVERTER_VERSION}

    with atomic_dir(out) as tmp:
        save_converted(state, args, tmp, shards, extra)
        for name, content in tokenizer_files.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
    return out


def _gguf_model_args(g: _GGUF) -> tuple[ModelArgs, dict]:
    a = g.arch
    if g.get(f"{a}.expert_count", 0):
        raise ConvertError(f"{g.path} is a mixture-of-experts model ({a}.expert_count); only dense LLaMA models are supported")
    dim, n_heads = int(g.need(f"{a}.embedding_length")), int(g.need(f"{a}.attention.head_count"))
    n_kv = int(g.get(f"{a}.attention.head_count_kv", n_heads))
    head_dim = dim // n_heads
    for key in (f"{a}.rope.dimension_count", f"{a}.attention.key_length", f"{a}.attention.value_length"):
        v = g.get(key)
        if v is not None and int(v) != head_dim:
            raise ConvertError(f"{g.path}: {key} is {v} but dim / n_heads is {head_dim}; Meta's layout cannot hold this model")
    scaling = g.get(f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConvertError(f"{g.path}: rope scaling {scaling!r} is not supported (only Llama 3.1's, via rope_freqs)")
    embd = g.tensors().get("token_embd.weight")
    if embd is None:
        raise ConvertError(f"{g.path} has no token_embd.weight")
    vocab = int(g.get(f"{a}.vocab_size", int(embd.shape[1])))
    args = ModelArgs(dim=dim, n_layers=int(g.need(f"{a}.block_count")), n_heads=n_heads, n_kv_heads=n_kv,
                     vocab_size=vocab, norm_eps=_nice_float(g.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
                     rope_theta=_nice_float(g.get(f"{a}.rope.freq_base", 10000.0)),
                     **ffn_params(dim, int(g.need(f"{a}.feed_forward_length"))))
    extra = {}
    if g.get(f"{a}.context_length") is not None:
        extra["max_seq_len_trained"] = int(g.get(f"{a}.context_length"))
    return args, extra


def _gguf_float_dtype(g: _GGUF) -> torch.dtype:
    """The source's precision when every matrix is stored in one float type; float32 for anything
    quantized (dequantized values are float32)."""
    from gguf import GGMLQuantizationType as Q
    float_types = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    found = {float_types.get(t.tensor_type) for t in g.reader.tensors if len(t.shape) == 2}
    return found.pop() if len(found) == 1 and None not in found else torch.float32


def _gguf_state(g: _GGUF, args: ModelArgs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, t in g.tensors().items():
        if name == "rope_freqs.weight":  # Llama 3.1: llama.cpp stores the scaling per frequency
            args.rope_scaling_factor = _check_rope_freqs(g, _gguf_tensor(t), args)
            args.use_scaled_rope = True
            continue
        m = _GGUF_BLOCK_RE.match(name)
        if m and m.group(2) in _GGUF_LAYER_NAMES:
            meta = f"layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}"
        elif name in _GGUF_TOP_NAMES:
            meta = _GGUF_TOP_NAMES[name]
        else:
            raise ConvertError(f"{g.path} holds tensor {name}, which a LLaMA model does not have")
        # llama.cpp's converter already put attn_q / attn_k rows in Meta's interleaved rotary order.
        state[meta] = _gguf_tensor(t).to(dtype)
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # tied embeddings: Meta's layout stores both
    return state


def _check_rope_freqs(g: _GGUF, factors: torch.Tensor, args: ModelArgs) -> float | None:
    """The Llama 3 scaling factor llama.cpp's per-frequency rope_freqs encode (None: Llama 3.1's 8):
    the longest wavelength is slowed by exactly the factor; every other entry must then agree."""
    factor = round(float(factors[-1]), 3) if factors.numel() else 0.0
    want = meta_rope_scale_factors(args.head_dim, args.rope_theta, factor) if factor > 0 else None
    if want is None or factors.shape != want.shape or not torch.allclose(factors.double(), want, rtol=1e-3):
        raise ConvertError(f"{g.path}: rope_freqs.weight is not Llama 3's rotary scaling (Meta's use_scaled_rope "
                           f"with low/high frequency factors {LLAMA3_ROPE_SCALING['low_freq_factor']}/"
                           f"{LLAMA3_ROPE_SCALING['high_freq_factor']}), the only one supported")
    return None if factor == LLAMA3_ROPE_SCALING["factor"] else factor


def _gguf_tokenizer(g: _GGUF) -> dict[str, str | bytes]:
    """The tokenizer files rebuilt from the GGUF's tokenizer metadata: tokenizer.json for byte-level
    BPE, tokenizer.model for SentencePiece vocabularies; tokenizer_config.json for both."""
    kind = g.get("tokenizer.ggml.model")
    files: dict[str, str | bytes] = {}
    if kind == "gpt2":
        files["tokenizer.json"] = _byte_level_bpe(g).to_str(pretty=False)
    elif kind == "llama":
        files["tokenizer.model"] = _sentencepiece_model(g)
    else:
        raise ConvertError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2' byte-level BPE "
                           "and 'llama' SentencePiece)")
    tokens = g.need("tokenizer.ggml.tokens")
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast" if kind == "gpt2" else "LlamaTokenizer"}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = g.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[name] = tokens[int(token_id)]
    add_bos = g.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's defaults when the file does not say
        add_bos = kind == "llama" or g.get("tokenizer.ggml.pre") in _BOS_BY_DEFAULT_PRE
    config["add_bos_token"] = bool(add_bos)
    config["add_eos_token"] = bool(g.get("tokenizer.ggml.add_eos_token", False))
    template = g.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    if g.get(f"{g.arch}.context_length") is not None:
        config["model_max_length"] = int(g.get(f"{g.arch}.context_length"))
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return files


def _sentencepiece_model(g: _GGUF) -> bytes:
    """A SentencePiece BPE tokenizer.model rebuilt from a 'llama' GGUF vocabulary.

    llama.cpp's converter copies each piece's text, score and type (SentencePiece's own type
    numbers) out of tokenizer.model, so writing them back with the normalizer settings gives the
    same model. Serialized by hand (protobuf wire format) to avoid a protobuf dependency.
    """
    if g.get("tokenizer.ggml.precompiled_charsmap"):
        raise ConvertError(f"{g.path}: SentencePiece vocabularies with a normalization charsmap are not supported")
    tokens: list[str] = g.need("tokenizer.ggml.tokens")
    scores = g.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise ConvertError(f"{g.path}: tokenizer.ggml.tokens, scores and token_type differ in length")
    if list(types).count(2) != 1:
        raise ConvertError(f"{g.path}: a SentencePiece vocabulary needs exactly one unknown token (token_type 2)")

    def piece(i: int, default: str) -> str:
        token_id = g.get(f"tokenizer.ggml.{('bos_token_id', 'eos_token_id', 'padding_token_id')[i]}")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else default

    unk = list(types).index(2)
    ids = {t: i for i, t in enumerate(tokens)}
    bos, eos, pad = piece(0, "<s>"), piece(1, "</s>"), piece(2, "<pad>")
    trainer = (_pb_varint_field(3, 2)  # model_type BPE
               + _pb_varint_field(4, len(tokens))
               + _pb_varint_field(35, int(6 in types))  # byte_fallback when <0x00>... pieces exist
               + _pb_varint_field(40, unk) + _pb_varint_field(41, ids.get(bos, -1))
               + _pb_varint_field(42, ids.get(eos, -1)) + _pb_varint_field(43, ids.get(pad, -1))
               + _pb_bytes_field(45, tokens[unk].encode()) + _pb_bytes_field(46, bos.encode())
               + _pb_bytes_field(47, eos.encode()) + _pb_bytes_field(48, pad.encode()))
    normalizer = (_pb_bytes_field(1, b"identity")
                  + _pb_varint_field(3, int(bool(g.get("tokenizer.ggml.add_space_prefix", True))))
                  + _pb_varint_field(4, int(bool(g.get("tokenizer.ggml.remove_extra_whitespaces", False))))
                  + _pb_varint_field(5, 1))  # escape_whitespaces: spaces become U+2581
    out = bytearray()
    for text, score, kind in zip(tokens, scores, types):
        if int(kind) not in (1, 2, 3, 4, 5, 6):
            raise ConvertError(f"{g.path}: token {text!r} has unknown token_type {kind}")
        out += _pb_bytes_field(1, _pb_bytes_field(1, text.encode()) + _pb_float_field(2, float(score))
                               + _pb_varint_field(3, int(kind)))
    out += _pb_bytes_field(2, trainer) + _pb_bytes_field(3, normalizer)
    return bytes(out)


def _pb_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values travel as 64-bit two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_varint_field(field: int, value: int) -> bytes:
    return _pb_varint(field << 3) + _pb_varint(value)


def _pb_bytes_field(field: int, value: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(value)) + value


def _pb_float_field(field: int, value: float) -> bytes:
    return _pb_varint(field << 3 | 5) + struct.pack("<f", value)


def _byte_level_bpe(g: _GGUF):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise ConvertError(f"{g.path}: pre-tokenizer {pre!r} is not known; add its split regex (llama.cpp's "
                           f"llama-vocab.cpp) to BYTE_LEVEL_PRE_TOKENIZERS in llama_demo/weights/gguf.py")
    tokens: list[str] = g.need("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = g.get("tokenizer.ggml.merges")
    if not merges:
        raise ConvertError(f"{g.path}: a byte-level BPE vocabulary needs tokenizer.ggml.merges")
    spelling = gpt2_bytes_to_unicode()
    alphabet = set(spelling.values())
    # Every real token is spelled in the byte alphabet; respell any that is not, as transformers does.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConvertError(f"{g.path}: tokenizer.ggml.tokens holds duplicate tokens")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ConvertError(f"{g.path}: malformed merge {m!r}")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    split = BYTE_LEVEL_PRE_TOKENIZERS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3, e.g. <|im_start|>) and user-defined ones (type 4) must match whole in
    # the text instead of being cut into byte pieces. A control token outside the byte alphabet is a
    # llama.cpp mislabel and stays an ordinary token (as in transformers).
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4])
    return tok


