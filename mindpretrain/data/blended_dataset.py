"""Mix several datasets by weight, deterministically, the way Megatron-Core does.

Each position goes to the dataset that is furthest behind its target share so far ("error
greedy"), so at every prefix of the stream each dataset's share is within one sample of its
weight — no randomness, and the same data_path blend gives the same stream in Megatron and here.
"""
import numpy as np

from mindpretrain.validation import ConfigError
from mindpretrain.data.index_builders import build_blending_indices
from mindpretrain.data.index_cache import IndexCache


def normalize_weights(weights):
    """Weights divided by their sum, in float64 exactly as Megatron-Core does it, so ties in the
    greedy choice break the same way in both."""
    array = np.asarray(weights, dtype=np.float64)
    return (array / np.sum(array)).tolist()


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights`."""

    def __init__(self, datasets, weights, size, cache_directory=None, description=None):
        if len(datasets) != len(weights) or not datasets:
            raise ConfigError(f"data_path blend needs one weight per dataset, got {len(weights)} weights "
                              f"for {len(datasets)} datasets")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        arrays = None
        cache = None
        if cache_directory is not None:
            cache = IndexCache(cache_directory, "BlendedDataset",
                               {"class": "BlendedDataset", "weights": self.weights, "size": self.size,
                                "datasets": description})
            arrays = cache.load(("dataset_index", "dataset_sample_index"))
        if arrays is None:
            dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
            arrays = {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}
            if cache is not None:
                cache.save(arrays)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self._check_sizes()

    def _check_sizes(self):
        for number, dataset in enumerate(self.datasets):
            needed = int(np.count_nonzero(self.dataset_index == number))
            if needed > len(dataset):
                raise ConfigError(f"blend needs {needed} samples from dataset {number} "
                                  f"({getattr(getattr(dataset, 'dataset', None), 'path_prefix', dataset)}), "
                                  f"which has only {len(dataset)}")

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} blended samples")
        number = int(self.dataset_index[idx])
        sample = self.datasets[number][int(self.dataset_sample_index[idx])]
        sample["dataset_id"] = np.int16(number)
        return sample
