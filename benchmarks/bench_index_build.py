"""Times the dataset index builders, C++ against the NumPy fallback, on a synthetic corpus.

The sample index is rebuilt whenever a cache is missing (new blend, seq_length or seed), before the
first training step; the goal is under 10 s with C++ for a billion tokens. Both backends run side
by side in one process on the same inputs, and their outputs are checked to be identical.

    python benchmarks/bench_index_build.py                 # 1B tokens, 10M blended samples
    python benchmarks/bench_index_build.py --tokens 1e8    # quicker
"""
import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's package, built in place, without installing
from mindpretrain.data import index_builders  # noqa: E402
from mindpretrain.utils.atomic_files import atomic_write_json  # noqa: E402

RESULTS = os.path.join(HERE, "results", "index_build.json")
MEAN_DOCUMENT_TOKENS = 600
BLEND_WEIGHTS = (0.5, 0.3, 0.2)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9, help="corpus size in tokens")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--blend-samples", type=float, default=1e7, help="blended samples to index")
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend; the median is reported")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", default=RESULTS)
    return parser.parse_args()


def synthetic_corpus(tokens, seed):
    """Lognormal document lengths (mean ~600 tokens, long right tail, like web text) summing to
    `tokens`, and one epoch's shuffled document index."""
    rng = np.random.RandomState(seed)
    sigma = 1.0
    mu = np.log(MEAN_DOCUMENT_TOKENS) - sigma ** 2 / 2
    draws = int(tokens / MEAN_DOCUMENT_TOKENS * 1.1) + 16
    sizes = np.maximum(np.rint(rng.lognormal(mu, sigma, size=draws)), 1).astype(np.int64)
    count = int(np.searchsorted(np.cumsum(sizes), tokens)) + 1
    sizes = sizes[:count].astype(np.int32)
    document_index = np.random.RandomState(seed).permutation(count).astype(np.int32)
    return sizes, document_index


def median_seconds(function, repeats):
    """Median wall time and the last result (to check the backends agree)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def same_arrays(first, second):
    first = first if isinstance(first, tuple) else (first,)
    second = second if isinstance(second, tuple) else (second,)
    return all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(first, second))


def compare_backends(name, build, repeats):
    """One row of the table: median seconds per backend and whether they produced the same arrays."""
    row = {"task": name}
    results = {}
    for backend in ("cpp", "numpy"):
        if backend == "cpp" and not index_builders.HAVE_CPP_HELPERS:
            row["cpp_s"] = None
            continue
        row[f"{backend}_s"], results[backend] = median_seconds(lambda: build(backend), repeats)
    row["identical"] = same_arrays(results["cpp"], results["numpy"]) if len(results) == 2 else None
    return row


def print_table(rows):
    print(f"{'task':<48} {'C++ (s)':>10} {'NumPy (s)':>10} {'speed-up':>9}  identical")
    for row in rows:
        cpp, fallback = row["cpp_s"], row["numpy_s"]
        speedup = f"{fallback / cpp:8.1f}x" if cpp else "      n/a"
        cpp_text = f"{cpp:10.3f}" if cpp is not None else f"{'n/a':>10}"
        print(f"{row['task']:<48} {cpp_text} {fallback:10.3f} {speedup}  {row['identical']}")


def main():
    args = parse_args()
    tokens, blend_samples = int(args.tokens), int(args.blend_samples)
    sizes, document_index = synthetic_corpus(tokens, args.seed)
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))

    def sample_index(backend):
        return index_builders.build_sample_index(sizes, document_index, args.seq_length, 1, tokens_per_epoch,
                                                 backend=backend)

    def blending(backend):
        return index_builders.build_blending_indices(BLEND_WEIGHTS, blend_samples, backend=backend)

    rows = [
        compare_backends(f"sample index, {tokens_per_epoch:.3g} tokens, {len(sizes)} docs", sample_index,
                         args.repeats),
        compare_backends(f"blending, {len(BLEND_WEIGHTS)} datasets, {blend_samples} samples", blending,
                         args.repeats),
    ]
    print_table(rows)
    report = {
        "tokens": tokens_per_epoch, "documents": len(sizes), "seq_length": args.seq_length,
        "num_samples": (tokens_per_epoch - 1) // args.seq_length,  # drop_last, one extra token
        "blend_samples": blend_samples,
        "blend_weights": BLEND_WEIGHTS, "repeats": args.repeats, "seed": args.seed,
        "have_cpp_helpers": index_builders.HAVE_CPP_HELPERS, "numpy": np.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "results": rows,
    }
    atomic_write_json(args.output, report, make_parent=True, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
