"""Streaming text for one sequence: incremental detokenization and stop strings.

A sequence's output text is ``tokenizer.decode(output_ids, skip_special_tokens=...)``, cut at the
first stop string (or just after it with ``include_stop_str_in_output``). `IncrementalDetokenizer`
returns, for each new token, the part of that text that can no longer change, so that all the
deltas of `add` followed by `flush` concatenate to exactly that text. Two things keep text back:

1. An incomplete UTF-8 character. Byte-level BPE splits multi-byte characters across tokens, and
   decoding up to the middle of one ends in U+FFFD. That trailing U+FFFD is held until later
   tokens complete the character (or show the bytes invalid, in which case the full decode has a
   U+FFFD there too and it is released). `flush` releases it as the full decode renders it.
2. A possible stop string: the longest suffix of the text that is the beginning of some stop
   string is held until the following text either completes the stop string or rules it out, so
   a stop string is never partly streamed.

Bounded cost per token: only a window of recent tokens is decoded (the idea of vLLM's and TGI's
prefix/read offsets). The window starts at a token boundary where decoding was clean (no pending
character), so decoding it yields exactly the full text from that point; the last clean segment
stays in the window as left context, which keeps decoders that strip a leading space of their
first token (SentencePiece's Metaspace) rendering a later token's space. The window grows only
while its text ends in U+FFFD. Stop strings are searched only in the held text plus the new text,
so that side costs O(delta + stop lengths²) per token however long the output grows.

Run ``python -m pytest -q tests/test_detokenize.py``.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer

from worker.sampling import SamplingParams

REPLACEMENT = "\ufffd"  # what decoding renders for bytes that are not (yet) a whole character


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into streamed text and finds its stop strings.

    The output text does not depend on the prompt (it is the decode of the output ids alone);
    `prompt_token_ids` is accepted so that the engine builds every per-sequence object alike.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stops = tuple(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self.token_ids: list[int] = []
        self.matched_stop: str | None = None  # the stop string that ended the sequence
        self.finished = False  # a stop string matched, or flush() ran
        # Decode window, over token_ids[_prefix:]. Invariants: _prefix and _read are clean token
        # boundaries (decoding up to them ends in a whole character), _prefix <= _read, and the
        # first _window_done characters of the window's text are already in _text.
        self._prefix = 0
        self._read = 0
        self._window_done = 0
        # Text. Invariant: the output text so far is "".join(_streamed) + _held, where _streamed
        # has been returned and _held (bounded by the longest stop string) may begin a stop string.
        self._streamed: list[str] = []
        self._held = ""

    @property
    def text(self) -> str:
        """The output text streamed so far."""
        return "".join(self._streamed)

    def add(self, token_id: int) -> str:
        """Record one generated token; the newly final text (may be "")."""
        if self.finished:
            raise RuntimeError("add() after the sequence finished")
        self.token_ids.append(token_id)
        return self._release(self._decode_step(), final=False)

    def flush(self) -> str:
        """At a finish by length or EOS: release everything held back."""
        if self.finished:
            return ""
        window = self._decode(self.token_ids[self._prefix:])
        delta = self._release(window[self._window_done:], final=True)
        self.finished = True
        return delta

    # -- decoding -------------------------------------------------------------------------------
    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_step(self) -> str:
        """The text the newest token made final, from a decode of the window."""
        window = self._decode(self.token_ids[self._prefix:])
        pending = window.endswith(REPLACEMENT)  # maybe a character still missing bytes
        end = len(window) - 1 if pending else len(window)
        new = window[self._window_done:end]
        if pending:
            self._window_done = max(self._window_done, end)
        else:  # a clean end: slide the window, keeping the last clean segment as context
            self._prefix, self._read = self._read, len(self.token_ids)
            self._window_done = len(self._decode(self.token_ids[self._prefix:self._read]))
        return new

    # -- stop strings ---------------------------------------------------------------------------
    def _release(self, new_text: str, *, final: bool) -> str:
        """Take in newly decoded text; the part of it that can be streamed now."""
        start = len(self._held)
        held = self._held + new_text
        if self._stops:
            held = self._cut_at_stop(held, start)
        hold = 0 if final or self.matched_stop is not None else self._stop_prefix_len(held)
        delta, self._held = held[: len(held) - hold], held[len(held) - hold:]
        if delta:
            self._streamed.append(delta)
        return delta

    def _cut_at_stop(self, text: str, start: int) -> str:
        """`text` cut at the stop string that ends first past `start`, or `text` if none does.

        `text` is the held text followed by new text from `start` on. No match begins before the
        held text: a match's part before `start` is a suffix of the earlier text that begins a
        stop string, and such suffixes are held. Ending first, and the longest of those ending
        together, is what checking after every character finds, so the result does not depend on
        how the text split into tokens.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            at = text.find(stop, max(0, start - len(stop) + 1))
            if at >= 0 and (best is None or (at + len(stop), at) < best[:2]):
                best = (at + len(stop), at, stop)
        if best is None:
            return text
        end, at, stop = best
        self.matched_stop = stop
        self.finished = True
        return text[: end if self._include_stop else at]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(self._longest_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0
