"""Write files so that a crash never leaves a half-written file under the final name.

Every writer in the project (BIN datasets, caches, checkpoints) goes through here: data is
written to a temporary sibling (same directory, so the final `os.replace` is atomic on POSIX),
flushed, and only then renamed. On failure the temporary file is removed.
"""
import contextlib
import json
import os
import tempfile


def temporary_sibling(path):
    """A fresh, unique temporary path next to `path` (same filesystem, so rename is atomic)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    return tmp


def commit(tmp_path, final_path):
    """Flush `tmp_path` to disk and move it to `final_path` in one step."""
    with open(tmp_path, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp_path, final_path)


def discard(tmp_path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp_path)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """`with atomic_write(p) as f: ...` writes p completely or not at all."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def atomic_write_json(path, data, make_parent=False, **dump_options):
    """`json.dump(data, ...)` to `path` completely or not at all (`dump_options` go to json.dump);
    `make_parent` creates the parent directory first (benchmark results, first run)."""
    if make_parent:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, **dump_options)
