"""Incremental detokenization with stop sequences matched on the decoded text.

Text is decoded from a window of recent ids (the prefix/read offsets of TGI and vLLM) so a
token that completes a multi-byte character or changes how its neighbour decodes is
handled, and a step costs O(window), not O(generated). Text that could still be the start
of a stop sequence is held back, so a stop string never leaks to the client. Stop strings
count from the ``min_tokens``-th generated token on (vLLM's rule): one that ends earlier
is text like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = (),
                 prompt_ids: Sequence[int] = (), min_tokens: int = 0) -> None:
        self._decode = decode
        self.min_tokens = min_tokens
        self.stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        # A few prompt ids seed the window so the first token decodes in context (a
        # leading-space marker, say), as it would inside the whole sequence.
        self.ids: list[int] = list(prompt_ids[-4:])
        self._prefix = 0
        self._read = len(self.ids)
        self._generated_start = len(self.ids)
        self.text = ""  # decoded generated text so far (complete characters only)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; returns the text delta now safe to emit. After a stop
        sequence matched, ``stopped`` is set and the text ends just before the stop."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = len(self.text)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
        if not self.stop or len(self.ids) - self._generated_start < self.min_tokens:
            return self._take(len(self.text))
        start = max(0, before - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation: whatever is left, incomplete characters included."""
        if not self.stopped and self._read < len(self.ids):
            prefix_text = self._decode(self.ids[self._prefix:self._read])
            self.text += self._decode(self.ids[self._prefix:])[len(prefix_text):]
            self._prefix = self._read = len(self.ids)
        return self._take(len(self.text))

    @property
    def generated(self) -> list[int]:
        return self.ids[self._generated_start:]

    def _held_back(self) -> int:
        """Length of the longest suffix of ``text`` that begins some stop sequence."""
        for k in range(min(self._max_stop - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta
