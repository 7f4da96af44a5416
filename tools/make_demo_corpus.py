"""Write a small real-text corpus in WikiText format, without downloading anything.

The text is the Python documentation's help topics that ship with every CPython
(`pydoc_data.topics`), about 80 articles and 0.5 MB, laid out like wiki.*.tokens so the WikiText
preprocessing path runs unchanged on a fresh machine:

     = The "assert" statement =          <- one article per help topic
                                         <- blank lines hold one space, as in the real files
     Assert statements are a convenient way to insert debugging assertions into a program:
     = = Section = =                     <- the topic's own section headings, one level deeper

Each paragraph of a topic becomes one line, as WikiText stores one paragraph per line; code
examples are flattened into their paragraph's line.

    python tools/make_demo_corpus.py --output data/demo.txt
"""
import argparse
import re
import sys

from pydoc_data.topics import topics

from mindpretrain.utils.atomic_files import atomic_write

# reST underline characters of the help topics, by heading depth: "*" is the topic's title.
_UNDERLINE_LEVELS = {"*": 1, "=": 2, "-": 3, "~": 4}
_UNDERLINE = re.compile(r"([*=\-~])\1*")


def wikitext_heading(title, level):
    marks = " ".join("=" * level)
    return f" {marks} {title} {marks} \n"


def topic_lines(text):
    """The WikiText lines of one help topic: paragraphs, and headings with a blank line on each side."""
    lines = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        block_lines = block.splitlines()
        heading = None
        if len(block_lines) >= 2:
            underline, title = block_lines[-1].strip(), block_lines[-2].strip()
            if _UNDERLINE.fullmatch(underline) and len(underline) == len(title):
                heading = wikitext_heading(title, _UNDERLINE_LEVELS[underline[0]])
                block_lines = block_lines[:-2]
        words = " ".join(block_lines).split()
        if words:
            lines.append(f" {' '.join(words)} \n")
        if heading:
            lines.extend((" \n", heading, " \n"))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="make_demo_corpus.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="WikiText file to write")
    parser.add_argument("--max-articles", type=int, default=None,
                        help=f"write at most this many articles (default: all {len(topics)})")
    args = parser.parse_args(argv)
    if args.max_articles is not None and args.max_articles < 1:
        parser.error(f"--max-articles must be at least 1, got {args.max_articles}")
    names = sorted(topics)[:args.max_articles]
    size = 0
    try:
        with atomic_write(args.output, "wb") as handle:
            for number, name in enumerate(names):
                # Articles are separated by one more blank line, as in the real files.
                data = "".join([" \n"] * (number > 0) + topic_lines(topics[name])).encode("utf-8")
                handle.write(data)
                size += len(data)
    except OSError as error:
        print(f"{parser.prog}: error: {args.output}: cannot write ({error.strerror or error})", file=sys.stderr)
        return 1
    print(f"wrote {len(names)} articles ({size:,} bytes) of Python help topics to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
