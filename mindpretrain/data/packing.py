"""Fixed-length documents from tokenized ones: MindFormers' `--pad-or-stitch` for its WikiText tool.

MindFormers' DeepSeek-V3 preprocessing stores samples of exactly `length` (= seq_length + 1)
tokens, each one document of one sequence, so the training loader reads one document per sample:

* `StitchPacker` (stitch): all documents concatenated in order and cut into consecutive chunks
  of `length`; the final partial chunk is dropped.
* `PadPacker` (pad): each document alone, cut to its first `length` tokens or filled up to
  `length` with the pad id on the right.

A packer is fed one document at a time (`pack`) and returns the documents to write; `finish()`
returns what is left at the end. Its counters end up in the preprocessing summary.
"""
import numpy as np


class StitchPacker:
    """Concatenate every document and emit each full chunk of `length` tokens."""

    mode = "stitch"

    def __init__(self, length):
        self.length = length
        self._pending = []
        self._pending_size = 0
        self.dropped_tokens = 0  # the final partial chunk

    def pack(self, tokens):
        self._pending.append(tokens)
        self._pending_size += tokens.size
        if self._pending_size < self.length:
            return []
        joined = np.concatenate(self._pending)
        full = joined.size - joined.size % self.length
        rest = joined[full:]
        self._pending, self._pending_size = ([rest] if rest.size else []), rest.size
        return [joined[start:start + self.length] for start in range(0, full, self.length)]

    def finish(self):
        self.dropped_tokens = self._pending_size
        self._pending, self._pending_size = [], 0
        return []

    def counters(self):
        return {"dropped_tokens": self.dropped_tokens}


class PadPacker:
    """Each document on its own: truncated to, or padded on the right with `pad_id` up to, `length` tokens."""

    mode = "pad"

    def __init__(self, length, pad_id):
        self.length = length
        self.pad_id = pad_id
        self.truncated_tokens = 0
        self.padding_tokens = 0

    def pack(self, tokens):
        if tokens.size >= self.length:
            self.truncated_tokens += tokens.size - self.length
            return [tokens[:self.length]]
        padding = self.length - tokens.size
        self.padding_tokens += padding
        return [np.concatenate([tokens, np.full(padding, self.pad_id, dtype=tokens.dtype)])]

    def finish(self):
        return []

    def counters(self):
        return {"truncated_tokens": self.truncated_tokens, "padding_tokens": self.padding_tokens}


class WholeDocuments:
    """No packing: every non-empty document as it is (the jsonl tool and WikiText articles)."""

    mode = None

    def pack(self, tokens):
        return [tokens] if tokens.size else []

    def finish(self):
        return []

    def counters(self):
        return {}


def make_packer(mode, length, pad_id):
    """The packer for `mode` ("stitch", "pad" or None for whole documents)."""
    if mode == "stitch":
        return StitchPacker(length)
    if mode == "pad":
        return PadPacker(length, pad_id)
    return WholeDocuments()
