"""Stop criteria: EOS ids, stop tokens, stop strings found in the streamed text, length."""

from __future__ import annotations

import json
import random

from transformers import GenerationConfig, LlamaConfig

from lmport.engine.api import SamplingParams
from lmport.engine.stopping import StopCriteria, eos_token_ids


def first_stop(criteria: StopCriteria, pieces: list[str], tokens: list[int] | None = None):
    """Feed ``pieces`` one token at a time; return (token index, reason) of the first stop."""
    text = ""
    for n, piece in enumerate(pieces, start=1):
        text += piece
        reason = criteria.check(tokens[n - 1] if tokens else 100, n, text)
        if reason:
            return n, reason
    return None


def test_eos_stop_tokens_and_length():
    params = SamplingParams(max_new_tokens=3, stop_token_ids=(7,))
    assert StopCriteria(params, {2, 5}).check(5, 1, "x") == "eos_token"
    assert StopCriteria(params, {2, 5}).check(7, 1, "x") == "stop_sequence"
    assert StopCriteria(params, {2, 5}).check(9, 2, "x") is None
    assert StopCriteria(params, {2, 5}).check(9, 3, "x") == "length"
    assert StopCriteria(params, {2, 5}).check(2, 3, "x") == "eos_token"  # EOS wins over length
    ignoring = SamplingParams(max_new_tokens=3, ignore_eos=True)
    assert StopCriteria(ignoring, {2}).check(2, 1, "x") is None


def test_stop_strings_found_across_pieces_against_a_full_rescan():
    """Tail-only search stops at the same token as searching the whole text every time."""
    rng = random.Random(0)
    alphabet = "ab c\n😀"
    for _ in range(300):
        stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4)))
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 4))) for _ in range(30)]
        params = SamplingParams(max_new_tokens=1000, stop=stops)
        criteria = StopCriteria(params, set())
        got = first_stop(criteria, pieces)
        text, expected = "", None
        for n, piece in enumerate(pieces, start=1):
            text += piece
            if any(s in text for s in stops):
                expected = (n, "stop_sequence")
                break
        assert got == expected
        if got:
            stop, at = criteria.stop_match
            assert text[at : at + len(stop)] == stop
            assert at == min(text.find(s) for s in stops if s in text)


def test_stop_string_split_over_many_tokens():
    criteria = StopCriteria(SamplingParams(max_new_tokens=50, stop=("###",)), set())
    assert first_stop(criteria, ["Hello", " #", "", "#", "# more"]) == (5, "stop_sequence")
    assert criteria.stop_match == ("###", 6)


def test_eos_ids_merge_generation_config_model_config_and_tokenizer(tmp_path, byte_level_tokenizer):
    config = LlamaConfig(eos_token_id=2)
    config.save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=[2, 128009, 128001]).save_pretrained(tmp_path)
    tok = byte_level_tokenizer
    ids = eos_token_ids(tmp_path, tok, config)
    expected = set(GenerationConfig.from_pretrained(tmp_path).eos_token_id) | {config.eos_token_id, tok.eos_token_id}
    assert ids == expected == {2, 128009, 128001, tok.eos_token_id}


def test_eos_ids_without_generation_config(tmp_path):
    config = LlamaConfig(eos_token_id=[5, 6])
    assert eos_token_ids(tmp_path, None, config) == {5, 6}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert eos_token_ids(tmp_path, None, config) == {5, 6, 9}
