"""Incremental detokenization against the tokenizer's own ``decode`` of the whole output."""

from __future__ import annotations

import random

import pytest

from lmport.engine.detokenizer import IncrementalDetokenizer, token_text

TEXTS = [
    "Hello world 😀 and 🎉!",
    "你好世界, the quick brown 中文 fox",
    "naïve café 😀😀 🦄 zebra ∑ ok",
    "🦄🦄🦄",
    "plain ascii words only",
]


def stream(tokenizer, prompt: list[int], output: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push(t) for t in output]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return pieces


def split_text_cases(tokenizer):
    """(prompt, output) pairs cut from encoded texts at every token boundary that is also a
    character boundary (a prompt comes from text, so it never ends inside a character)."""
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for cut in range(len(ids)):
            if "\ufffd" not in tokenizer.decode(ids[:cut]):
                yield ids[:cut], ids[cut:]


@pytest.mark.parametrize("name", ["byte_level_tokenizer", "sentencepiece_tokenizer"])
def test_multibyte_characters_are_split_across_tokens(name, request):
    """The fixtures really do split characters: some tokens alone decode to U+FFFD."""
    tokenizer = request.getfixturevalue(name)
    ids = [i for text in TEXTS for i in tokenizer.encode(text, add_special_tokens=False)]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_byte_level_stream_equals_decode_of_the_output(byte_level_tokenizer):
    tok = byte_level_tokenizer
    for prompt, output in split_text_cases(tok):
        pieces = stream(tok, prompt, output)
        expected = tok.decode(output)
        assert "".join(pieces) == expected
        if "\ufffd" not in expected:
            assert not any("\ufffd" in p for p in pieces)  # never a replacement for a character that completes


def test_text_appears_as_soon_as_the_character_completes(byte_level_tokenizer):
    tok = byte_level_tokenizer
    byte_tokens = [tok.convert_tokens_to_ids(c) for c in "ðŁ¦Ħ"]  # the four byte-level pieces of 🦄
    assert tok.decode(byte_tokens) == "🦄"
    hello = tok.encode("Hi", add_special_tokens=False)
    assert stream(tok, hello, byte_tokens) == ["", "", "", "🦄", ""]


def test_sentencepiece_stream_keeps_word_spaces(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    for prompt, output in split_text_cases(tok):
        text = "".join(stream(tok, prompt, output))
        if not prompt:
            assert text == tok.decode(output)
        else:
            # with a prompt the output is read in its context: " world" after "Hello", not "world"
            whole, head = tok.decode(prompt + output), tok.decode(prompt)
            assert whole.startswith(head) and text == whole[len(head) :]


def test_sentencepiece_first_word_after_a_prompt_has_its_space(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    prompt = tok.encode("Hello", add_special_tokens=False)
    output = tok.encode(" world", add_special_tokens=False)[-1:]
    assert tok.convert_ids_to_tokens(output) == ["\u2581world"]
    assert "".join(stream(tok, prompt, output)) == " world"


@pytest.mark.parametrize("skip", [True, False])
def test_random_byte_level_sequences(byte_level_tokenizer, skip):
    """Arbitrary ids, special tokens and invalid byte runs included: still exactly decode's text."""
    tok = byte_level_tokenizer
    rng = random.Random(0)
    for _ in range(150):
        output = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 25))]
        text = "".join(stream(tok, [], output, skip_special_tokens=skip))
        assert text == tok.decode(output, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_random_sentencepiece_sequences(sentencepiece_tokenizer, skip):
    """Random words, special tokens and characters spelled in byte-fallback pieces, after random prompts.

    (Byte pieces that never form a character are left out: the byte-fallback decoder turns a
    whole run of them into U+FFFD at once, which no streaming decoder can foresee.)
    """
    tok = sentencepiece_tokenizer
    byte_ids = {tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    pieces = [[i] for i in range(len(tok)) if i not in byte_ids]
    pieces += [tok.encode(c, add_special_tokens=False)[1:] for c in "你好世界😀🦄é∑"]  # [1:]: drop the "▁"
    rng = random.Random(1)
    for _ in range(150):
        prompt = [i for _ in range(rng.randrange(0, 8)) for i in rng.choice(pieces)]
        output = [i for _ in range(rng.randrange(1, 12)) for i in rng.choice(pieces)]
        text = "".join(stream(tok, prompt, output, skip_special_tokens=skip))
        whole, head = tok.decode(prompt + output, skip_special_tokens=skip), tok.decode(prompt, skip_special_tokens=skip)
        assert whole.startswith(head) and text == whole[len(head) :]
        if not prompt:
            assert text == tok.decode(output, skip_special_tokens=skip)


def test_special_tokens_are_skipped_or_kept(byte_level_tokenizer):
    tok = byte_level_tokenizer
    output = tok.encode("Hello world", add_special_tokens=False) + [tok.eos_token_id]
    assert "".join(stream(tok, [tok.bos_token_id], output)) == "Hello world"
    assert "".join(stream(tok, [tok.bos_token_id], output, skip_special_tokens=False)) == "Hello world</s>"


def test_token_text(byte_level_tokenizer, sentencepiece_tokenizer):
    sp = sentencepiece_tokenizer
    world = sp.convert_tokens_to_ids("\u2581world")
    assert sp.decode([world]) == "world"  # decode alone drops the word's space ...
    assert token_text(sp, world) == " world"  # ... the token's own text keeps it
    assert token_text(sp, sp.convert_tokens_to_ids("<0xE4>")) == "\ufffd"
    assert token_text(sp, sp.eos_token_id) == "</s>"
    bl = byte_level_tokenizer
    assert token_text(bl, bl.convert_tokens_to_ids("Ġthe")) == " the"
    assert token_text(bl, bl.convert_tokens_to_ids("ð")) == "\ufffd"


def test_decoder_matches_the_tokenizers_decode(byte_level_tokenizer, sentencepiece_tokenizer):
    """The direct (Rust) decode gives exactly the text of the tokenizer's Python ``decode``."""
    from lmport.engine.detokenizer import _rust_tokenizer, make_decoder

    rng = random.Random(2)
    for tok in (byte_level_tokenizer, sentencepiece_tokenizer):
        assert _rust_tokenizer(tok) is tok.backend_tokenizer  # the fast path applies to them
        for skip in (True, False):
            decode = make_decoder(tok, skip)
            for _ in range(50):
                ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 20))]
                assert decode(ids) == tok.decode(ids, skip_special_tokens=skip)


def test_decoder_keeps_the_clean_up_of_tokenization_spaces():
    """A WordPiece-style tokenizer with clean-up on: the Rust decode alone would keep " ." """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmport.engine.detokenizer import make_decoder

    raw = Tokenizer(models.WordLevel({"hello": 0, ".": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert raw.decode([0, 1]) == "hello ."
    assert tok.decode([0, 1]) == "hello."
    assert make_decoder(tok, True)([0, 1]) == "hello."


def test_long_streams_equal_decode(byte_level_tokenizer):
    """Streams far longer than the decode window (it slides many times) still read as decode's text."""
    tok = byte_level_tokenizer
    rng = random.Random(3)
    for _ in range(10):
        output = [rng.randrange(3, len(tok)) for _ in range(300)]
        assert "".join(stream(tok, [], output)) == tok.decode(output)
    text = " ".join(TEXTS * 8)
    ids = tok.encode(text, add_special_tokens=False)
    assert "".join(stream(tok, ids[:7], ids[7:])) == tok.decode(ids[7:])


def test_about_one_decode_per_token(byte_level_tokenizer):
    """The window's prefix text is reused: a second decode only when the window slides."""
    tok = byte_level_tokenizer
    ids = tok.encode("plain ascii words only, the quick brown fox " * 10, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, ids[:5])
    calls = []
    inner = detok._decode
    detok._decode = lambda window: calls.append(len(window)) or inner(window)
    text = "".join(detok.push(t) for t in ids[5:]) + detok.flush()
    assert text == tok.decode(ids[5:])
    n = len(ids) - 5
    assert n > 60 and len(calls) <= 1.2 * n
    assert max(calls) <= 2 * 16 + 5  # windows stay short


@pytest.mark.parametrize("name", ["byte_level_tokenizer", "sentencepiece_tokenizer"])
def test_push_batch_streams_what_push_streams(name, request):
    """A step's tokens for many sequences decoded in one batch give each sequence the pieces
    it gets token by token (the engine's path under load), with mixed skip flags and lengths."""
    from lmport.engine.detokenizer import push_batch

    tok = request.getfixturevalue(name)
    rng = random.Random(2)
    cases = []
    for _ in range(40):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 8))]
        output = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        cases.append((prompt, output, rng.random() < 0.5))
    expected = [stream(tok, p, o, skip)[:-1] for p, o, skip in cases]
    detoks = [IncrementalDetokenizer(tok, p, skip_special_tokens=skip) for p, _, skip in cases]
    got: list[list[str]] = [[] for _ in cases]
    for step in range(max(len(o) for _, o, _ in cases)):
        live = [i for i, (_, o, _) in enumerate(cases) if step < len(o)]
        pieces = push_batch([detoks[i] for i in live], [cases[i][1][step] for i in live])
        for i, piece in zip(live, pieces):
            got[i].append(piece)
    assert got == expected


def test_push_batch_fails_only_the_sequence_whose_decode_fails(byte_level_tokenizer, monkeypatch):
    """A window the tokenizer cannot decode fails the batch decode; it is then decoded one by
    one, and only that sequence gets an exception."""
    from lmport.engine import detokenizer as D

    tok = byte_level_tokenizer
    real = D._rust_tokenizer(tok)
    poison = 10**6

    class Picky:  # the real Rust tokenizer, except that it refuses one id
        def decode(self, ids, skip_special_tokens=True):
            if poison in ids:
                raise ValueError("cannot decode")
            return real.decode(ids, skip_special_tokens=skip_special_tokens)

        def decode_batch(self, windows, skip_special_tokens=True):
            return [self.decode(w, skip_special_tokens) for w in windows]

    picky = Picky()
    monkeypatch.setattr(D, "_rust_tokenizer", lambda t: picky)
    good = D.IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    bad = D.IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    good._decode = bad._decode = picky.decode
    word = tok.encode("hello", add_special_tokens=False)[0]
    pieces = D.push_batch([good, bad], [word, poison])
    assert pieces[0] == tok.decode([word]) and isinstance(pieces[1], ValueError)
