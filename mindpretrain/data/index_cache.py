"""On-disk cache of dataset indices, keyed by a hash of everything that determines them.

Building the document/sample/shuffle indices of a large corpus takes seconds to minutes and every
rank of every restart needs the same ones, so they are saved next to the data (or in
`path_to_cache`) and reused when the description matches. The description includes a digest of
the `.idx` file itself, so regenerating a dataset under the same prefix never serves stale
indices. Arrays are written atomically and the description last: a description on disk means
the whole set is complete.
"""
import hashlib
import json
import os

import numpy as np

from mindpretrain.utils.atomic_files import atomic_write, atomic_write_json
from mindpretrain.utils.logging import get_logger

logger = get_logger("data")


def file_digest(path, chunk=1 << 22, algorithm="md5"):
    """Hex digest of a file read in chunks (md5 for cache keys; sha256 where users compare files)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_directory(path_to_cache, path_prefix, kind):
    """`path_to_cache` when set, else `<the data's folder>/cache/<kind>_indices`."""
    if path_to_cache:
        return path_to_cache
    return os.path.join(os.path.dirname(os.path.abspath(path_prefix)), "cache", f"{kind}_indices")


def load_or_build(directory, kind, description, names, build):
    """(arrays, loaded_from_cache): the cached arrays `names` of this description, else `build()`'s, saved."""
    cache = IndexCache(directory, kind, description)
    arrays = cache.load(names)
    if arrays is not None:
        return arrays, True
    arrays = build()
    cache.save(arrays)
    return arrays, False


def description_hash(description):
    return hashlib.md5(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


class IndexCache:
    """The set of `.npy` arrays for one description in one directory."""

    def __init__(self, directory, kind, description):
        self.directory = directory
        self.description = description
        self.prefix = os.path.join(directory, f"{description_hash(description)}-{kind}")

    def _array_path(self, name):
        return f"{self.prefix}-{name}.npy"

    @property
    def description_path(self):
        return f"{self.prefix}-description.json"

    def load(self, names):
        """The cached arrays (memory-mapped), or None when any is missing."""
        paths = [self._array_path(name) for name in names]
        if not os.path.isfile(self.description_path) or not all(os.path.isfile(p) for p in paths):
            return None
        return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in zip(names, paths)}

    def save(self, arrays):
        """Write the arrays, then the description; a read-only cache directory only costs a warning."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            for name, array in arrays.items():
                with atomic_write(self._array_path(name)) as handle:
                    np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
            atomic_write_json(self.description_path, self.description, indent=2, sort_keys=True)
            return True
        except PermissionError as error:
            logger.warning("cannot write the dataset index cache in %s (%s); indices will be rebuilt "
                           "next time", self.directory, error)
            return False
