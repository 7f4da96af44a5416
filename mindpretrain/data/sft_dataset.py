"""Supervised fine-tuning rows from the preprocessor's files: whole conversations, packed, in a seeded order.

For an output prefix P of tools/preprocess_sft_data.py, `P_input_ids_document.bin/.idx` holds one
document per conversation and `P_loss_mask_document.bin/.idx` (uint8, same lengths) marks its
target tokens. A row of `seq_length` positions holds whole documents back to back, then padding
(docs/sft.md, "rows"):

    input_ids       the documents' tokens, then pad_token_id
    labels          the next token of the same document, else -100 (a document's last position, padding)
    loss_mask       1.0 where that next token is a target, else 0.0
    position_ids    0, 1, 2, ... restarting at every document, 0 on padding
    actual_seq_len  the documents' cumulative end offsets, the last one repeated up to seq_length

Which documents share a row is planned once (sft_packing.py) and cached on disk next to the data,
keyed by everything that changes it. The row order is Megatron's: a seeded permutation of the rows
for every epoch, so `sizes` beyond one epoch reshuffle, every document is used exactly once per
epoch, and the sample position is one integer (exact resume).
"""
import dataclasses
import itertools
import json
import os
from typing import Optional

import numpy as np

from mindpretrain.validation import ConfigError, require
from mindpretrain.data.gpt_dataset import parse_split
from mindpretrain.data.index_cache import default_cache_directory, description_hash, file_digest, load_or_build
from mindpretrain.data.indexed_dataset import IndexedDataset
from mindpretrain.data.sft_packing import (PACK_STRATEGIES, DocumentTooLongError, PackPlan, one_document_per_row,
                                           pack_documents)
from mindpretrain.utils.logging import get_logger

logger = get_logger("data")

SFT_COLUMNS = ("input_ids", "labels", "loss_mask", "position_ids", "actual_seq_len")
IGNORE_INDEX = -100
TOKENS_SUFFIX, MASK_SUFFIX = "_input_ids_document", "_loss_mask_document"
ROW_ORDER_STREAM = 1    # second seed word of the row-order generator (the pack shuffle uses the seed alone)
_REPORTED = set()       # datasets whose packing efficiency this process has logged


@dataclasses.dataclass
class SFTDatasetConfig:
    """What determines the rows; built from the `data_loader.config` YAML section."""

    seq_length: int
    random_seed: int = 1234
    split: Optional[str] = "969, 30, 1"
    pack: bool = True
    pack_strategy: str = "bfd"
    shuffle_before_pack: bool = True
    pad_token_id: int = 0
    path_to_cache: Optional[str] = None

    def __post_init__(self):
        require(isinstance(self.seq_length, int) and not isinstance(self.seq_length, bool)
                and self.seq_length > 0, "seq_length", self.seq_length, "must be a positive integer")
        require(isinstance(self.random_seed, int) and 0 <= self.random_seed < 2 ** 32,
                "random_seed", self.random_seed, "must be an integer in [0, 2**32)")
        for key in ("pack", "shuffle_before_pack"):
            require(isinstance(getattr(self, key), bool), key, getattr(self, key), "must be True or False")
        require(self.pack_strategy in PACK_STRATEGIES, "pack_strategy", self.pack_strategy,
                f"must be one of {', '.join(PACK_STRATEGIES)}")
        require(isinstance(self.pad_token_id, int) and not isinstance(self.pad_token_id, bool)
                and 0 <= self.pad_token_id < 2 ** 31, "pad_token_id", self.pad_token_id,
                "must be a non-negative token id")
        if self.split is not None:
            parse_split(self.split)


def document_lengths(indexed):
    """Tokens per document of an IndexedDataset (its sequences summed)."""
    if indexed.num_documents == len(indexed):
        return np.asarray(indexed.sequence_lengths, dtype=np.int64)
    starts = np.asarray(indexed.document_indices, dtype=np.int64)
    cumulative = np.concatenate(([0], np.cumsum(indexed.sequence_lengths, dtype=np.int64)))
    return cumulative[starts[1:]] - cumulative[starts[:-1]]


class SFTDocuments:
    """The token and loss-mask twins of one preprocessor output prefix P, checked against each other."""

    def __init__(self, path_prefix):
        self.path_prefix = path_prefix
        self.tokens = IndexedDataset(path_prefix + TOKENS_SUFFIX)
        self.masks = IndexedDataset(path_prefix + MASK_SUFFIX)
        self.lengths = document_lengths(self.tokens)
        self._digests = None
        tokens_path, masks_path = self.tokens.index_path, self.masks.index_path
        if self.masks.dtype != np.uint8:
            raise ConfigError(f"{masks_path}: the loss mask must be uint8, not {self.masks.dtype}")
        if self.masks.num_documents != self.tokens.num_documents:
            raise ConfigError(f"{masks_path} has {self.masks.num_documents} documents, {tokens_path} has "
                              f"{self.tokens.num_documents}; they must come from the same preprocessing run")
        different = np.flatnonzero(document_lengths(self.masks) != self.lengths)
        if different.size:
            raise ConfigError(f"{masks_path} and {tokens_path} disagree on the length of document "
                              f"{int(different[0])}; they must come from the same preprocessing run")

    def __len__(self):
        return self.tokens.num_documents

    def document(self, doc):
        """(tokens, target mask) of document `doc`."""
        return self.tokens.document(doc), self.masks.document(doc)

    def digests(self):
        """Digests of both `.idx` files (computed once), so a regenerated prefix never serves stale rows."""
        if self._digests is None:
            self._digests = [file_digest(self.tokens.index_path), file_digest(self.masks.index_path)]
        return self._digests

    def source_of(self, document):
        """Where `document` came from (`file:line`, `file:record N`) per P_document_sources.txt, else None."""
        try:
            with open(self.path_prefix + "_document_sources.txt", encoding="utf-8") as handle:
                line = next(itertools.islice(handle, document, None), None)
        except OSError:
            return None
        return line.rstrip("\n") if line else None

    def preprocessed_seq_length(self):
        """`--seq-length` of the preprocessing run when its P_summary.json says so, else None."""
        try:
            with open(self.path_prefix + "_summary.json", encoding="utf-8") as handle:
                summary = json.load(handle)
        except (OSError, ValueError):
            return None
        options = summary.get("options") if isinstance(summary, dict) else None
        return options.get("seq_length") if isinstance(options, dict) else None


class SFTDataset:
    """Rows of one split of one SFT prefix; `dataset[i]` is a dict of the five SFT_COLUMNS arrays."""

    def __init__(self, dataset, documents, num_samples, config, split_name="train"):
        self.dataset = dataset
        self.documents = np.asarray(documents, dtype=np.int64)
        self.num_samples_requested = num_samples
        self.config = config
        self.split_name = split_name
        if len(self.documents) == 0:
            raise ConfigError(f"split ({config.split!r}) leaves no documents of {dataset.path_prefix} "
                              f"for the {split_name} split")
        self._load_or_build_indices()
        self._report_efficiency()

    # -- indices --------------------------------------------------------------------------
    def description(self):
        cfg = self.config
        return {"class": "SFTDataset", "dataset_path": os.path.abspath(self.dataset.path_prefix),
                "index_digests": self.dataset.digests(), "split": self.split_name,
                "documents": [int(self.documents[0]), int(self.documents[-1]), len(self.documents)],
                "num_samples": self.num_samples_requested, "random_seed": cfg.random_seed,
                "seq_length": cfg.seq_length, "pack": cfg.pack,
                "pack_strategy": cfg.pack_strategy if cfg.pack else None,
                "shuffle_before_pack": cfg.shuffle_before_pack if cfg.pack else None}

    def cache_directory(self):
        return default_cache_directory(self.config.path_to_cache, self.dataset.path_prefix, "SFTDataset")

    def _load_or_build_indices(self):
        arrays, self.loaded_from_cache = load_or_build(
            self.cache_directory(), "SFTDataset", self.description(),
            ("row_documents", "row_offsets", "sample_index"), self._build_indices)
        self.row_documents = arrays["row_documents"]
        self.row_offsets = arrays["row_offsets"]
        self.sample_index = arrays["sample_index"]

    def _build_indices(self):
        plan = self._pack_plan()
        rows = plan.num_rows
        epochs = 1 if self.num_samples_requested is None else max(1, -(-self.num_samples_requested // rows))
        random_state = np.random.RandomState([self.config.random_seed, ROW_ORDER_STREAM])
        sample_index = np.concatenate([random_state.permutation(rows) for _ in range(epochs)]).astype(np.int64)
        logger.info("built %s SFT indices for %s: %d documents in %d rows, %d epochs, %d samples",
                    self.split_name, self.dataset.path_prefix, len(self.documents), rows, epochs, len(sample_index))
        return {"row_documents": self.documents[plan.documents], "row_offsets": plan.offsets,
                "sample_index": sample_index}

    def _pack_plan(self):
        cfg = self.config
        lengths = self.dataset.lengths[self.documents]
        try:
            if cfg.pack:
                return pack_documents(lengths, cfg.seq_length, cfg.pack_strategy, cfg.shuffle_before_pack,
                                      cfg.random_seed)
            return one_document_per_row(lengths, cfg.seq_length)
        except DocumentTooLongError as error:
            raise self._too_long(error) from None

    def _too_long(self, error):
        document = int(self.documents[error.document])
        if error.length <= 0:
            return ConfigError(f"{self.dataset.path_prefix}: document {document} is empty; every SFT document "
                               "starts with BOS (re-run tools/preprocess_sft_data.py)")
        preprocessed = self.dataset.preprocessed_seq_length()
        made = f" (it was preprocessed with --seq-length {preprocessed})" if preprocessed else ""
        source = self.dataset.source_of(document)
        origin = f" (from {source})" if source else ""
        return ConfigError(
            f"{self.dataset.path_prefix}: document {document}{origin} has {error.length} tokens, more than "
            f"seq_length {error.seq_length}{made}; documents are never split: raise "
            f"data_loader.config.seq_length, or re-run tools/preprocess_sft_data.py with --seq-length "
            f"{error.seq_length} and --overlong skip or truncate")

    def _report_efficiency(self):
        key = description_hash(self.description())
        if key in _REPORTED:
            return
        _REPORTED.add(key)
        plan = self.pack_plan()
        logger.info("%s SFT rows of %s: %d documents in %d rows of %d, packing efficiency %.1f%% "
                    "(tokens / (rows x seq_length))", self.split_name, self.dataset.path_prefix, len(self.documents),
                    plan.num_rows, self.config.seq_length, 100.0 * plan.efficiency)

    def pack_plan(self):
        """The rows (as global document ids) and their packing efficiency."""
        tokens = int(self.dataset.lengths[self.documents].sum())
        return PackPlan(np.asarray(self.row_documents), np.asarray(self.row_offsets), tokens, self.config.seq_length)

    # -- rows -----------------------------------------------------------------------------
    @property
    def num_rows(self):
        return len(self.row_offsets) - 1

    def __len__(self):
        return len(self.sample_index)

    def row_document_ids(self, idx):
        """Global document ids of sample `idx`, in the order they sit in the row."""
        row = int(self.sample_index[idx])
        return np.asarray(self.row_documents[int(self.row_offsets[row]):int(self.row_offsets[row + 1])])

    def __getitem__(self, idx):
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        documents = self.row_document_ids(idx)
        pieces = [self.dataset.document(int(document)) for document in documents]
        for document, (_, mask) in zip(documents, pieces):
            if mask.size and mask.max() > 1:
                raise ConfigError(f"{self.dataset.masks.path_prefix}: document {int(document)} has loss-mask "
                                  f"value {int(mask.max())}; the mask holds 0 or 1 per token")
        return make_sft_row(pieces, self.config.seq_length, self.config.pad_token_id)


def make_sft_row(documents, seq_length, pad_token_id):
    """The five SFT columns of one row holding `documents`, a list of (tokens, target mask) pairs."""
    input_ids = np.full(seq_length, pad_token_id, dtype=np.int32)
    labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int32)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int32)
    ends = []
    start = 0
    for tokens, mask in documents:
        size = len(tokens)
        end = start + size
        if end > seq_length:
            raise ValueError(f"documents of {[len(t) for t, _ in documents]} tokens overflow a row of {seq_length}")
        input_ids[start:end] = tokens
        labels[start:end - 1] = tokens[1:]
        loss_mask[start:end - 1] = mask[1:]
        position_ids[start:end] = np.arange(size, dtype=np.int32)
        ends.append(end)
        start = end
    actual_seq_len = np.full(seq_length, ends[-1] if ends else 0, dtype=np.int32)
    actual_seq_len[:len(ends)] = ends
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "actual_seq_len": actual_seq_len}
