"""Megatron's memory-mapped indexed dataset (`.bin` tokens + `.idx` index), read and written byte-exactly.

Users move BIN datasets between Megatron-LM, MindFormers and us, so the layout is not ours to
choose. The `.idx` file is, in order, little-endian:

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the tokens in `.bin` (see DTYPE_CODES)
    uint64    S = number of sequences
    uint64    D = number of entries in the document index (documents + 1)
    int32[S]  sequence lengths, in tokens
    int64[S]  sequence pointers, byte offsets into `.bin`
    int64[D]  document index: sequence ids where documents start, then S

The `.bin` file is every sequence's tokens back to back. One document may hold several sequences
(sentence-split corpora); our preprocessors write one sequence per document.

Every problem found while opening is reported as one `IndexedDatasetError` naming the file.
"""
import os
import struct

import numpy as np

from mindpretrain.utils.atomic_files import commit, discard, temporary_sibling

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}

# Megatron picks uint16 below this vocabulary size (a little under 2**16, leaving room for extra ids).
UINT16_VOCAB_LIMIT = 65500


class IndexedDatasetError(ValueError):
    """A BIN/IDX pair that cannot be used; the message names the file and the problem."""


def data_file_path(path_prefix):
    return path_prefix + ".bin"


def index_file_path(path_prefix):
    return path_prefix + ".idx"


def token_dtype_for_vocab(vocab_size):
    """The smallest token dtype Megatron would use for a vocabulary of this size."""
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def check_vocab_fits_dtype(vocab_size, dtype, what="vocabulary"):
    """Refuse a dtype that cannot hold every token id (ids run from 0 to vocab_size - 1)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise ValueError(f"token dtype {dtype} is not an integer type")
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(
            f"{what} of {vocab_size} tokens does not fit token dtype {dtype} "
            f"(largest id {vocab_size - 1} > {np.iinfo(dtype).max}); use int32")


def dtype_code(dtype):
    try:
        return _CODE_OF_DTYPE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no Megatron dtype code; "
                         f"use one of {sorted(str(np.dtype(d)) for d in DTYPE_CODES.values())}") from None


class IndexedDatasetBuilder:
    """Streams documents into `<prefix>.bin` and writes `<prefix>.idx` on `finalize()`.

    Both files are written under temporary names and renamed only when complete, so an
    interrupted preprocessing run leaves nothing that looks like a dataset. Use as a context
    manager: leaving the block normally finalizes, leaving it by an exception discards.
    """

    def __init__(self, path_prefix, dtype=np.int32):
        self.path_prefix = path_prefix
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._limits = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        directory = os.path.dirname(os.path.abspath(path_prefix))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"output directory {directory} does not exist (output prefix {path_prefix})")
        self._bin_tmp = temporary_sibling(data_file_path(path_prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._sequence_lengths = []
        self._document_indices = [0]
        self.num_tokens = 0
        self._closed = False

    def add_document(self, tokens, lengths=None):
        """Append one document; `lengths` splits it into several sequences (default: one)."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document must be a 1-D token array, got shape {array.shape}")
        if array.size and self._limits is not None:
            low, high = int(array.min()), int(array.max())
            if low < self._limits.min or high > self._limits.max:
                raise ValueError(
                    f"token ids {low}..{high} do not fit dtype {self.dtype} of {self.path_prefix}.bin; "
                    f"the vocabulary is too large for this dtype, use int32")
        lengths = [array.size] if lengths is None else [int(n) for n in lengths]
        if sum(lengths) != array.size:
            raise ValueError(f"sequence lengths {lengths} do not add up to the document's {array.size} tokens")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sequence_lengths.extend(lengths)
        self._document_indices.append(len(self._sequence_lengths))
        self.num_tokens += array.size

    @property
    def num_documents(self):
        return len(self._document_indices) - 1

    def finalize(self):
        """Write the index and publish both files under their final names."""
        if self._closed:
            return
        if self.num_documents == 0:
            self.discard()
            raise IndexedDatasetError(f"{self.path_prefix}: no documents were written (empty corpus?); "
                                      "nothing was saved")
        self._bin.close()
        idx_tmp = temporary_sibling(index_file_path(self.path_prefix))
        try:
            with open(idx_tmp, "wb") as handle:
                write_index(handle, self.dtype, self._sequence_lengths, self._document_indices)
            commit(self._bin_tmp, data_file_path(self.path_prefix))
            commit(idx_tmp, index_file_path(self.path_prefix))
        except BaseException:
            discard(idx_tmp)
            self.discard()
            raise
        self._closed = True

    def discard(self):
        """Drop everything written so far; the final names are never touched."""
        if not self._bin.closed:
            self._bin.close()
        discard(self._bin_tmp)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.discard()
        return False


def write_index(handle, dtype, sequence_lengths, document_indices):
    """Write the `.idx` layout described in the module docstring."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    documents = np.asarray(document_indices, dtype=np.int64)
    handle.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, dtype_code(dtype), len(lengths), len(documents)))
    handle.write(lengths.tobytes(order="C"))
    handle.write(pointers.tobytes(order="C"))
    handle.write(documents.tobytes(order="C"))


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron BIN dataset (no tokens are loaded up front).

    `dataset[i]` is sequence i; `get(i, offset, length)` reads part of it, which is how samples
    that start or end inside a document are cut without copying the whole document.
    """

    def __init__(self, path_prefix):
        self.path_prefix = path_prefix
        self.index_path = index_file_path(path_prefix)
        self.data_path = data_file_path(path_prefix)
        for path in (self.index_path, self.data_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: file not found (data prefix {path_prefix!r})")
            if not os.access(path, os.R_OK):
                raise IndexedDatasetError(f"{path}: file is not readable")
        self._read_index()
        self._check_data_size()
        self._tokens = (np.memmap(self.data_path, dtype=self.dtype, mode="r")
                        if os.path.getsize(self.data_path) else np.empty(0, dtype=self.dtype))

    def _read_index(self):
        path = self.index_path
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            header = handle.read(_HEADER.size)
        if len(header) < len(INDEX_MAGIC) or header[:len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise IndexedDatasetError(f"{path}: not a Megatron index file (magic {header[:9]!r}, "
                                      f"expected {INDEX_MAGIC!r})")
        if len(header) < _HEADER.size:
            raise IndexedDatasetError(f"{path}: truncated header ({size} bytes, need {_HEADER.size})")
        _, version, code, sequence_count, document_count = _HEADER.unpack(header)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{path}: index version {version} is not supported (expected {INDEX_VERSION})")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        expected = _HEADER.size + sequence_count * (4 + 8) + document_count * 8
        if size != expected:
            problem = "truncated" if size < expected else "has trailing bytes"
            raise IndexedDatasetError(
                f"{path}: {problem}: {sequence_count} sequences and {document_count} document entries "
                f"need {expected} bytes, the file has {size} (multimodal indices are not supported)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        offset = _HEADER.size
        index = np.memmap(path, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=sequence_count, offset=offset)
        offset += sequence_count * 4
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=sequence_count, offset=offset)
        offset += sequence_count * 8
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=document_count, offset=offset)
        self._check_index_consistency()

    def _check_index_consistency(self):
        path, lengths, docs = self.index_path, self.sequence_lengths, self.document_indices
        if len(lengths) and lengths.min() < 0:
            raise IndexedDatasetError(f"{path}: negative sequence length {int(lengths.min())}")
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths) or np.any(np.diff(docs) < 0):
            raise IndexedDatasetError(f"{path}: document index is not a non-decreasing list from 0 to "
                                      f"{len(lengths)} sequences")

    def _check_data_size(self):
        if len(self.sequence_lengths) == 0:
            return
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        size = os.path.getsize(self.data_path)
        if size < end:
            raise IndexedDatasetError(f"{self.data_path}: shorter than its index says ({size} bytes, "
                                      f"the index needs {end}); the file is truncated or belongs to another index")

    def __len__(self):
        return len(self.sequence_lengths)

    @property
    def num_documents(self):
        return len(self.document_indices) - 1

    @property
    def num_tokens(self):
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __getitem__(self, idx):
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.path_prefix}")
        return self.get(idx % len(self))

    def get(self, idx, offset=0, length=None):
        """Tokens `offset : offset + length` of sequence `idx` (to its end when length is None)."""
        sequence_length = int(self.sequence_lengths[idx])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(f"tokens {offset}:{offset + length} outside sequence {idx} of length "
                             f"{sequence_length} in {self.path_prefix}")
        start = int(self.sequence_pointers[idx]) // self.dtype.itemsize + offset
        return np.array(self._tokens[start:start + length])

    def document(self, doc):
        """All tokens of document `doc` (its sequences concatenated)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if first == last:
            return np.empty(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        stop = start + int(self.sequence_lengths[first:last].sum(dtype=np.int64))
        return np.array(self._tokens[start:stop])


def exists(path_prefix):
    return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))
