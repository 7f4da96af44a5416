"""Random sample reads per second from a GPTDataset over a memory-mapped BIN file.

Training reads samples in the shuffled order, so each sample is a random seek into the `.bin`
(one or two documents' worth of tokens). This builds a synthetic corpus on disk (default 200M
tokens, int32, ~800 MB), opens it as training does, and times random `dataset[i]` reads with a warm
page cache (the steady state of an epoch) for two sequence lengths; the median of several passes
is reported.

    python benchmarks/bench_sample_reads.py
    python benchmarks/bench_sample_reads.py --tokens 5e7 --reads 20000
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's package, built in place
from mindpretrain.data.dataset_builder import build_gpt_datasets  # noqa: E402
from mindpretrain.data.indexed_dataset import IndexedDatasetBuilder  # noqa: E402
from mindpretrain.utils.atomic_files import atomic_write_json  # noqa: E402

RESULTS = os.path.join(HERE, "results", "sample_reads.json")
EOD = 1


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=2e8)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 512])
    parser.add_argument("--reads", type=int, default=20000, help="random reads per pass")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--output", default=RESULTS)
    return parser.parse_args()


def write_corpus(prefix, tokens, seed=0):
    rng = np.random.RandomState(seed)
    written = 0
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        while written < tokens:
            lengths = rng.randint(50, 1200, size=10000)
            block = rng.randint(2, 129280, size=int(lengths.sum())).astype(np.int32)
            for piece in np.split(block, np.cumsum(lengths)[:-1]):
                builder.add_document(np.append(piece, EOD))
            written += int(lengths.sum()) + len(lengths)
    return written


def time_reads(dataset, reads, passes, seed=1):
    rng = np.random.RandomState(seed)
    rates = []
    for _ in range(passes):
        order = rng.randint(0, len(dataset), size=reads)
        start = time.perf_counter()
        for index in order:
            dataset[int(index)]
        rates.append(reads / (time.perf_counter() - start))
    return statistics.median(rates), rates


def main():
    args = parse_args()
    results = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory(dir=HERE) as scratch:
        prefix = os.path.join(scratch, "corpus")
        start = time.perf_counter()
        tokens = write_corpus(prefix, int(args.tokens))
        print(f"wrote {tokens / 1e6:.0f}M tokens in {time.perf_counter() - start:.1f} s")
        for seq_length in args.seq_lengths:
            section = {"seq_length": seq_length, "seed": 1234, "split": "1,0,0", "data_path": [prefix],
                       "path_to_cache": os.path.join(scratch, "cache")}
            dataset = build_gpt_datasets(section, [None, 0, 0])[0]
            time_reads(dataset, min(args.reads, 2000), 1)  # warm the page cache and the index
            median, rates = time_reads(dataset, args.reads, args.passes)
            mb_per_s = median * (seq_length + 1) * 4 / 1e6
            print(f"seq_length {seq_length:5d}: {median:10.0f} samples/s ({mb_per_s:.0f} MB/s of tokens), "
                  f"passes {[round(rate) for rate in rates]}")
            results["runs"].append({"seq_length": seq_length, "samples": len(dataset),
                                    "median_samples_per_s": median, "passes_samples_per_s": rates})
    atomic_write_json(args.output, results, make_parent=True, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
