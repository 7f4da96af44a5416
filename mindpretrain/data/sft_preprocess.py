"""Chat records to the SFT files of the data contract: token ids and target masks as two Megatron BIN datasets.

For an output prefix P it writes, all together or not at all (temporary names, renamed at the end):
`P_input_ids_document.bin/.idx` (the rendered chats, exactly one BOS first), `P_loss_mask_document.bin/.idx`
(uint8, same lengths: 1 on the target tokens: trained assistant content and its closing EOS),
`P_document_sources.txt` (line d: the `file:line` of document d, for errors found later, when rows are packed),
`P_summary.json` (tokenizer and template sha256, options, counts) and, with `--on-error skip` or when
records were dropped as over-long, `P_rejects.jsonl` (one line per rejected record).

`history_reasoning`:
* `keep`: one document per conversation, as the chat template renders it (DeepSeek-V3's keeps the
  `<think>` text of earlier turns, and every assistant turn with `loss` true is a target);
* `split` (what DeepSeek-R1 sees at inference): one document per trained assistant turn, holding the
  conversation up to that turn; earlier assistant turns are context only (no loss) and lose their reasoning
  the way R1's template drops it (everything up to the last `</think>`).

Records are validated and encoded in worker processes (mindpretrain.data.sft_records and chat_template)
and written in input order, so any worker count writes the same bytes. `on_error="fail"` stops at the
first rejected record with one line naming `file:line`, the message number and the reason; "skip" writes
it to the rejects file and counts it (`read = written + rejected`).
"""
import contextlib
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np

from mindpretrain.data.chat_template import ChatEncoder, load_chat_template
from mindpretrain.data.index_cache import file_digest
from mindpretrain.data.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path
from mindpretrain.data.preprocess import BATCH_BYTES, PreprocessError, batches, finalize_all, resolve_dtype
from mindpretrain.data.sft_records import (REJECT_REASONS, THINK_CLOSE, RecordError, RecordValidator,
                                           read_records)
from mindpretrain.data.tokenizer import load_tokenizer
from mindpretrain.utils.atomic_files import commit, discard, temporary_sibling
from mindpretrain.validation import require

HISTORY_REASONING = ("keep", "split")
ON_ERROR = ("fail", "skip")
OVERLONG = ("error", "skip", "truncate")
_IN_FLIGHT_PER_WORKER = 4
_MB = 1e6


@dataclass(frozen=True)
class SFTOptions:
    """What shapes the documents; validated once, here."""
    seq_length: int
    history_reasoning: str = "keep"
    default_system: Optional[str] = None
    on_error: str = "fail"
    overlong: str = "error"

    def __post_init__(self):
        require(isinstance(self.seq_length, int) and self.seq_length >= 2, "seq_length", self.seq_length,
                "must be an integer of at least 2 (BOS and one target token)")
        require(self.history_reasoning in HISTORY_REASONING, "history_reasoning", self.history_reasoning,
                f"must be one of {', '.join(HISTORY_REASONING)}")
        require(self.on_error in ON_ERROR, "on_error", self.on_error, f"must be one of {', '.join(ON_ERROR)}")
        require(self.overlong in OVERLONG, "overlong", self.overlong, f"must be one of {', '.join(OVERLONG)}")
        require(self.default_system is None or isinstance(self.default_system, str), "default_system",
                self.default_system, "must be a string")


def output_paths(prefix):
    """The files of one output prefix (BIN datasets by prefix, the others by path)."""
    return {"input_ids": f"{prefix}_input_ids_document", "loss_mask": f"{prefix}_loss_mask_document",
            "summary": f"{prefix}_summary.json", "rejects": f"{prefix}_rejects.jsonl",
            "sources": f"{prefix}_document_sources.txt"}   # line d: where document d came from (file:line)


def strip_history_reasoning(content):
    """An earlier assistant turn as DeepSeek-R1's template renders it: the text after the last `</think>`."""
    return content.split(THINK_CLOSE)[-1] if THINK_CLOSE in content else content


def document_views(conversation, history_reasoning):
    """The turn lists that become documents (see the module docstring for keep and split)."""
    turns = conversation.turns
    if history_reasoning == "keep":
        return [list(turns)]
    views = []
    for index, turn in enumerate(turns):
        if turn.trained:
            history = [replace(before, content=strip_history_reasoning(before.content), trained=False)
                       if before.role == "assistant" else before for before in turns[:index]]
            views.append(history + [turn])
    return views


@dataclass
class RecordResult:
    source: str
    nbytes: int
    documents: list          # [(ids int32, target mask uint8)]
    reject: Optional[tuple]  # (code, detail, message number)
    truncated_tokens: int = 0


class RecordProcessor:
    """One record to its documents or its reject: parse, validate, render, tokenize, apply the length rule."""

    def __init__(self, tokenizer, template, options):
        self.options = options
        self.encoder = ChatEncoder(tokenizer, template)
        self.validator = RecordValidator(self.encoder.added_tokens(), options.default_system)

    def __call__(self, batch):
        return [self.process(record) for (record,) in batch]

    def process(self, record):
        try:
            conversation = self.validator.validate(self.validator.parse(record.payload))
            fitted = [self._fit(self.encoder.encode(view))
                      for view in document_views(conversation, self.options.history_reasoning)]
        except RecordError as error:
            return RecordResult(record.source, record.nbytes, [], (error.code, error.detail, error.message_number))
        documents = [(ids, mask) for ids, mask, _ in fitted]
        return RecordResult(record.source, record.nbytes, documents, None, sum(cut for _, _, cut in fitted))

    def _fit(self, encoded):
        """(ids, mask, tokens cut off) within seq_length, or the overlong reject naming the turn it cuts."""
        limit, length = self.options.seq_length, encoded.ids.size
        if length <= limit:
            return encoded.ids, encoded.target_mask, 0
        number = next((n for _, end, n in encoded.spans if end > limit), encoded.spans[-1][2])
        if self.options.overlong != "truncate":
            raise RecordError("overlong", f"{length} tokens, more than --seq-length {limit}", number)
        ids, mask = encoded.ids[:limit], encoded.target_mask[:limit]
        if not mask.any():
            raise RecordError("overlong", f"{length} tokens cut to --seq-length {limit} leave no target token",
                              number)
        return ids, mask, length - limit


_worker_processor = None
_worker_error = None


def _init_worker(kind, path, template, options):
    """Pool initializer: this worker's own tokenizer and template; the parent alone handles Ctrl-C."""
    global _worker_processor, _worker_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _worker_processor = RecordProcessor(load_tokenizer(kind, path), template, options)
    except Exception as error:  # raised from the first task: a failing initializer makes Pool respawn forever
        _worker_error = error


def _process_in_worker(batch):
    if _worker_error is not None:
        raise _worker_error
    return _worker_processor(batch)


def _processed(records, processor, workers, initargs):
    """RecordResults in input order, computed in `workers` processes with a bounded window of batches."""
    batches_of_records = (batch for batch, _ in batches((((record,), record.nbytes) for record in records),
                                                        BATCH_BYTES))
    if workers == 1:
        for batch in batches_of_records:
            yield from processor(batch)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        in_flight = deque()
        for batch in batches_of_records:
            in_flight.append(pool.apply_async(_process_in_worker, (batch,)))
            if len(in_flight) >= _IN_FLIGHT_PER_WORKER * workers:
                yield from in_flight.popleft().get()
        while in_flight:
            yield from in_flight.popleft().get()


def _all_records(inputs):
    return itertools.chain.from_iterable(read_records(path) for path in inputs)


def preprocess_sft(inputs, output_prefix, options, *, tokenizer_path, tokenizer_kind="HFTokenizer",
                   chat_template=None, workers=1, dtype=None, log_interval=1000):
    """Write the SFT files for `output_prefix` from the records of `inputs`; returns the summary dict
    (the one of P_summary.json plus timings). Progress lines and the summary go to stderr."""
    inputs = [str(path) for path in inputs]
    _check_arguments(inputs, workers, log_interval)
    tokenizer = load_tokenizer(tokenizer_kind, tokenizer_path)
    template = load_chat_template(tokenizer.path, chat_template)
    processor = RecordProcessor(tokenizer, template, options)
    if options.default_system is not None:
        token = processor.validator.find_forbidden(options.default_system)
        require(token is None, "default_system", options.default_system, f"holds the control token {token!r}")
    dtype = resolve_dtype(dtype, tokenizer)
    counts = _Counts(log_interval)
    outputs = _SFTOutputs(str(output_prefix), dtype, options)
    try:
        results = _processed(_all_records(inputs), processor, workers,
                             (tokenizer.kind, tokenizer.path, template, options))
        with contextlib.closing(results):
            for result in results:
                _check_reject(result, options)
                outputs.add(result)
                counts.add(result)
        summary = _summary(inputs, tokenizer, template, options, dtype, counts, output_prefix)
        if not counts.documents:
            raise PreprocessError(f"{', '.join(inputs)}: no record could be used ({counts.records} read, "
                                  f"rejected: {_reasons(summary['rejects'])}); nothing was written")
        outputs.publish(summary)
    except BaseException:
        outputs.discard()
        raise
    summary.update(counts.rates(), workers=workers, output_prefix=str(output_prefix))
    print(format_sft_summary(summary), file=sys.stderr, flush=True)
    return summary


def _check_arguments(inputs, workers, log_interval):
    if not inputs:
        raise PreprocessError("no input files")
    for path in inputs:
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: input file not found")
    if workers < 1:
        raise PreprocessError(f"workers must be at least 1, got {workers}")
    if log_interval < 1:
        raise PreprocessError(f"log interval must be at least 1 record, got {log_interval}")


def _check_reject(result, options):
    """--on-error fail stops at the first reject (over-long ones are dropped anyway with --overlong skip)."""
    if result.reject is None or options.on_error == "skip":
        return
    code, detail, number = result.reject
    if code == "overlong" and options.overlong == "skip":
        return
    raise PreprocessError(RecordError(code, detail, number).describe(result.source))


class _Counts:
    """Record and token counts, and a progress line every `log_interval` records."""

    def __init__(self, log_interval):
        self.log_interval = log_interval
        self.start = time.perf_counter()
        self.records = self.written = self.documents = self.tokens = self.targets = self.nbytes = 0
        self.truncated_documents = self.truncated_tokens = self.longest = 0
        self.rejects = Counter()

    def add(self, result):
        self.records += 1
        self.nbytes += result.nbytes
        if result.reject is not None:
            self.rejects[result.reject[0]] += 1
        else:
            self.written += 1
        for ids, mask in result.documents:
            self.documents += 1
            self.tokens += ids.size
            self.targets += int(mask.sum())
            self.longest = max(self.longest, ids.size)
        self.truncated_tokens += result.truncated_tokens
        self.truncated_documents += bool(result.truncated_tokens)
        if self.records % self.log_interval == 0:
            rates = self.rates()
            print(f"processed {self.records} records ({rates['records_per_s']:.1f} records/s, "
                  f"{rates['tokens_per_s']:,.0f} tokens/s, {rates['mb_per_s']:.2f} MB/s), {self.written} written, "
                  f"{sum(self.rejects.values())} rejected, {rates['seconds']:.1f} s elapsed",
                  file=sys.stderr, flush=True)

    def rates(self):
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {"seconds": seconds, "records_per_s": self.records / seconds, "tokens_per_s": self.tokens / seconds,
                "mb_per_s": self.nbytes / _MB / seconds}



def _summary(inputs, tokenizer, template, options, dtype, counts, output_prefix):
    """The content of P_summary.json: nothing in it depends on timing or the worker count."""
    paths = output_paths(output_prefix)
    return {
        "inputs": inputs,
        "tokenizer": {"path": tokenizer.path, "sha256": file_digest(tokenizer.path, algorithm="sha256"), "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eod_id},
        "chat_template": {"source": template.source, "sha256": template.sha256},
        "options": asdict(options),
        "dtype": {"input_ids": dtype.name, "loss_mask": "uint8"},
        "records": {"read": counts.records, "written": counts.written, "rejected": sum(counts.rejects.values())},
        "rejects": {code: counts.rejects[code] for code in REJECT_REASONS if counts.rejects[code]},
        "documents": counts.documents,
        "tokens": counts.tokens,
        "target_tokens": counts.targets,
        "longest_document": counts.longest,
        "truncated_documents": counts.truncated_documents,
        "truncated_tokens": counts.truncated_tokens,
        "files": {key: os.path.basename(paths[key]) for key in ("input_ids", "loss_mask")},  # beside this file
    }


def _reasons(rejects):
    return ", ".join(f"{code} {count}" for code, count in rejects.items()) or "none"


def format_sft_summary(summary):
    records = summary["records"]
    tokenizer = summary["tokenizer"]
    lines = [
        f"preprocessed {len(summary['inputs'])} input(s): {records['read']} records read = {records['written']} "
        f"written + {records['rejected']} rejected ({_reasons(summary['rejects'])}); {summary['documents']} "
        f"documents, {summary['tokens']:,} tokens ({summary['target_tokens']:,} targets) in "
        f"{summary['seconds']:.2f} s with {summary['workers']} worker(s)",
        f"  {summary['records_per_s']:.1f} records/s, {summary['tokens_per_s']:,.0f} tokens/s, "
        f"{summary['mb_per_s']:.2f} MB/s; tokenizer {tokenizer['path']} (vocab {tokenizer['vocab_size']}, "
        f"BOS {tokenizer['bos_id']}, EOS {tokenizer['eos_id']}), chat template {summary['chat_template']['source']}, "
        f"history reasoning {summary['options']['history_reasoning']}",
    ]
    if summary["truncated_documents"]:
        lines.append(f"  {summary['truncated_documents']} documents cut to --seq-length "
                     f"{summary['options']['seq_length']} ({summary['truncated_tokens']:,} tokens dropped)")
    lines.extend(f"  {summary['output_prefix']}{suffix}" for suffix in (
        "_input_ids_document.bin/.idx", "_loss_mask_document.bin/.idx", "_summary.json",
        "_document_sources.txt"))
    return "\n".join(lines)


class _SFTOutputs:
    """The output files under temporary names until `publish`, which renames them all or none."""

    def __init__(self, prefix, dtype, options):
        self.paths = output_paths(prefix)
        self.keep_rejects = options.on_error == "skip" or options.overlong == "skip"
        self.builders = []
        self._rejects_tmp = self._rejects = None
        self._sources_tmp = self._sources = None
        try:
            for key, kind in (("input_ids", dtype), ("loss_mask", np.uint8)):
                self.builders.append(IndexedDatasetBuilder(self.paths[key], kind))
            self._sources_tmp = temporary_sibling(self.paths["sources"])
            self._sources = open(self._sources_tmp, "w", encoding="utf-8")
            if self.keep_rejects:
                self._rejects_tmp = temporary_sibling(self.paths["rejects"])
                self._rejects = open(self._rejects_tmp, "w", encoding="utf-8")
        except BaseException:
            self.discard()
            raise

    def add(self, result):
        for ids, mask in result.documents:
            self.builders[0].add_document(ids)
            self.builders[1].add_document(mask)
            self._sources.write(result.source.replace("\n", " ") + "\n")
        if result.reject is not None and self._rejects is not None:
            code, detail, number = result.reject
            line = {"source": result.source, "message_number": number, "reason": code, "message": detail}
            self._rejects.write(json.dumps(line, ensure_ascii=False) + "\n")

    def publish(self, summary):
        """Rejects and summary are written first; the renames follow, undone if one fails."""
        summary_tmp = temporary_sibling(self.paths["summary"])
        try:
            with open(summary_tmp, "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=2, ensure_ascii=False)
                handle.write("\n")
            if self._rejects is not None:
                self._rejects.close()
            self._sources.close()
            finalize_all(self.builders)
            try:
                commit(self._sources_tmp, self.paths["sources"])
                if self._rejects_tmp is not None:
                    commit(self._rejects_tmp, self.paths["rejects"])
                else:  # an earlier run's rejects would contradict this summary
                    discard(self.paths["rejects"])
                commit(summary_tmp, self.paths["summary"])
            except BaseException:
                published = [self.paths["sources"]] + ([self.paths["rejects"]] if self._rejects_tmp is not None else [])
                for key in ("input_ids", "loss_mask"):
                    published += [data_file_path(self.paths[key]), index_file_path(self.paths[key])]
                for path in published:
                    discard(path)
                raise
        finally:
            discard(summary_tmp)

    def discard(self):
        for builder in self.builders:
            builder.discard()
        for handle, path in ((self._rejects, self._rejects_tmp), (self._sources, self._sources_tmp)):
            if handle is not None:
                handle.close()
            if path is not None:
                discard(path)
