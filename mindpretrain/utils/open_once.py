"""A cache that opens each resource once, however many readers ask for it, and closes them together.

Checkpoint conversion reads one safetensors shard for many tensors, and a blended dataset names the
same prefix in several splits: opening per use would re-read headers and multiply memory maps.
"""


class OpenOnce:
    """`cache(key)` opens `key` with `opener` on first use; `release(key)` closes one early (so the pages
    a finished file touched stop counting towards this process's memory), `close()` closes the rest.
    Resources without a `close` method (e.g. a dataset whose maps close when collected) are simply dropped."""

    def __init__(self, opener):
        self._opener = opener
        self._open = {}

    def __call__(self, key):
        if key not in self._open:
            self._open[key] = self._opener(key)
        return self._open[key]

    def release(self, key):
        _close(self._open.pop(key, None))

    def close(self):
        for resource in self._open.values():
            _close(resource)
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _close(resource):
    close = getattr(resource, "close", None)
    if close is not None:
        close()
