"""Packing efficiency and planning time of the SFT packer on realistic conversation lengths.

    .venv/bin/python benchmarks/bench_sft_packing.py [--documents 1000000] [--median 600] [--sigmas 0.8 1.0 1.2]

Lengths are lognormal (median --median tokens, spread sigma), as chat corpora roughly are; documents longer than
the row are dropped first, as `tools/preprocess_sft_data.py --overlong skip` would. For each row length (4096 and
32768) it reports tokens / (rows x seq_length) of best-fit decreasing, of sequential filling and of one
conversation per row, and the time bfd takes to plan. Writes benchmarks/results/sft_packing.json.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULT = os.path.join(ROOT, "benchmarks", "results", "sft_packing.json")


def measure(lengths, seq_length):
    from mindpretrain.data.sft_packing import one_document_per_row, pack_documents

    row = {}
    for strategy in ("bfd", "sequential"):
        started = time.perf_counter()
        plan = pack_documents(lengths, seq_length, strategy=strategy, shuffle_before_pack=True, seed=0)
        row[strategy] = {"efficiency": plan.efficiency, "rows": plan.num_rows,
                         "seconds": time.perf_counter() - started}
    row["one_per_row"] = {"efficiency": one_document_per_row(lengths, seq_length).efficiency}
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--median", type=float, default=600.0)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 32768])
    args = parser.parse_args(argv)
    rng = np.random.RandomState(0)
    results = []
    for sigma in args.sigmas:
        raw = np.maximum(1, np.round(rng.lognormal(np.log(args.median), sigma, args.documents))).astype(np.int64)
        for seq_length in args.seq_lengths:
            lengths = raw[raw <= seq_length]
            row = {"sigma": sigma, "seq_length": seq_length, "documents": int(lengths.size), **measure(lengths,
                                                                                                       seq_length)}
            results.append(row)
            print(f"sigma {sigma:.1f} S {seq_length:6d} ({lengths.size:,} docs): bfd {100 * row['bfd']['efficiency']:.2f} %"
                  f" in {row['bfd']['seconds']:.2f} s, sequential {100 * row['sequential']['efficiency']:.2f} %,"
                  f" one per row {100 * row['one_per_row']['efficiency']:.2f} %")
    os.makedirs(os.path.dirname(RESULT), exist_ok=True)
    with open(RESULT, "w", encoding="utf-8") as handle:
        json.dump({"median_length": args.median, "results": results}, handle, indent=2)
    print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
