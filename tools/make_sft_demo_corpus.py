"""Write a small reasoning-chat corpus for the fine-tuning demo, with no download: column additions worked out
step by step, in the OpenAI `messages` layout that tools/preprocess_sft_data.py reads.

    python tools/make_sft_demo_corpus.py --output data/sft_demo/chats.jsonl [--conversations 1500] [--seed 0]

Each conversation asks for a sum; the assistant's `reasoning_content` adds the digits column by column with the
carries, and its `content` states the result. About one in five conversations has two turns, whose first answer
carries `"loss": false` (context only, not trained), and some have a system prompt. The task is regular enough
for the tiny model's target loss to fall within a few hundred steps, and every answer is checkable.
"""
import argparse
import json
import os
import random
import sys

SYSTEM_PROMPTS = ("You are a careful calculator. Think step by step.", "Show your working, then answer.")


def column_reasoning(left, right):
    """The digit-by-digit addition of two non-negative integers, least significant column first."""
    steps, carry, column = [], 0, 0
    a, b = str(left)[::-1], str(right)[::-1]
    while column < max(len(a), len(b)) or carry:
        x = int(a[column]) if column < len(a) else 0
        y = int(b[column]) if column < len(b) else 0
        total = x + y + carry
        steps.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}, write {total % 10}"
                     + (", carry 1" if total >= 10 else ""))
        carry, column = total // 10, column + 1
    return "; ".join(steps) + f". So {left} + {right} = {left + right}."


def turn(rng):
    """One (user, assistant) exchange."""
    digits = rng.choice((2, 2, 3, 3, 4))
    left, right = (rng.randrange(10 ** (digits - 1), 10 ** digits) for _ in range(2))
    question = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}."))
    return ({"role": "user", "content": question.format(a=left, b=right)},
            {"role": "assistant", "reasoning_content": column_reasoning(left, right),
             "content": f"{left} + {right} = {left + right}."})


def conversation(rng):
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.2:
        user, assistant = turn(rng)
        messages += [user, dict(assistant, loss=False)]
    messages += list(turn(rng))
    return {"messages": messages}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="make_sft_demo_corpus.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--conversations", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.conversations < 1:
        parser.error(f"--conversations ({args.conversations}) must be at least 1")
    rng = random.Random(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    temporary = args.output + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        for _ in range(args.conversations):
            handle.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")
    os.replace(temporary, args.output)
    print(f"wrote {args.conversations} conversations to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
