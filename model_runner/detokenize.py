"""Streaming text out of token ids: incremental detokenization and stop strings.

Two holds keep a stream exact. The detokenizer holds text back while it ends with U+FFFD (a
multi-byte character whose remaining bytes are in tokens not generated yet), so a character is
never split or lost. The stop matcher holds back the longest tail that could still become a stop
string, so a stop string is never emitted, even when it arrives split across tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5
"""Prompt tokens decoded ahead of the completion: tokenizers that drop a leading space when a
sequence starts with a word (SentencePiece) keep it this way, as vLLM does."""


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas whose concatenation is ``decode(all ids)``."""

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly complete text (possibly empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(REPLACEMENT) and not final):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta


class StopMatcher:
    """Cuts a text stream at the first stop string, which itself never comes out."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the stream (the earliest in the text)."""

    def push(self, text: str) -> str:
        """Feed text; returns what can safely be emitted. Sets ``stopped`` at a stop string."""
        if self.stopped:
            return ""
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        found = [(i, stop) for stop in self._stops if (i := self._pending.find(stop)) >= 0]
        first = min(found)[0] if found else -1
        if first >= 0:
            self.stopped = True
            self.matched = next(stop for i, stop in found if i == first)
            out, self._pending = self._pending[:first], ""
            return out
        hold = self._held_suffix_length()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """At the end of the stream: the held tail was not a stop string after all."""
        if self.stopped:
            return ""
        out, self._pending = self._pending, ""
        return out

    def _held_suffix_length(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop."""
        text = self._pending
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table (byte-level BPE vocabularies spell bytes so)."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenPieces:
    """Each token's own text and bytes (for logprobs: a token can hold part of a character, so
    the bytes are the exact answer and the text is its UTF-8 decoding with U+FFFD for a part)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._bytes_of = _byte_decoder() if self._byte_level else {}

    def piece(self, token_id: int) -> tuple[str, bytes]:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        raw: bytes | None = None
        if self._byte_level:
            spelled = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(spelled, str) and all(ch in self._bytes_of for ch in spelled):
                raw = bytes(self._bytes_of[ch] for ch in spelled)
        if raw is None:  # added/special tokens, SentencePiece and other vocabularies
            raw = self._tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")
        result = (raw.decode("utf-8", errors="replace"), raw)
        if len(self._cache) < 1 << 20:
            self._cache[token_id] = result
        return result
