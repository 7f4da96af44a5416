"""Tokenize a stream of documents in worker processes into Megatron BIN datasets.

Both preprocessing tools (WikiText articles, jsonl records) feed this engine an iterator of
`(texts, nbytes)`: one text per output dataset (a jsonl record has one per `--json-keys` entry)
and the size of the raw input it came from, for the MB/s figures. Corpora are far larger than
memory, so documents are read, tokenized and written as a stream:

* The main process reads documents into batches of about `batch_bytes` and keeps at most
  `4 * workers` batches in flight (`apply_async`, collected oldest first). `Pool.imap` would give
  the same order but has no back-pressure: its feeder thread runs ahead of the writer and its
  results queue up without bound when writing is slow. The window also keeps input errors (a bad
  jsonl line) in the main thread, where they are raised with their own traceback.
* Each worker loads the tokenizer itself from `(kind, path)` in the pool initializer; nothing but
  texts and token arrays crosses the pipes. The initializer and task function live at module
  level, so the `spawn` start method (macOS, Windows) works as well as `fork`.
* With one worker everything runs in-process; the files are byte-identical either way.

A document whose text has no tokens is skipped (and counted), without an EOD of its own: a lone
EOD is not a document. With `prepend_bos` every document starts with the tokenizer's BOS (so none
is empty). With `packing` ("stitch" or "pad", see mindpretrain.data.packing) the tokenized
documents are re-cut into documents of exactly `packed_length` tokens before they are written.
Outputs appear all together or not at all: an error, Ctrl-C, or an output that would hold no
documents leaves no `.bin`/`.idx` (and no temporary file) behind.
"""
import contextlib
import gzip
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque

import numpy as np

from mindpretrain.data.indexed_dataset import (IndexedDatasetBuilder, IndexedDatasetError, check_vocab_fits_dtype,
                                               data_file_path, index_file_path, token_dtype_for_vocab)
from mindpretrain.data.packing import make_packer
from mindpretrain.data.tokenizer import TOKENIZER_KINDS, TokenizerError, load_tokenizer
from mindpretrain.data.wikitext import WikiTextError
from mindpretrain.validation import ConfigError


class PreprocessError(ValueError):
    """Preprocessing cannot go on; the message names the file and the problem."""


# What the command-line tools report as one "error:" line instead of a traceback.
USER_ERRORS = (PreprocessError, TokenizerError, WikiTextError, IndexedDatasetError, ConfigError, OSError)


DTYPE_AUTO_HELP = "auto = uint16 for vocabularies below 65500 tokens, else int32"


def add_tokenizing_arguments(parser, log_interval, unit, tokenizer_aliases=(),
                             dtype_help=f"default: {DTYPE_AUTO_HELP}"):
    """The flags every preprocessing CLI shares: tokenizer kind, progress interval, token dtype.

    `tokenizer_aliases` are further accepted `--tokenizer-type` names (the caller maps them to a kind);
    `--dtype` defaults to None, which `preprocess` reads as auto."""
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_KINDS + tuple(tokenizer_aliases),
                        default="HFTokenizer", help="default: HFTokenizer")
    parser.add_argument("--log-interval", type=int, default=log_interval,
                        help=f"print progress every this many {unit} (default: {log_interval})")
    parser.add_argument("--dtype", choices=("auto", "uint16", "int32"), default=None,
                        help=f"token dtype ({dtype_help})")
    return parser


def run_cli(prog, input_path, work):
    """Run a preprocessing command's `work()` as the command-line tools do: a missing input or any user
    error becomes one `prog: error: ...` line and exit code 1, Ctrl-C exit 130, success 0 (and what
    `work` returned). Nothing half-written survives either failure: the writers use temporary names."""
    try:
        if not os.path.isfile(input_path):
            raise PreprocessError(f"{input_path}: input file not found")
        return 0, work()
    except USER_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130, None

BATCH_BYTES = 1 << 16
_BATCHES_IN_FLIGHT_PER_WORKER = 4
_MB = 1e6


class _Encoder:
    """Texts to token arrays: no special tokens from the tokenizer, BOS prepended when `bos_id` is given,
    EOD appended to non-empty token lists."""

    def __init__(self, tokenizer, eod_id, bos_id=None):
        self.tokenizer = tokenizer
        self.eod_id = eod_id
        self.bos_id = bos_id

    def __call__(self, batch):
        return [tuple(self._encode(text) for text in texts) for texts in batch]

    def _encode(self, text):
        ids = self.tokenizer.encode(text)
        if self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if ids and self.eod_id is not None:
            ids.append(self.eod_id)
        return np.array(ids, dtype=np.int32)  # every vocabulary fits; half the pickled size of int64


_worker_encoder = None
_worker_error = None


def _init_worker(kind, path, eod_id, bos_id):
    """Pool initializer: load this worker's own tokenizer; the parent alone handles Ctrl-C."""
    global _worker_encoder, _worker_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _worker_encoder = _Encoder(load_tokenizer(kind, path), eod_id, bos_id)
    except Exception as error:  # raised from the first task: a failing initializer makes Pool respawn forever
        _worker_error = error


def _encode_in_worker(batch):
    if _worker_error is not None:
        raise _worker_error
    return _worker_encoder(batch)


def batches(documents, batch_bytes):
    """Group `(texts, nbytes)` documents into `(texts_list, nbytes_total)` of about `batch_bytes`."""
    texts_list, total = [], 0
    for texts, nbytes in documents:
        texts_list.append(tuple(texts))
        total += nbytes
        if total >= batch_bytes:
            yield texts_list, total
            texts_list, total = [], 0
    if texts_list:
        yield texts_list, total


def _encoded_batches(batches, tokenizer, eod_id, workers, bos_id=None):
    """Yield `(encoded_batch, nbytes)` in input order, tokenizing in `workers` processes."""
    if workers == 1:
        encoder = _Encoder(tokenizer, eod_id, bos_id)
        for batch, nbytes in batches:
            yield encoder(batch), nbytes
        return
    with multiprocessing.Pool(workers, initializer=_init_worker,
                              initargs=(tokenizer.kind, tokenizer.path, eod_id, bos_id)) as pool:
        in_flight = deque()
        for batch, nbytes in batches:
            in_flight.append((pool.apply_async(_encode_in_worker, (batch,)), nbytes))
            if len(in_flight) >= _BATCHES_IN_FLIGHT_PER_WORKER * workers:
                result, size = in_flight.popleft()
                yield result.get(), size
        while in_flight:
            result, size = in_flight.popleft()
            yield result.get(), size


def resolve_dtype(dtype, tokenizer):
    """`None`/"auto": Megatron's choice for the vocabulary size; an explicit dtype must hold every id."""
    if dtype is None or dtype == "auto":
        return token_dtype_for_vocab(tokenizer.vocab_size)
    try:
        dtype = np.dtype(dtype)
        check_vocab_fits_dtype(tokenizer.vocab_size, dtype)
    except (TypeError, ValueError) as error:
        raise PreprocessError(f"{tokenizer.path}: cannot store its tokens as {dtype}: {error}") from None
    return dtype


def preprocess(documents, tokenizer_kind, tokenizer_path, output_prefixes, *, source, workers=1,
               append_eod=True, dtype=None, log_interval=1000, batch_bytes=BATCH_BYTES, prepend_bos=False,
               packing=None, packed_length=None):
    """Tokenize `(texts, nbytes)` documents into one BIN dataset per output prefix.

    `texts[i]` of every document goes to `output_prefixes[i]`; `source` names the input in
    messages. Prints progress every `log_interval` documents and a summary to stderr, and returns
    the summary as a dict.
    """
    output_prefixes = [str(prefix) for prefix in output_prefixes]
    _check_arguments(output_prefixes, workers, log_interval, packing, packed_length)
    tokenizer = load_tokenizer(tokenizer_kind, tokenizer_path)
    eod_id, bos_id = _special_ids(tokenizer, append_eod, prepend_bos)
    if packing == "pad" and tokenizer.pad_id is None:
        raise PreprocessError(f"{tokenizer.path}: the tokenizer has neither a pad nor an end-of-document token "
                              "to pad with (give it a tokenizer_config.json with pad_token)")
    dtype = resolve_dtype(dtype, tokenizer)
    progress = _Progress(log_interval)
    outputs = [{"prefix": prefix, "documents": 0, "empty_documents": 0, "tokens": 0} for prefix in output_prefixes]
    packers = [make_packer(packing, packed_length, tokenizer.pad_id) for _ in output_prefixes]
    builders = []
    try:
        for prefix in output_prefixes:  # appended one by one, so a failing one still discards the others
            builders.append(IndexedDatasetBuilder(prefix, dtype))
        encoded = _encoded_batches(batches(documents, batch_bytes), tokenizer, eod_id, workers, bos_id)
        with contextlib.closing(encoded):
            for batch, nbytes in encoded:
                for arrays in batch:
                    if len(arrays) != len(builders):
                        raise PreprocessError(f"{source}: a document has {len(arrays)} texts for "
                                              f"{len(builders)} outputs")
                    for builder, output, packer, array in zip(builders, outputs, packers, arrays):
                        output["empty_documents"] += not array.size
                        _write(builder, output, packer.pack(array))
                progress.update(len(batch), sum(sum(a.size for a in arrays) for arrays in batch), nbytes)
        for builder, output, packer in zip(builders, outputs, packers):
            _write(builder, output, packer.finish())
            output.update(packer.counters())
        _check_not_empty(source, outputs, progress.documents, packing, packed_length)
        finalize_all(builders)
    except BaseException:
        for builder in builders:
            builder.discard()
        raise
    for output in outputs:
        output["files"] = {path: os.path.getsize(path)
                           for path in (data_file_path(output["prefix"]), index_file_path(output["prefix"]))}
    summary = progress.summary(source=source, tokenizer=tokenizer.path, vocab_size=tokenizer.vocab_size,
                               eod_id=eod_id, bos_id=bos_id, dtype=dtype.name, workers=workers, outputs=outputs,
                               packing=packing, packed_length=packed_length)
    print(format_summary(summary), file=sys.stderr, flush=True)
    return summary


def _check_arguments(output_prefixes, workers, log_interval, packing, packed_length):
    if len(set(output_prefixes)) != len(output_prefixes):
        raise PreprocessError(f"output prefixes {output_prefixes} are not distinct")
    if workers < 1:
        raise PreprocessError(f"workers must be at least 1, got {workers}")
    if log_interval < 1:
        raise PreprocessError(f"log interval must be at least 1 document, got {log_interval}")
    if packing not in (None, "stitch", "pad"):
        raise PreprocessError(f"packing must be stitch, pad or None, got {packing!r}")
    if packing and (packed_length is None or packed_length < 1):
        raise PreprocessError(f"packing {packing} needs a packed length of at least 1 token, got {packed_length}")


def _special_ids(tokenizer, append_eod, prepend_bos):
    """(eod_id, bos_id) to add, None for the ones not asked for; a missing one asked for is an error."""
    if append_eod and tokenizer.eod_id is None:
        raise PreprocessError(f"{tokenizer.path}: the tokenizer has no end-of-document token to append "
                              "(give it a tokenizer_config.json with eos_token, or do not append EOD)")
    if prepend_bos and tokenizer.bos_id is None:
        raise PreprocessError(f"{tokenizer.path}: the tokenizer has no beginning-of-sequence token to prepend "
                              "(give it a tokenizer_config.json with bos_token)")
    return (tokenizer.eod_id if append_eod else None), (tokenizer.bos_id if prepend_bos else None)


def _write(builder, output, arrays):
    for array in arrays:
        builder.add_document(array)
        output["documents"] += 1
        output["tokens"] += array.size


def _check_not_empty(source, outputs, documents_read, packing, packed_length):
    empty = [output for output in outputs if not output["documents"]]
    if not empty:
        return
    names = ", ".join(output["prefix"] for output in empty)
    if packing == "stitch" and any(output.get("dropped_tokens") for output in empty):
        raise PreprocessError(
            f"{source}: {max(output['dropped_tokens'] for output in empty):,} tokens in all, fewer than one "
            f"sample of {packed_length} tokens for {names}; nothing was written (use a smaller --seq-length)")
    raise PreprocessError(f"{source}: no tokens for {names} ({documents_read} documents read, all empty); "
                          "nothing was written")


def finalize_all(builders):
    """Publish every output, or none: undo the ones already published if a later one fails."""
    published = []
    try:
        for builder in builders:
            builder.finalize()
            published.append(builder.path_prefix)
    except BaseException:
        for prefix in published:
            for path in (data_file_path(prefix), index_file_path(prefix)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        raise


class _Progress:
    """Counts and rates since the start; prints a line every `log_interval` documents."""

    def __init__(self, log_interval):
        self.log_interval = log_interval
        self.start = time.perf_counter()
        self.documents = self.tokens = self.nbytes = 0

    def update(self, documents, tokens, nbytes):
        before = self.documents // self.log_interval
        self.documents += documents
        self.tokens += tokens
        self.nbytes += nbytes
        if self.documents // self.log_interval > before:
            elapsed, (docs_rate, tokens_rate, mb_rate) = self._rates()
            print(f"processed {self.documents} documents ({docs_rate:.1f} docs/s, {tokens_rate:,.0f} tokens/s, "
                  f"{mb_rate:.2f} MB/s), {elapsed:.1f} s elapsed", file=sys.stderr, flush=True)

    def _rates(self):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return elapsed, (self.documents / elapsed, self.tokens / elapsed, self.nbytes / _MB / elapsed)

    def summary(self, **fields):
        elapsed, (docs_rate, tokens_rate, mb_rate) = self._rates()
        return dict(fields, documents=self.documents, tokens=self.tokens, bytes=self.nbytes, seconds=elapsed,
                    docs_per_s=docs_rate, tokens_per_s=tokens_rate, mb_per_s=mb_rate)


def format_summary(summary):
    eod = summary["eod_id"] if summary["eod_id"] is not None else "not appended"
    bos = "" if summary.get("bos_id") is None else f", BOS {summary['bos_id']} prepended"
    lines = [
        f"preprocessed {summary['source']}: {summary['documents']} documents, {summary['tokens']:,} tokens, "
        f"{summary['bytes'] / _MB:.2f} MB in {summary['seconds']:.2f} s with {summary['workers']} worker(s)",
        f"  {summary['docs_per_s']:.1f} docs/s, {summary['tokens_per_s']:,.0f} tokens/s, "
        f"{summary['mb_per_s']:.2f} MB/s; tokenizer {summary['tokenizer']} (vocab {summary['vocab_size']}, "
        f"EOD {eod}{bos}), dtype {summary['dtype']}",
    ]
    if summary.get("packing"):
        lines.append(f"  --pad-or-stitch {summary['packing']}: each written document is one sample of "
                     f"{summary['packed_length']} tokens")
    for output in summary["outputs"]:
        skipped = f", {output['empty_documents']} empty skipped" if output["empty_documents"] else ""
        lines.append(f"  {output['prefix']}: {output['documents']} documents{skipped}, {output['tokens']:,} tokens"
                     + _packing_note(output))
        lines.extend(f"    {path}  {size:,} bytes" for path, size in output["files"].items())
    return "\n".join(lines)


def _packing_note(output):
    notes = {"dropped_tokens": "{:,} tokens of the final partial sample dropped",
             "truncated_tokens": "{:,} tokens cut off long documents",
             "padding_tokens": "{:,} padding tokens"}
    return "".join(f"; {text.format(output[key])}" for key, text in notes.items() if key in output)


def read_jsonl_documents(path, keys):
    """Yield `(texts, nbytes)` from a jsonl file (optionally .gz), one text per key, in key order.

    Blank lines are skipped; any other line must be a JSON object with a string for every key.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    line_number = 0
    try:
        with opener(path, "rb") as handle:
            for line_number, line in enumerate(handle, 1):
                if line.strip():
                    yield _record_texts(path, line_number, line, keys), len(line)
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        where = f" at line {line_number + 1}" if line_number else ""
        raise PreprocessError(f"{path}: cannot read{where} ({getattr(error, 'strerror', None) or error})") from None


def _record_texts(path, line_number, line, keys):
    try:
        record = json.loads(line)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise PreprocessError(f"{path}:{line_number}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise PreprocessError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            raise PreprocessError(f"{path}:{line_number}: no key {key!r} (keys: {', '.join(map(repr, record))})")
        if not isinstance(record[key], str):
            raise PreprocessError(f"{path}:{line_number}: {key!r} is not a string "
                                  f"(got {type(record[key]).__name__})")
        texts.append(record[key])
    return texts
