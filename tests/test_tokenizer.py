"""Tokenizer backends, load_tokenizer and StreamDecoder.

The SentencePiece tests use the real Llama 2 tokenizer from ../shared (skipped where it is absent);
the byte-level BPE and tiktoken tokenizers are built here, small. transformers is the reference.
"""
from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import pytest

from llama_demo.text.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)
from llama_demo.text.detok import StreamDecoder

LLAMA2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "llama2-tokenizer.model"

MIXED_TEXT = (
    "Héllo wörld! Ça va? naïve café, Straße. 中文字符测试, 日本語. Emoji: 😀🎉 👍🏽\n"
    "def f(x):\n    return x ** 2  # ½ Ω ж\n\tTabs, 'quotes' and \"double\" ones."
)
STREAM_ALPHABET = list("abc xyz") + ["é", "ü", "中", "文", "😀", "🎉", "\n", "  ", ",", "'", "ж", "½", "Ω"]
CORPUS = [
    "hello world, héllo wörld, the quick brown fox jumps over the lazy dog.",
    "中文字符测试 日本語のテキスト 😀🎉👍🏽 emoji and CJK text mixed with words.",
    "def f(x):\n    return x ** 2\n\nclass A:\n    pass  # code too",
    "Ça va? naïve café Straße ½ Ω ж",
]


def random_texts(n: int, seed: int = 0, length: int = 30) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(STREAM_ALPHABET) for _ in range(length)) for _ in range(n)]


def stream(tok: Tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    sd = StreamDecoder(tok, context)
    return [sd.push(i) for i in ids] + [sd.flush()]


def expected_stream_text(tok: Tokenizer, context: list[int], ids: list[int]) -> str:
    return tok.decode(context + ids)[len(tok.decode(context)) :]


# --- builders for small tokenizers ---------------------------------------------------------------

TIKTOKEN_MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"] + [
    "é".encode(),
    "中".encode()[:2],  # a token that ends mid-character
    "中".encode(),
    b"<|",
    b"|>",
]


def write_tiktoken_file(path: Path) -> int:
    """A tiktoken BPE file: the 256 bytes (rank = byte value), then a few merges. Returns its size."""
    tokens = [bytes([b]) for b in range(256)] + TIKTOKEN_MERGES
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))
    return len(tokens)


def write_byte_bpe_folder(folder: Path, config: dict | None) -> Path:
    """Train a tiny byte-level BPE (GPT-2 style) and save tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


BYTE_BPE_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|im_start|>",
    "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},  # HF also spells tokens as dicts
    "add_bos_token": False,
}


@pytest.fixture(scope="module")
def llama2() -> SentencePieceTokenizer:
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"{LLAMA2_TOKENIZER} not present")
    tok = load_tokenizer(LLAMA2_TOKENIZER)
    assert isinstance(tok, SentencePieceTokenizer)
    return tok


@pytest.fixture(scope="module")
def hf_llama2(llama2):
    """transformers' LlamaTokenizer over the same pieces, merges ordered by piece score as its converter does.

    (transformers' own conversion of tokenizer.model needs protobuf, which this project does not install.)
    """
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges

    sp = llama2._sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.vocab_size())}
    merges = generate_merges(vocab, scores)
    return transformers.LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=True)


@pytest.fixture(scope="module")
def byte_bpe_dir(tmp_path_factory) -> Path:
    return write_byte_bpe_folder(tmp_path_factory.mktemp("bytebpe"), BYTE_BPE_CONFIG)


@pytest.fixture(scope="module")
def byte_bpe(byte_bpe_dir) -> HFTokenizer:
    tok = load_tokenizer(byte_bpe_dir)
    assert isinstance(tok, HFTokenizer)
    return tok


@pytest.fixture(scope="module")
def tiktoken_tok(tmp_path_factory) -> TiktokenTokenizer:
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    write_tiktoken_file(path)
    tok = load_tokenizer(path)
    assert isinstance(tok, TiktokenTokenizer)
    return tok


# --- SentencePiece (real Llama 2 tokenizer) ------------------------------------------------------


def test_sentencepiece_ids_and_bos_eos(llama2):
    assert (llama2.vocab_size, llama2.bos_id, llama2.eos_id) == (32000, 1, 2)
    assert llama2.stop_ids == {2} and llama2.add_bos
    assert llama2.encode("Hello") == [1, 15043]
    assert llama2.encode("Hello", bos=False) == [15043]
    assert llama2.encode("Hello", bos=False, eos=True) == [15043, 2]
    assert llama2.token_id("</s>") == 2 and llama2.token_id("<|eot_id|>") is None


@pytest.mark.parametrize("text", [MIXED_TEXT, "", " leading space", "  two\n\nlines  ", "x"])
def test_sentencepiece_round_trip_hides_bos_eos(llama2, text):
    ids = llama2.encode(text, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert llama2.decode(ids) == text


def test_sentencepiece_matches_transformers_llama_tokenizer(llama2, hf_llama2):
    # HF's Metaspace adds no dummy space before text that already starts with one, SentencePiece does:
    # compare on texts that start with a letter (SentencePiece, Meta's tokenizer, is the truth for the rest).
    for text in [MIXED_TEXT, *(t.lstrip() for t in random_texts(20, seed=1))]:
        ids = llama2.encode(text)
        assert ids == hf_llama2.encode(text), text
        assert llama2.decode(ids) == hf_llama2.decode(ids, skip_special_tokens=True)


def test_sentencepiece_plain_encode_does_not_parse_special_strings(llama2):
    ids = llama2.encode("<s>hi</s>", bos=False)
    assert 1 not in ids and 2 not in ids
    assert llama2.decode(ids) == "<s>hi</s>"
    assert llama2.encode_with_special_tokens("<s>[INST] hi") == [1] + llama2.encode("[INST] hi", bos=False)


def test_stream_sentencepiece_keeps_leading_space_of_first_generated_token(llama2):
    context = llama2.encode("The capital of France is")
    generated = llama2.encode("Paris", bos=False)  # "▁Paris": the space is part of the token
    pieces = stream(llama2, generated, context)
    assert pieces[0] == " Paris"
    assert llama2.decode(generated) == "Paris"  # what a naive per-token decode would print


def test_stream_sentencepiece_without_context_equals_decode(llama2):
    generated = llama2.encode("Hello there 😀", bos=False)
    assert "".join(stream(llama2, generated)) == llama2.decode(generated) == "Hello there 😀"


def test_stream_sentencepiece_holds_byte_fallback_emoji_until_complete(llama2):
    context = llama2.encode("Smile:")
    generated = llama2.encode("😀 ok", bos=False)
    assert [llama2._sp.id_to_piece(i) for i in generated[:5]] == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    pieces = stream(llama2, generated, context)
    assert pieces[:5] == [" ", "", "", "", "😀"]
    assert "".join(pieces) == " 😀 ok"


@pytest.mark.parametrize("context_text", ["", "Answer:", "中文"])
def test_stream_sentencepiece_equals_full_decode(llama2, context_text):
    context = llama2.encode(context_text) if context_text else []
    for text in random_texts(40, seed=2):
        generated = llama2.encode(text, bos=False) + [llama2.eos_id]
        pieces = stream(llama2, generated, context)
        assert "".join(pieces) == expected_stream_text(llama2, context, generated), text
        assert not any("\ufffd" in p for p in pieces), pieces


def test_stream_hf_metaspace_tokenizer_keeps_leading_spaces(llama2, hf_llama2, tmp_path):
    # The Llama 2 tokenizer as a tokenizer.json (Metaspace pre-tokenizer, Strip decoder): the same
    # leading-space trap as SentencePiece, through the HF backend.
    hf_llama2.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.add_bos and tok.bos_id == 1 and tok.stop_ids == {2}
    assert tok.encode(MIXED_TEXT) == llama2.encode(MIXED_TEXT)
    context = tok.encode("Answer:")
    for text in random_texts(20, seed=3):
        generated = tok.encode(text.lstrip(), bos=False)
        pieces = stream(tok, generated, context)
        assert "".join(pieces) == expected_stream_text(tok, context, generated)
        assert pieces[0].startswith(" ") or not generated


# --- Hugging Face byte-level BPE -----------------------------------------------------------------


def test_hf_config_gives_bos_eos_add_bos_and_stops(byte_bpe):
    assert byte_bpe.bos_id == byte_bpe.token_id("<|im_start|>") == 1
    assert byte_bpe.eos_id == byte_bpe.token_id("<|im_end|>") == 2
    assert not byte_bpe.add_bos  # add_bos_token false, as SmolLM2's config says
    assert byte_bpe.stop_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>
    assert byte_bpe.encode("hello")[0] != 1
    assert byte_bpe.encode("hello", bos=True)[0] == 1


def test_hf_round_trip_and_matches_transformers(byte_bpe, byte_bpe_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(byte_bpe_dir / "tokenizer.json"))
    for text in [MIXED_TEXT, *random_texts(20, seed=4)]:
        ids = byte_bpe.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert byte_bpe.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text


def test_hf_special_strings_are_text_in_encode_but_ids_in_encode_with_special_tokens(byte_bpe):
    ids = byte_bpe.encode("a<|im_end|>b")
    assert 2 not in ids and byte_bpe.decode(ids) == "a<|im_end|>b"
    ids = byte_bpe.encode_with_special_tokens("a<|im_end|>b")
    assert ids == byte_bpe.encode("a") + [2] + byte_bpe.encode("b")
    assert byte_bpe.decode(ids) == "ab"  # special tokens are not rendered


def test_hf_add_bos_follows_post_processor_when_config_is_silent(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import processors

    folder = write_byte_bpe_folder(tmp_path, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    assert not load_tokenizer(folder).add_bos  # no post-processor: no BOS
    raw = HFTok.from_file(str(folder / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    raw.save(str(folder / "tokenizer.json"))
    tok = load_tokenizer(folder)
    assert tok.add_bos
    assert tok.encode("hello").count(1) == 1  # ours only, not the post-processor's as well
    assert tok.encode("hello", bos=False)[0] != 1


def test_hf_streaming_equals_decode(byte_bpe):
    context = byte_bpe.encode("Answer:")
    for text in [MIXED_TEXT, *random_texts(30, seed=5)]:
        generated = byte_bpe.encode(text) + [byte_bpe.eos_id]
        pieces = stream(byte_bpe, generated, context)
        assert "".join(pieces) == byte_bpe.decode(generated) == text
        assert not any("\ufffd" in p for p in pieces)


def test_hf_streaming_byte_by_byte_never_splits_characters(byte_bpe):
    # Generation one byte token at a time: every multi-byte character is spread over several ids.
    text = "é中😀 a"
    generated = [byte_bpe.token_id(GPT2_BYTE_TO_CHAR[b]) for b in text.encode()]
    assert None not in generated
    pieces = stream(byte_bpe, generated)
    assert [p for p in pieces if p] == ["é", "中", "😀", " ", "a"]


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table of the printable character that spells each byte in a byte-level vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # unprintable bytes are moved past 255
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


GPT2_BYTE_TO_CHAR = _gpt2_bytes_to_unicode()


# --- tiktoken (Llama 3 layout) -------------------------------------------------------------------


def test_tiktoken_special_token_ids_follow_meta_layout(tiktoken_tok):
    n = 256 + len(TIKTOKEN_MERGES)
    tok = tiktoken_tok
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)
    assert tok.token_id("<|start_header_id|>") == n + 6
    assert tok.token_id("<|end_header_id|>") == n + 7
    assert tok.token_id("<|eot_id|>") == n + 9
    assert tok.token_id("<|reserved_special_token_5|>") == n + 10
    assert tok.token_id("<|reserved_special_token_250|>") == n + 255
    assert tok.token_id("<|eom_id|>") == n + 8  # Llama 3.1's name for that slot
    assert tok.stop_ids == {n + 1, n + 8, n + 9}
    assert tok.token_id("hello") == 259 and tok.token_id("<|nope|>") is None


def test_tiktoken_round_trip_and_bos(tiktoken_tok):
    ids = tiktoken_tok.encode("hello world")
    assert ids == [tiktoken_tok.bos_id, 259, 264]
    for text in [MIXED_TEXT, *random_texts(10, seed=6)]:
        ids = tiktoken_tok.encode(text, eos=True)
        assert ids[0] == tiktoken_tok.bos_id and ids[-1] == tiktoken_tok.eos_id
        assert tiktoken_tok.decode(ids) == text


def test_tiktoken_special_strings_in_user_text_stay_text(tiktoken_tok):
    eot = tiktoken_tok.token_id("<|eot_id|>")
    ids = tiktoken_tok.encode("stop<|eot_id|>now", bos=False)
    assert eot not in ids and max(ids) < 256 + len(TIKTOKEN_MERGES)
    assert tiktoken_tok.decode(ids) == "stop<|eot_id|>now"
    assert eot in tiktoken_tok.encode_with_special_tokens("stop<|eot_id|>now")


def test_tiktoken_streaming_holds_token_that_ends_mid_character(tiktoken_tok):
    partial = 256 + TIKTOKEN_MERGES.index("中".encode()[:2])
    last_byte = "中".encode()[2]
    ids = [ord("a"), partial, last_byte, ord("b")]
    assert tiktoken_tok.decode(ids) == "a中b"
    assert stream(tiktoken_tok, ids) == ["a", "", "中", "b", ""]


def test_tiktoken_streaming_equals_decode(tiktoken_tok):
    context = tiktoken_tok.encode("Answer:")
    for text in [MIXED_TEXT, *random_texts(30, seed=7)]:
        generated = tiktoken_tok.encode(text, bos=False) + [tiktoken_tok.token_id("<|eot_id|>")]
        pieces = stream(tiktoken_tok, generated, context)
        assert "".join(pieces) == tiktoken_tok.decode(generated) == text
        # byte by byte, as a model may generate it
        pieces = stream(tiktoken_tok, list(text.encode()), context)
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# --- StreamDecoder cost ------------------------------------------------------------------------------


class CountingTokenizer(Tokenizer):
    """Wraps a tokenizer and records how many ids each decode() call sees."""

    def __init__(self, inner: Tokenizer):
        self.inner, self.sizes = inner, []
        self.vocab_size, self.special_ids = inner.vocab_size, inner.special_ids

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.inner.decode(ids)


def test_stream_decode_cost_does_not_grow_with_length(tiktoken_tok):
    tok = CountingTokenizer(tiktoken_tok)
    text = "hello world é中😀 " * 200
    generated = list(text.encode())  # byte by byte: the worst case for holding back
    pieces = stream(tok, generated, tiktoken_tok.encode("context " * 100))
    assert "".join(pieces) == text
    assert max(tok.sizes) <= 10  # a few ids of prefix plus one character's bytes, never the whole text


# --- load_tokenizer ---------------------------------------------------------------------------------


def test_load_folder_prefers_tokenizer_json(tmp_path, byte_bpe_dir):
    shutil.copy(byte_bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    write_tiktoken_file(tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    (tmp_path / "tokenizer.json").unlink()
    assert isinstance(load_tokenizer(tmp_path), TiktokenTokenizer)


def test_load_sentencepiece_model_from_folder(tmp_path, llama2):
    shutil.copy(LLAMA2_TOKENIZER, tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.encode("Hello") == [1, 15043]


def assert_one_line_error_naming(path: Path, expected: str) -> None:
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message, message
    assert isinstance(info.value, ValueError)


def test_load_empty_folder_or_missing_file_says_what_was_expected(tmp_path):
    assert_one_line_error_naming(tmp_path, "no tokenizer.json or tokenizer.model")
    assert_one_line_error_naming(tmp_path / "missing.model", "no such tokenizer file")


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("tokenizer.model", b"\x00\x01garbage", "neither a SentencePiece model nor a tiktoken"),
        ("tokenizer.model", b"aGk= 0\nnot base64!! x\n", "base64token rank"),
        ("tokenizer.model", b"YQ== 0\nYg== 5\n", "ranks must be 0..1"),  # a gap in the ranks
        ("tokenizer.json", b"{not json", "not a Hugging Face tokenizer.json"),
    ],
)
def test_load_unreadable_file_raises_one_line_error_naming_it(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    assert_one_line_error_naming(tmp_path / name, expected)


def test_a_folder_finds_the_same_tokenizer_as_the_commands(tmp_path):
    """load_tokenizer(folder) and find_tokenizer share one lookup: a Hugging Face repo of Meta's
    files keeps tokenizer.model in original/, LLaMA 1/2 one level up beside the size folders."""
    from llama_demo.text.tokenizer import find_tokenizer

    repo = tmp_path / "repo"
    (repo / "original").mkdir(parents=True)
    shutil.copy(LLAMA2_TOKENIZER, repo / "original" / "tokenizer.model")
    assert find_tokenizer(repo) == repo / "original" / "tokenizer.model"
    assert isinstance(load_tokenizer(repo), SentencePieceTokenizer)
    size = tmp_path / "7B"
    size.mkdir()
    shutil.copy(LLAMA2_TOKENIZER, tmp_path / "tokenizer.model")
    assert find_tokenizer(size) == tmp_path / "tokenizer.model"
    assert load_tokenizer(size).encode("Hello") == [1, 15043]
