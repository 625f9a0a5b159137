"""Tokenizers behind one interface, and where a model folder keeps its tokenizer.

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

The formats of the files behind them are tokenizer_files.py's; streaming decoding (StreamDecoder)
is detok.py's.
"""
from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..config import first_line
from .tokenizer_files import (LLAMA3_PAT_STR, LLAMA3_SPECIAL_TOKENS, LLAMA31_TOKEN_ALIASES, TIKTOKEN_LINE_RE,
                              TokenizerConfig, TokenizerError, gpt2_bytes_to_unicode, load_tokenizer_config,
                              read_tiktoken_bpe, without_dummy_prefix)

# Special tokens that end a model's turn, whatever the family; stop_ids holds those a vocabulary has.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


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
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({first_line(e)})") from e
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

        return spm.SentencePieceProcessor(model_proto=without_dummy_prefix(self._sp.serialized_model_proto()))

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


# --- tiktoken (Llama 3) ---------------------------------------------------------------------------

# tiktoken panics on very long inputs (openai/tiktoken#195); Meta encodes in slices this long.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


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
            raise TokenizerError(f"{self.path}: tiktoken rejected the BPE ranks ({first_line(e)})") from e
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
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({first_line(e)})") from e
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
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        except KeyError:  # an added token spelled as plain text
            return piece.encode()

    @cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get("decoder"))

    def _special_tokens(self) -> dict[str, int]:
        return self._specials


_BYTE_OF_CHAR = {c: b for b, c in gpt2_bytes_to_unicode().items()}  # byte-level BPE pieces -> their bytes


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
    if TIKTOKEN_LINE_RE.match(head.split(b"\n", 1)[0].rstrip(b"\r")):
        return TiktokenTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except TokenizerError:
        raise TokenizerError(
            f"{path}: neither a SentencePiece model nor a tiktoken BPE file ('base64token rank' lines)"
        ) from None


