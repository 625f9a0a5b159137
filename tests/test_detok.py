"""Rank 0's answer text: stop strings found in streamed text, held back while they may still
complete, at a cost proportional to the new text."""
import pytest

from llama_demo.text.detok import StopMatcher, TextStream


class CharTokenizer:
    """One token per character (id = code point): stop strings can complete mid-token or across tokens."""
    special_ids = frozenset()

    def decode(self, ids):
        return "".join(map(chr, ids))


def stream(text: str, stops: list[str], piece: int = 1) -> tuple[list[str], bool]:
    ts, out = TextStream(CharTokenizer(), stops), []
    ids = [ord(c) for c in text]
    for i in range(0, len(ids), piece):
        for t in ids[i:i + piece]:
            got, stopped = ts.push(t)
            out.append(got)
            if stopped:
                return out, True
    out.append(ts.finish())
    return out, False


@pytest.mark.parametrize("text,stops,want", [
    ("hello world. bye", ["."], "hello world"),
    ("abcabcabd tail", ["abcabd"], "abc"),  # the automaton falls back inside a partial match
    ("aaab", ["aab"], "a"),
    ("one END two", ["END", "two"], "one "),
    ("no stop here", ["zzz"], "no stop here"),
    ("ends with par", ["partial"], "ends with par"),  # held back, then handed out at the end
])
def test_text_before_the_first_stop_string(text, stops, want):
    out, stopped = stream(text, stops)
    assert "".join(out) == want and stopped == (want != text)


def test_a_possible_stop_string_is_held_back_until_it_cannot_be_one():
    out, _ = stream("ab!ab?", ["ab?"])
    assert out[:3] == ["", "", "ab!"]  # "a", "ab" might start "ab?"; "ab!" cannot


class CountingList(list):
    """A KMP failure table that counts its lookups: the automaton's fallback steps."""
    lookups = 0

    def __getitem__(self, i):
        CountingList.lookups += 1
        return super().__getitem__(i)


def test_matching_cost_does_not_grow_with_the_answer():
    """16 stop strings of 1024 characters against 20 000 characters that keep almost matching:
    KMP's fallbacks are amortised, at most one per character and stop string (a rescan of the
    held-back text at each token would be ~1000 per character)."""
    stops = [("x" * 1023) + chr(ord("a") + i) for i in range(16)]
    m = StopMatcher(stops)
    m._fail = [CountingList(f) for f in m._fail]
    chars = 0
    for _ in range(5000):
        assert m.feed("xxxx") is None
        chars += 4
    assert m.held == 1023
    assert CountingList.lookups <= chars * len(stops)
    assert m.feed("a") == -1023  # and it still finds the stop that began 1023 characters back
