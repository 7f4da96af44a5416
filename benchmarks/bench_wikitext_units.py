"""wikitext_to_bin.py throughput for both document units: MindFormers' paragraphs (cleaned, BOS, stitched into
samples of seq_length + 1 tokens, the default) and our whole articles with EOS (`--document-unit article`).

    .venv/bin/python benchmarks/bench_wikitext_units.py [--input ../shared/data/wikitext-2/valid.txt] [--rounds 3]

The two units alternate (paragraph, article, paragraph, ...); each run is the whole CLI in this process with the
DeepSeek-V3 tokenizer, one worker, `--seq-length 4096` (the guide's flags). Tokens/s counts the tokens written
(the .idx's document sizes). Prints medians and spread, writes benchmarks/results/bench_wikitext_units.json.
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_INPUT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")


def written_tokens(prefix):
    from mindpretrain.data.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return int(sum(int(size) for size in dataset.sequence_lengths))


def run(unit, source, folder):
    from research.deepseek3 import wikitext_to_bin

    prefix = os.path.join(folder, unit)
    args = ["--input", source, "--output-prefix", prefix, "--seq-length", "4096", "--worker", "1"]
    if unit == "article":
        args += ["--document-unit", "article"]
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert wikitext_to_bin.main(args) == 0
    seconds = time.perf_counter() - started
    return seconds, written_tokens(f"{prefix}_text_document")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from mindpretrain.utils.atomic_files import atomic_write_json
    load = os.getloadavg()
    runs = {"paragraph": [], "article": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for unit in runs:
                runs[unit].append(run(unit, args.input, folder))
    result = {"input": os.path.abspath(args.input), "rounds": args.rounds, "load_start": load,
              "load_end": os.getloadavg(), "units": {}}
    for unit, values in runs.items():
        rates = [tokens / seconds for seconds, tokens in values]
        result["units"][unit] = {"tokens": values[0][1], "seconds": [seconds for seconds, _ in values],
                                 "tokens_per_s_median": statistics.median(rates), "tokens_per_s_min": min(rates),
                                 "tokens_per_s_max": max(rates)}
        print(f"{unit:>9}: {values[0][1]:,} tokens, median {statistics.median(rates):,.0f} tokens/s "
              f"(runs {min(rates):,.0f}-{max(rates):,.0f}), median {statistics.median(s for s, _ in values):.2f} s")
    print(f"load average {load[0]:.2f} -> {result['load_end'][0]:.2f}")
    atomic_write_json(os.path.join(ROOT, "benchmarks", "results", "bench_wikitext_units.json"), result, make_parent=True,
                      indent=1)


if __name__ == "__main__":
    main()
