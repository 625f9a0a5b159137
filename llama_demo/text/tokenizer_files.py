"""What a tokenizer's files hold, read without their libraries where we can: Meta's Llama 3
vocabulary facts (split regex, special tokens), tiktoken's BPE ranks file, a SentencePiece
ModelProto edited in place, GPT-2's byte alphabet that byte-level BPE vocabularies are spelled in
(tokenizer.py's backends decode with it, weights/gguf.py rebuilds tokenizer.json with it), and
the tokenizer_config.json family beside a Hugging Face tokenizer.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import read_json_object


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable; the message names the file and what was expected."""


# --- Llama 3 (tiktoken) -----------------------------------------------------------------------------

# meta-llama/llama3 llama/tokenizer.py: split regex and the 256 special tokens after the BPE ranks.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # end of turn
] + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - 5)]
# Llama 3.1 (meta-llama/llama-models) names some reserved slots; same ids, so accept both names.
LLAMA31_TOKEN_ALIASES = {
    "<|finetune_right_pad_id|>": "<|reserved_special_token_2|>",
    "<|step_id|>": "<|reserved_special_token_3|>",
    "<|eom_id|>": "<|reserved_special_token_4|>",  # end of message (tool call)
    "<|python_tag|>": "<|reserved_special_token_5|>",
}
TIKTOKEN_LINE_RE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")  # one line of a tiktoken file: what tells it from a SentencePiece model


def read_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    """Ranks of a tiktoken BPE file, as tiktoken.load.load_tiktoken_bpe reads them.

    Not that function itself: it caches files under /tmp keyed by path only, so a changed file at
    the same path would be served stale.
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tiktoken BPE file ({e.strerror})") from e
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}:{n}: expected a tiktoken line 'base64token rank', got {line[:40]!r}") from e
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken BPE file")
    # Special tokens are numbered from len(ranks) on, so the ranks must be exactly 0..len-1.
    if max(ranks.values()) != len(ranks) - 1 or len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{path}: tiktoken ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


# --- SentencePiece ----------------------------------------------------------------------------------


def without_dummy_prefix(proto: bytes) -> bytes:
    """A SentencePiece ModelProto with normalizer_spec.add_dummy_prefix = false (sentencepiece has no
    switch for it at encode time, and protobuf is not a dependency): the NormalizerSpec (field 3) gets
    a last `add_dummy_prefix` (its field 3, varint 0), and protobuf's last occurrence of a field wins."""
    def varint(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = proto[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, at

    def encode_varint(value: int) -> bytes:
        out = bytearray()
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        return bytes(out + bytes([value]))

    out, at = bytearray(), 0
    while at < len(proto):
        start = at
        key, at = varint(at)
        kind = key & 7
        if kind == 2:  # length-delimited: a message, string or bytes
            size, body = varint(at)
            at = body + size
            if key >> 3 == 3:
                spec = proto[body:at] + b"\x18\x00"
                out += encode_varint(key) + encode_varint(len(spec)) + spec
                continue
        elif kind == 0:
            _, at = varint(at)
        else:  # fixed 64-bit (1) or 32-bit (5)
            at += 8 if kind == 1 else 4
        out += proto[start:at]
    return bytes(out)


# --- byte-level BPE ---------------------------------------------------------------------------------


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in:
    printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# --- tokenizer_config.json and friends --------------------------------------------------------------


@dataclass
class TokenizerConfig:
    """What tokenizer_config.json (and friends) beside a tokenizer say; None where they are silent."""

    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool | None = None
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id (int or list)


def load_tokenizer_config(folder: str | Path) -> TokenizerConfig:
    """Read tokenizer_config.json, special_tokens_map.json, chat_template.jinja and
    generation_config.json in `folder`, those that exist (HF spellings)."""
    folder = Path(folder)
    cfg, special_map, gen = (read_json_object(folder / name, TokenizerError) for name in
                             ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"))

    def token(key: str) -> str | None:
        value = cfg.get(key, special_map.get(key))
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        return value if isinstance(value, str) else None

    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    eos_ids = gen.get("eos_token_id")
    eos_ids = (eos_ids,) if isinstance(eos_ids, int) else tuple(i for i in eos_ids or () if isinstance(i, int))
    add_bos = cfg.get("add_bos_token")
    return TokenizerConfig(
        bos_token=token("bos_token"),
        eos_token=token("eos_token"),
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        chat_template=template if isinstance(template, str) else None,
        eos_token_ids=eos_ids,
    )
