"""Tokenizers behind one interface, and incremental (streaming) detokenisation.

Three backends:
- SentencePieceTokenizer: LLaMA 1 / Llama 2 `tokenizer.model` (32000 pieces, <s>=1, </s>=2).
- TiktokenTokenizer: Llama 3 `tokenizer.model`, a tiktoken BPE file of `base64token rank` lines,
  read as meta-llama/llama3 `llama/tokenizer.py` reads it (same split regex, same 256 special
  tokens in the same order).
- HFTokenizer: a Hugging Face `tokenizer.json` (byte-level BPE, ...) through the `tokenizers`
  library, with `tokenizer_config.json` beside it for bos/eos, add_bos_token and chat_template.

`encode` treats its text as text on every backend: a user typing "<|eot_id|>" gets the tokens
of those characters, never the special id. `encode_with_special_tokens` is for text we built
ourselves (a rendered chat template), where special-token strings must become their ids.
`decode` never renders BOS/EOS/special tokens.

StreamDecoder turns a stream of ids into text pieces: it holds back incomplete UTF-8 and keeps
SentencePiece's leading spaces by decoding each new id together with a few preceding ids and
emitting only the difference (the prefix/read offsets of text-generation-inference).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 byte sequence

# Special tokens that end a model's turn, whatever the family; stop_ids holds those a vocabulary has.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable; the message names the file and what was expected."""


class Tokenizer:
    """The interface the rest of llama_demo uses; the three backends below fill it in."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    stop_ids: frozenset[int] = frozenset()  # ids that end a generation
    special_ids: frozenset[int] = frozenset()  # ids decode() never renders
    add_bos: bool = True  # whether a plain prompt starts with BOS
    chat_template: str | None = None  # the model's own Jinja chat template, if it ships one

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Ids of `text`, special-token strings in it encoded as plain text. bos=None: self.add_bos."""
        ids = self._encode_text(text)
        if self.add_bos if bos is None else bos:
            ids.insert(0, self._require(self.bos_id, "BOS"))
        if eos:
            ids.append(self._require(self.eos_id, "EOS"))
        return ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings (like "<|im_start|>") turned into their ids.

        For text we rendered ourselves (chat templates); adds no BOS of its own.
        """
        specials = self._special_tokens()
        if not specials:
            return self._encode_text(text)
        ids: list[int] = []
        for i, part in enumerate(self._special_split_re.split(text)):
            if i % 2:  # odd parts are the separators the capture group kept
                ids.append(specials[part])
            elif part:
                ids.extend(self._encode_text(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; BOS/EOS/special tokens and ids outside the vocabulary are not rendered."""
        raise NotImplementedError

    def encode_fragment(self, text: str) -> list[int]:
        """Ids of `text` as a piece of a longer text: no BOS and no SentencePiece dummy-prefix space,
        so that decode() of them is `text` again (what a grammar engine tokenizing forced bytes needs)."""
        return self._encode_text(text)

    def token_id(self, piece: str) -> int | None:
        """Id of the single token spelled `piece` (e.g. "<|eot_id|>"), None if the vocabulary lacks it."""
        return self._special_tokens().get(piece)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for (a special token: its spelling), for logprobs' `bytes`;
        a token may hold part of a character. Backends that know their pieces override this."""
        specials = {i: t for t, i in self._special_tokens().items()}
        return specials[token_id].encode() if token_id in specials else self.decode([token_id]).encode()

    def token_text(self, token_id: int) -> str:
        """One token as text for logprobs (OpenAI's `token`): a token that is part of a character
        is spelled by its bytes, "bytes:\\xe6", as OpenAI does."""
        data = self.token_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (special-token spellings included, +1 for
        SentencePiece's dropped leading space): a text of C characters has at least
        C / max_token_chars tokens, so an overlong prompt is refused without tokenizing it."""
        longest = max((len(self.decode([i])) for i in range(self.vocab_size)), default=1)
        return max([longest, *map(len, self._special_tokens())]) + 1

    def _special_tokens(self) -> dict[str, int]:
        return {}

    @cached_property
    def _special_split_re(self) -> re.Pattern:
        # longest first, so "<|eot_id|>" is never cut short by a special token it begins with
        names = sorted(self._special_tokens(), key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, names)) + ")")

    def _require(self, token_id: int | None, what: str) -> int:
        if token_id is None:
            raise TokenizerError(f"{type(self).__name__} has no {what} token; encode with {what.lower()}=False")
        return token_id

    def _in_vocab(self, ids: Sequence[int]) -> list[int]:
        # Models may pad their output layer past the tokenizer's vocabulary; such ids are no text.
        n = self.vocab_size
        return [int(i) for i in ids if 0 <= i < n]


# --- SentencePiece (LLaMA 1, Llama 2) -------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({_first_line(e)})") from e
        sp = self._sp
        self.vocab_size = sp.vocab_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.bos_token = sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = sp.id_to_piece(self.eos_id) if self.eos_id is not None else None
        self.stop_ids = frozenset(i for i in (self.eos_id,) if i is not None)
        self.add_bos = True  # Meta's generation code gives every prompt BOS
        # Control pieces (<s>, </s>) decode to nothing; <unk> decodes to " ⁇ ", so it is not hidden.
        self.special_ids = frozenset(i for i in range(self.vocab_size) if sp.is_control(i))
        # Strings encode_with_special_tokens turns into ids, as transformers' LlamaTokenizer does.
        self._specials = {
            sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)
        }

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_fragment(self, text: str) -> list[int]:
        # sp.encode("{") is "▁{": SentencePiece puts a space before every text it encodes
        return self._fragment_sp.encode(text)

    @cached_property
    def _fragment_sp(self):
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_proto=_without_dummy_prefix(self._sp.serialized_model_proto()))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._in_vocab(ids))

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else ""
        if self._sp.is_byte(token_id):  # byte fallback pieces are spelled <0xE6>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def token_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers unk_id for a piece it does not know
        return None if self._sp.is_unknown(i) and piece != self._sp.id_to_piece(i) else i

    def _special_tokens(self) -> dict[str, int]:
        return self._specials


def _without_dummy_prefix(proto: bytes) -> bytes:
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


# --- tiktoken (Llama 3) ---------------------------------------------------------------------------

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
# tiktoken panics on very long inputs (openai/tiktoken#195); Meta encodes in slices this long.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
_TIKTOKEN_LINE_RE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


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


class TiktokenTokenizer(Tokenizer):
    def __init__(self, path: str | Path):
        import tiktoken

        self.path = Path(path)
        ranks = read_tiktoken_bpe(self.path)
        self._n_base = len(ranks)
        self.special_tokens = {tok: self._n_base + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        try:
            self._enc = tiktoken.Encoding(
                name=self.path.name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
            )
        except ValueError as e:
            raise TokenizerError(f"{self.path}: tiktoken rejected the BPE ranks ({_first_line(e)})") from e
        self.vocab_size = self._n_base + len(LLAMA3_SPECIAL_TOKENS)
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.bos_id = self.special_tokens[self.bos_token]
        self.eos_id = self.special_tokens[self.eos_token]
        self.stop_ids = frozenset(self.token_id(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))
        self.special_ids = frozenset(self.special_tokens.values())
        self.add_bos = True

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for part in _split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                # disallowed_special=(): special-token strings in user text are encoded as text
                ids.extend(self._enc.encode(part, allowed_special=set(), disallowed_special=()))
        return ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for part in _split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                ids.extend(self._enc.encode(part, allowed_special="all"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        n = self._n_base
        data = self._enc.decode_bytes([int(i) for i in ids if 0 <= i < n])
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if token_id >= self._n_base:
            return super().token_bytes(token_id)
        return self._enc.decode_single_token_bytes(token_id)

    def token_id(self, piece: str) -> int | None:
        piece = LLAMA31_TOKEN_ALIASES.get(piece, piece)
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        try:
            return self._enc.encode_single_token(piece.encode("utf-8"))
        except KeyError:
            return None

    def _special_tokens(self) -> dict[str, int]:
        return self.special_tokens


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Split `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars."""
    run, run_is_space, start = 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run, run_is_space = 1, is_space
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


# --- Hugging Face tokenizer.json ------------------------------------------------------------------


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
    cfg = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    gen = _read_json(folder / "generation_config.json")

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


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the facts transformers keeps beside it (bos/eos, add_bos)."""

    def __init__(self, tok: Any, config: TokenizerConfig | None = None, name: str = "tokenizer.json"):
        from tokenizers import Tokenizer as _HFTok

        config = config or TokenizerConfig()
        self.name = name
        # A tokenizer.json may carry truncation/padding settings; a prompt must never be cut silently.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok  # parses special-token strings: for rendered chat templates
        self._text_tok = _HFTok.from_str(tok.to_str())  # same vocabulary, special-token strings as text
        self._text_tok.encode_special_tokens = True
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._specials = {t.content: i for i, t in added.items() if t.special}

        self.bos_token, self.eos_token = config.bos_token, config.eos_token
        self.bos_id = tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = tok.token_to_id(self.eos_token) if self.eos_token else None
        if config.add_bos_token is not None:
            self.add_bos = config.add_bos_token and self.bos_id is not None
        else:
            # No say in the config: add BOS iff the tokenizer's own post-processor would.
            self.add_bos = self.bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]
        stops = {self.eos_id, *config.eos_token_ids, *(self._specials.get(t) for t in END_OF_TURN_TOKENS)}
        self.stop_ids = frozenset(i for i in stops if i is not None)
        self.chat_template = config.chat_template

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        try:
            tok = _HFTok.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclass for bad JSON/models
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({_first_line(e)})") from e
        return cls(tok, load_tokenizer_config(path.parent), name=path.name)

    def _encode_text(self, text: str) -> list[int]:
        # add_special_tokens=False: BOS is ours to add (per add_bos), not the post-processor's
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._in_vocab(ids), skip_special_tokens=True)

    def token_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if piece is None or token_id in self.special_ids or not self._byte_level:
            return super().token_bytes(token_id)
        try:  # byte-level BPE spells each byte as one printable character (GPT-2's table)
            return bytes(_BYTE_LEVEL_DECODE[c] for c in piece)
        except KeyError:  # an added token spelled as plain text
            return piece.encode()

    @cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get("decoder"))

    def _special_tokens(self) -> dict[str, int]:
        return self._specials


def _byte_level_table() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable character -> the byte it spells."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_LEVEL_DECODE = _byte_level_table()


# --- loading --------------------------------------------------------------------------------------


def tokenizer_file(folder: str | Path) -> Path | None:
    """A model folder's tokenizer: its own tokenizer.json (Hugging Face, converted models) or
    tokenizer.model (Meta's Llama 3), else the original/ subfolder's (a Hugging Face repo of
    Meta's files), else Meta's tokenizer.model one level up (LLaMA 1/2 keep it beside the size
    folders); None when there is none. The one lookup: the commands, load_tokenizer and the
    quantize command's copy all ask it."""
    folder = Path(folder)
    for cand in (folder / "tokenizer.json", folder / "tokenizer.model", folder / "original" / "tokenizer.model",
                 folder.parent / "tokenizer.model"):
        if cand.is_file():
            return cand
    return None


def find_tokenizer(ckpt_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """--tokenizer_path, else the model folder's tokenizer (tokenizer_file)."""
    if tokenizer_path:
        return Path(tokenizer_path)
    found = tokenizer_file(ckpt_dir)
    if found is None:
        ckpt_dir = Path(ckpt_dir)
        raise TokenizerError(f"no tokenizer found: pass --tokenizer_path, or put tokenizer.json or tokenizer.model "
                             f"in {ckpt_dir} (or tokenizer.model in {ckpt_dir.parent})")
    return found


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file, or the tokenizer of a model folder (tokenizer_file)."""
    path = Path(path)
    if path.is_dir():
        found = tokenizer_file(path)
        if found is None:
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this folder, its original/ "
                                 "or one level up")
        path = found
    if not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer file (expected tokenizer.json or tokenizer.model)")
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    try:
        with path.open("rb") as f:
            head = f.read(256)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from e
    # A tiktoken file is text, `base64token rank` a line; a SentencePiece model is a binary protobuf.
    if _TIKTOKEN_LINE_RE.match(head.split(b"\n", 1)[0].rstrip(b"\r")):
        return TiktokenTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except TokenizerError:
        raise TokenizerError(
            f"{path}: neither a SentencePiece model nor a tiktoken BPE file ('base64token rank' lines)"
        ) from None


# --- streaming ------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenisation: push ids one at a time, get the text each one completes.

    The concatenation of every push() and the final flush() equals
    decode(context + generated)[len(decode(context)):], which is decode(generated) for byte-level
    tokenizers. Two things make a per-token decode wrong, and the window fixes both:
    - a character split over several byte tokens decodes to U+FFFD until complete: hold it back;
    - SentencePiece drops the space (U+2581) of a text's first piece: decode each new id after
      already-emitted ids (the prefix) and emit only what the new ids added.
    Ids decode() never renders are dropped on arrival, so the window holds at most a few ids
    (one character's bytes plus the prefix) and each push costs O(window), not O(length).
    """

    CONTEXT_IDS = 4  # prompt ids kept as the first prefix
    MAX_HELD_IDS = 8  # a valid UTF-8 character needs at most 4 byte tokens; beyond this, emit anyway

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()):
        self._tok = tokenizer
        context = [i for i in context_ids if i not in tokenizer.special_ids]
        self._ids = context[-self.CONTEXT_IDS :] if self.CONTEXT_IDS else []
        self._read = len(self._ids)  # ids before this offset are emitted; they are the prefix
        self._prefix_text = tokenizer.decode(self._ids)

    def push(self, token_id: int) -> str:
        if token_id in self._tok.special_ids:
            return ""
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        held = len(self._ids) - self._read
        if (len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT_CHAR)) or held > self.MAX_HELD_IDS:
            return self._emit(text)
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the end of the stream)."""
        if len(self._ids) == self._read:
            return ""
        return self._emit(self._tok.decode(self._ids))

    def _emit(self, text: str) -> str:
        new = text[len(self._prefix_text) :]
        # The ids just emitted become the prefix for the next ones; older ids are no longer needed.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._tok.decode(self._ids)
        return new


# --- helpers --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not readable JSON ({_first_line(e)})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
