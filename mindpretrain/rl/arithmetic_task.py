"""The GRPO demo's task: one-digit addition, answered as `\\boxed{sum}`, with its own character tokenizer.

    python -m mindpretrain.rl.arithmetic_task --output DIR [--prompts N] [--corpus N] [--seed S]

writes DIR/tokenizer/{tokenizer.json,tokenizer_config.json}, DIR/prompts.jsonl (`{"prompt": "3+4=", "label":
"7"}`, for rl_config.data with `apply_chat_template: false`) and DIR/format_corpus.jsonl (`{"text":
"3+4=\\boxed{6}"}`, for tools/preprocess_data.py). The corpus teaches the answer FORMAT only: its boxed number
is drawn uniformly from the possible sums, independently of the operands, so a model pretrained on it answers
in the format the deepscaler grader reads (the last `\\boxed{}`) with about chance accuracy, and GRPO has
the actual sums left to learn.
"""
import argparse
import itertools
import json
import os
import random

from mindpretrain.utils.atomic_files import atomic_write, atomic_write_json

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Digits and the answer format `\boxed{..}`, with `+ - =` and a space for the prompts and anything near them.
CHARACTERS = tuple("0123456789") + ("+", "-", "=", " ", "\\", "b", "o", "x", "e", "d", "{", "}")
DEFAULT_MAX_OPERAND = 4   # operands 0..4: 25 facts, sums 0..8
DEFAULT_PROMPTS, DEFAULT_CORPUS = 200, 4000


def vocabulary():
    """token -> id: the special tokens first (pad 0, bos 1, eos 2, unk 3), then one id per character."""
    return {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def build_task_tokenizer():
    """A `tokenizers.Tokenizer` with one token per character; decoding concatenates the characters."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer


def write_task_tokenizer(directory):
    """DIR/tokenizer.json and the tokenizer_config.json naming its BOS, EOS and pad; returns the tokenizer.json."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    with atomic_write(path, "w") as handle:
        handle.write(build_task_tokenizer().to_str(pretty=True))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "unk_token": UNK, "add_bos_token": True, "add_eos_token": False, "model_max_length": 64}
    atomic_write_json(os.path.join(directory, "tokenizer_config.json"), config, indent=2)
    return path


def facts(max_operand=DEFAULT_MAX_OPERAND):
    """Every (a, b) with a, b in 0..max_operand."""
    return list(itertools.product(range(max_operand + 1), repeat=2))


def prompt_text(a, b):
    return f"{a}+{b}="


def boxed(number):
    return f"\\boxed{{{number}}}"


def possible_sums(max_operand=DEFAULT_MAX_OPERAND):
    return list(range(2 * max_operand + 1))


def _balanced_facts(count, rng, max_operand):
    """`count` facts taken from successive shuffles of all of them, so every fact appears about equally."""
    chosen, pool = [], facts(max_operand)
    while len(chosen) < count:
        rng.shuffle(pool)
        chosen.extend(pool[:count - len(chosen)])
    return chosen


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def write_prompts(path, count, seed, max_operand=DEFAULT_MAX_OPERAND):
    """`count` jsonl lines {"prompt": "a+b=", "label": "a+b as a string"}; every fact about equally often."""
    rng = random.Random(seed)
    rows = [{"prompt": prompt_text(a, b), "label": str(a + b)} for a, b in _balanced_facts(count, rng, max_operand)]
    return _write_jsonl(path, rows)


def write_format_corpus(path, count, seed, max_operand=DEFAULT_MAX_OPERAND, true_fraction=0.0):
    """`count` jsonl lines {"text": "a+b=\\boxed{s}"}: s is a + b on a `true_fraction` of the lines (drawn at
    random), else uniform over the possible sums. At 0 the corpus teaches the format only; the demo uses a small
    fraction, so the pretrained model answers right a little more often than chance and GRPO sharpens that."""
    rng = random.Random(seed)
    sums = possible_sums(max_operand)
    rows = [{"text": prompt_text(a, b) + boxed(a + b if rng.random() < true_fraction else rng.choice(sums))}
            for a, b in _balanced_facts(count, rng, max_operand)]
    return _write_jsonl(path, rows)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description="Write the GRPO arithmetic demo's tokenizer, prompts and "
                                                 "format-only pretraining corpus.")
    parser.add_argument("--output", required=True, help="directory to write into")
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help="prompt lines (default %(default)s)")
    parser.add_argument("--corpus", type=int, default=DEFAULT_CORPUS, help="corpus lines (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--true-fraction", type=float, default=0.0,
                        help="share of corpus lines whose boxed sum is the true one (default %(default)s: none)")
    parser.add_argument("--max-operand", type=int, default=DEFAULT_MAX_OPERAND,
                        help="operands are 0..N (default %(default)s)")
    args = parser.parse_args(argv)
    for name in ("prompts", "corpus"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} ({getattr(args, name)}) must be a positive number of lines")
    if not 0.0 <= args.true_fraction <= 1.0:
        parser.error(f"--true-fraction ({args.true_fraction}) must be in [0, 1]")
    if args.max_operand < 0:
        parser.error(f"--max-operand ({args.max_operand}) must be >= 0")
    return args


def main(argv=None):
    args = _parse_args(argv)
    tokenizer = write_task_tokenizer(os.path.join(args.output, "tokenizer"))
    print(f"wrote {tokenizer} (and tokenizer_config.json beside it): {len(vocabulary())} tokens")
    prompts = write_prompts(os.path.join(args.output, "prompts.jsonl"), args.prompts, args.seed, args.max_operand)
    print(f"wrote {prompts}: {args.prompts} prompts over {len(facts(args.max_operand))} addition facts")
    corpus = write_format_corpus(os.path.join(args.output, "format_corpus.jsonl"), args.corpus, args.seed + 1,
                                 args.max_operand, args.true_fraction)
    print(f"wrote {corpus}: {args.corpus} lines in the answer format, {args.true_fraction:.0%} with the true sum, "
          "the others a random one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
