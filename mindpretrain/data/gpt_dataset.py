"""GPT pretraining samples from a Megatron BIN dataset, with Megatron-Core's exact sample order.

Users switch between Megatron-LM, MindFormers and us mid-project and compare loss curves, so a
given (data, split, seed, seq_length) must yield the same samples in the same order everywhere:

1. document index: the split's documents repeated for as many epochs as `num_samples` needs,
   shuffled with `numpy.random.RandomState(random_seed)`; when the last epoch is needed only for
   a small tail (< 80 % of an epoch) it is shuffled separately, so the tail still sees a uniform
   mix of documents instead of whatever the shuffle put first.
2. sample index: the document stream is cut into samples of `seq_length + 1` tokens (one extra
   for the shifted labels) that cross document boundaries; consecutive samples share one token.
3. shuffle index: a permutation of samples (again separately for the short final epoch).

All three are cached on disk (see index_cache.py).
"""
import dataclasses
import os
from typing import Optional

import numpy as np

from mindpretrain.validation import ConfigError, require
from mindpretrain.data.index_builders import build_sample_index
from mindpretrain.data.index_cache import default_cache_directory, file_digest, load_or_build
from mindpretrain.utils.logging import get_logger

logger = get_logger("data")

# The final epoch gets its own shuffle when it contributes less than this fraction of an epoch.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80

SAMPLE_COLUMNS = ("input_ids", "labels", "loss_mask", "position_ids")


@dataclasses.dataclass
class GPTDatasetConfig:
    """What determines the samples; built from the `data_loader.config` YAML section."""

    seq_length: int
    random_seed: int = 1234
    split: Optional[str] = "969, 30, 1"
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = False
    drop_last_partial_validation_sequence: bool = True
    add_extra_token_to_sequence: bool = True
    eod: int = -1
    # Accepted for MindFormers configs. Padding only happens in a kept partial validation tail; those
    # positions are filled with 0 and masked out of the loss, as Megatron-Core outputs them.
    pad: int = -1
    path_to_cache: Optional[str] = None

    def __post_init__(self):
        require(isinstance(self.seq_length, int) and not isinstance(self.seq_length, bool)
                and self.seq_length > 0, "seq_length", self.seq_length, "must be a positive integer")
        require(isinstance(self.random_seed, int) and 0 <= self.random_seed < 2 ** 32,
                "random_seed", self.random_seed, "must be an integer in [0, 2**32)")
        needs_eod = self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss
        require(not needs_eod or self.eod >= 0, "eod", self.eod,
                "must be the end-of-document token id when reset_position_ids, reset_attention_mask "
                "or eod_mask_loss is set")
        if self.split is not None:
            parse_split(self.split)

    @property
    def add_extra_token(self):
        return int(bool(self.add_extra_token_to_sequence))


def parse_split(split):
    """`"969, 30, 1"` → normalised fractions for train/valid/test (missing parts are 0)."""
    try:
        parts = [float(part) for part in str(split).replace("/", ",").split(",") if part.strip() != ""]
    except ValueError:
        raise ConfigError(f"split ({split!r}) must be up to three comma-separated numbers, "
                          f"like \"969, 30, 1\"") from None
    require(1 <= len(parts) <= 3, "split", split, "must have one to three parts (train, valid, test)")
    require(all(part >= 0 and np.isfinite(part) for part in parts), "split", split,
            "must have non-negative parts")
    require(sum(parts) > 0, "split", split, "must have a positive sum")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [part / total for part in parts]


def split_document_ranges(split, num_documents):
    """Document id ranges [begin, end) of train/valid/test, or None for an empty split.

    Boundaries are the rounded cumulative fractions, as Megatron computes them, so a split of a
    given corpus selects the same documents in both.
    """
    fractions = parse_split(split)
    bounds = np.cumsum([0.0] + fractions)
    ranges = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        if high <= low:
            ranges.append(None)
            continue
        ranges.append((int(round(low * float(num_documents))), int(round(high * float(num_documents)))))
    return ranges


def num_epochs_for(num_samples, tokens_per_epoch, seq_length, add_extra):
    """Smallest number of passes over the documents that yields `num_samples` samples."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + add_extra
    return max(1, -(-needed // tokens_per_epoch))


def needs_separate_final_epoch(num_samples, num_epochs, tokens_per_epoch, seq_length, add_extra):
    if num_samples is None or num_epochs == 1:
        return False
    samples_before_final = ((num_epochs - 1) * tokens_per_epoch - add_extra) // seq_length
    samples_from_final = num_samples - samples_before_final
    samples_per_epoch = (tokens_per_epoch - add_extra) // seq_length
    return samples_from_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)


def build_document_index(documents, num_epochs, random_state, separate_final_epoch):
    """Document ids for every epoch, shuffled (the last epoch on its own when asked)."""
    if separate_final_epoch and num_epochs > 1:
        head = build_document_index(documents, num_epochs - 1, random_state, False)
        tail = build_document_index(documents, 1, random_state, False)
        return np.concatenate((head, tail))
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    random_state.shuffle(index)
    return index


def build_shuffle_index(num_samples, total_size, random_state):
    """A permutation of range(total_size) that shuffles the first `num_samples` and the rest apart."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    head = np.arange(num_samples, dtype=dtype)
    random_state.shuffle(head)
    if num_samples == total_size:
        return head
    tail = np.arange(num_samples, total_size, dtype=dtype)
    random_state.shuffle(tail)
    return np.concatenate((head, tail))


class GPTDataset:
    """Samples of one split of one BIN dataset.

    `dataset[i]` → dict of `input_ids`, `labels` (int32, `seq_length` each), `loss_mask`
    (float32), `position_ids` (int32) and, when configured, `attention_mask` (bool,
    `(1, seq, seq)`, True = masked).
    """

    def __init__(self, indexed_dataset, documents, num_samples, config, split_name="train"):
        self.dataset = indexed_dataset
        self.documents = np.asarray(documents, dtype=np.int32)
        self.config = config
        self.split_name = split_name
        self.num_samples_requested = num_samples
        if len(self.documents) == 0:
            raise ConfigError(f"split ({config.split!r}) leaves no documents of {indexed_dataset.path_prefix} "
                              f"for the {split_name} split")
        # Only the validation split may keep a final partial sample (Megatron's rule).
        self.drop_last = split_name != "valid" or config.drop_last_partial_validation_sequence
        self._load_or_build_indices()

    # -- indices --------------------------------------------------------------------------
    def description(self):
        cfg = self.config
        return {
            "class": "GPTDataset",
            "dataset_path": os.path.abspath(self.dataset.path_prefix),
            "index_digest": file_digest(self.dataset.index_path),
            "split": self.split_name,
            "documents": [int(self.documents[0]), int(self.documents[-1]), len(self.documents)],
            "num_samples": self.num_samples_requested,
            "random_seed": cfg.random_seed,
            "seq_length": cfg.seq_length,
            "add_extra_token": cfg.add_extra_token,
            "drop_last_partial_sequence": self.drop_last,
        }

    def cache_directory(self):
        return default_cache_directory(self.config.path_to_cache, self.dataset.path_prefix, "GPTDataset")

    def _load_or_build_indices(self):
        arrays, self.loaded_from_cache = load_or_build(
            self.cache_directory(), "GPTDataset", self.description(),
            ("document_index", "sample_index", "shuffle_index"), self._build_indices)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build_indices(self):
        cfg = self.config
        add_extra = cfg.add_extra_token
        sizes = self.dataset.sequence_lengths
        tokens_per_epoch = int(sizes[self.documents].sum(dtype=np.int64))
        if tokens_per_epoch <= add_extra:
            raise ConfigError(f"the {self.split_name} split of {self.dataset.path_prefix} holds "
                              f"{tokens_per_epoch} tokens, too few for one sample")
        num_samples = self.num_samples_requested
        num_epochs = num_epochs_for(num_samples, tokens_per_epoch, cfg.seq_length, add_extra)
        separate_final = needs_separate_final_epoch(num_samples, num_epochs, tokens_per_epoch,
                                                    cfg.seq_length, add_extra)
        random_state = np.random.RandomState(cfg.random_seed)
        document_index = build_document_index(self.documents, num_epochs, random_state, separate_final)
        sample_index = build_sample_index(sizes, document_index, cfg.seq_length, num_epochs, tokens_per_epoch,
                                          drop_last_partial_sequence=self.drop_last,
                                          add_extra_token_to_sequence=add_extra)
        total = sample_index.shape[0] - 1
        if total <= 0:
            raise ConfigError(f"the {self.split_name} split of {self.dataset.path_prefix} holds "
                              f"{tokens_per_epoch} tokens, fewer than one sample of seq_length "
                              f"{cfg.seq_length} + {add_extra}")
        if separate_final:
            head = ((num_epochs - 1) * tokens_per_epoch - add_extra) // cfg.seq_length
        else:
            head = total
        shuffle_index = build_shuffle_index(head, total, random_state)
        logger.info("built %s indices for %s: %d documents, %d epochs, %d samples",
                    self.split_name, self.dataset.path_prefix, len(self.documents), num_epochs, total)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    # -- samples --------------------------------------------------------------------------
    def __len__(self):
        return self.sample_index.shape[0] - 1

    def tokens(self, idx):
        """The `seq_length + 1` raw tokens of sample `idx` (fewer only for a kept partial tail)."""
        add_extra = self.config.add_extra_token
        position = int(self.shuffle_index[idx])
        first_doc, first_offset = (int(v) for v in self.sample_index[position])
        last_doc, last_offset = (int(v) for v in self.sample_index[position + 1])
        parts = []
        for doc_position in range(first_doc, last_doc + 1):
            start = first_offset if doc_position == first_doc else 0
            stop = last_offset + add_extra if doc_position == last_doc else None
            document = int(self.document_index[doc_position])
            length = None if stop is None else stop - start
            parts.append(self.dataset.get(document, offset=start, length=length))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def __getitem__(self, idx):
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        return make_sample(self.tokens(idx), self.config)


def make_sample(tokens, config):
    """Inputs, labels and masks for one sample of raw tokens (Megatron's left-to-right masks).

    Positions past the real tokens (a kept partial tail) and the label that would fall outside
    the sample (when no extra token is read) carry no loss.
    """
    seq_length, add_extra = config.seq_length, config.add_extra_token
    real = len(tokens)
    padded = np.zeros(seq_length + add_extra, dtype=np.int64)
    padded[:real] = tokens
    input_ids = padded[:seq_length]
    labels = padded[1:] if add_extra else np.append(padded[1:], 0)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    loss_mask[:max(real - 1, 0)] = 1.0
    if config.eod_mask_loss:
        loss_mask[input_ids == config.eod] = 0.0
    position_ids = np.arange(seq_length, dtype=np.int64)
    attention = np.tril(np.ones((seq_length, seq_length), dtype=bool)) if config.create_attention_mask else None
    if config.reset_position_ids or (config.reset_attention_mask and attention is not None):
        previous = 0
        for end in np.flatnonzero(input_ids == config.eod):
            if config.reset_attention_mask and attention is not None:
                attention[end + 1:, :end + 1] = False
            if config.reset_position_ids:
                position_ids[end + 1:] -= end + 1 - previous
                previous = end + 1
    sample = {"input_ids": input_ids.astype(np.int32), "labels": labels.astype(np.int32),
              "loss_mask": loss_mask, "position_ids": position_ids.astype(np.int32)}
    if attention is not None:
        sample["attention_mask"] = ~attention[None]
    return sample

