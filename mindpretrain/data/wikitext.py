"""Read WikiText raw text (`wiki.*.tokens`, `wiki.*.raw`) as articles (ours) or as MindFormers' paragraphs.

Two readings of the same file, chosen by `wikitext_to_bin.py --document-unit`:

* `read_paragraphs` (`paragraph`, the default) is MindFormers' DeepSeek-V3 preprocessing
  (research/deepseek3/wikitext_to_bin.py): the whole file is cleaned of the corpus' tokenisation
  artefacts (`clean_wikitext`), split at blank lines, and every paragraph that does not start
  with `=` (a heading) is one document.
* `read_articles` (`article`) is this project's own reading, described below.

Articles
--------

WikiText has no document markers; the only article boundary is a top-level heading line. In the
released files every line is padded with one space on each side and empty lines are a lone space:

     = Homarus gammarus =          <- article heading: exactly one `=` on each side
                                   <- (a line holding one space)
     Homarus gammarus , known as the European lobster ...
     = = Description = =           <- subheading: stays inside the article
     = = = Previous designation = = =

So a line starts a new article when, stripped of surrounding whitespace, it reads `= Title =`
with a single `=` on each side (the title neither starts nor ends with `=`). Body lines that merely
contain `=`, such as ` = <unk> for the next round ` in a table key, are not headings.

The text of an article, which is what gets tokenized, is its heading line followed by its body
lines, each stripped of surrounding whitespace (the padding spaces and the newline), with
whitespace-only lines dropped, joined by "\\n" and without a trailing newline:

    "= Homarus gammarus =\\nHomarus gammarus , known as ...\\n= = Description = =\\n..."

Everything else is kept verbatim, including the heading markup, the subheading lines and the
tokenization artefacts of the corpus (` @-@ `, ` @,@ `, ` , `, `<unk>`): they are part of the
WikiText language-modelling benchmark as published. Non-empty lines before the first heading
form an article of their own, without a title.

Reading holds one article in memory at a time, so wiki.train.tokens of WikiText-103 (500 MB)
streams like the 1 MB validation file.

Paragraphs
----------
MindFormers cleans the file as one string, and its bracket and quote rules pair an opening mark
with the next closing one wherever it is, across lines and paragraphs (an unpaired `"` in one
article shifts the pairing of every later quote). The same output therefore needs the whole text
at once: `read_paragraphs` holds the file in memory (about three times its size while cleaning)
and then yields the paragraphs one at a time.
"""
import re
from typing import NamedTuple, Optional

_TOP_LEVEL_HEADING = re.compile(r"= (?!=)(.*[^=\s]) =")


class WikiTextError(ValueError):
    """A WikiText file that cannot be read; the message names the file and the problem."""


class Article(NamedTuple):
    title: Optional[str]  # None for the text before the first heading
    text: str
    nbytes: int  # UTF-8 bytes of the raw lines it came from, blank lines included


def top_level_title(line):
    """The title of a top-level heading line (` = Title = `), or None for any other line."""
    match = _TOP_LEVEL_HEADING.fullmatch(line.strip())
    return match.group(1) if match else None


def split_articles(lines):
    """Yield the articles of an iterable of raw lines (newlines may be attached or not).

    Every line's bytes are counted in some article (blank lines count towards the article they
    follow, leading blank lines towards the first one), so the `nbytes` of all articles add up to
    the size of the input unless it holds no text at all.
    """
    title, kept, nbytes = None, [], 0
    for line in lines:
        heading = top_level_title(line)
        if heading is not None and kept:
            yield Article(title, "\n".join(kept), nbytes)
            kept, nbytes = [], 0
        if heading is not None:
            title = heading
        nbytes += len(line.encode("utf-8"))
        stripped = line.strip()
        if stripped:
            kept.append(stripped)
    if kept:
        yield Article(title, "\n".join(kept), nbytes)


# MindFormers' clean_wikitext, in its order: (kind, pattern, replacement); "str" is str.replace, "re" re.sub.
# The first "re" rule is a literal no-op in practice (it matches "/' 5/" only, and writes "/'[0-9]/").
MINDFORMERS_CLEANING_RULES = (
    ("str", "s '", "s'"), ("re", r"/' [0-9]/", r"/'[0-9]/"),
    ("str", " @-@ ", "-"), ("str", " @,@ ", ","), ("str", " @.@ ", "."),
    ("str", " : ", ": "), ("str", " ; ", "; "), ("str", " . ", ". "), ("str", " ! ", "! "),
    ("str", " ? ", "? "), ("str", " , ", ", "),
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"), ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"), ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("str", "= = = =", "===="), ("str", "= = =", "==="), ("str", "= =", "=="),
    ("str", " \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), ("str", " \n", "\n"), ("str", "\n ", "\n"),
    ("str", " N ", " 1 "), ("str", " 's", "'s"),
)


def clean_wikitext(text):
    """MindFormers' cleaning of WikiText's tokenisation artefacts (` @-@ `, ` , `, `( x )`, `= =` ...)."""
    for kind, pattern, replacement in MINDFORMERS_CLEANING_RULES:
        text = text.replace(pattern, replacement) if kind == "str" else re.sub(pattern, replacement, text)
    return text


def split_paragraphs(text):
    """Yield `(paragraph, nbytes)` of cleaned text: pieces between blank lines ("\\n\\n"), except empty ones
    and headings (pieces starting with `=` after surrounding whitespace). Whitespace-only pieces are kept,
    as MindFormers keeps them. `nbytes` counts the piece and its separator, for throughput figures."""
    for paragraph in text.split("\n\n"):
        if paragraph and not paragraph.strip().startswith("="):
            yield paragraph, len(paragraph.encode("utf-8")) + 2


def read_paragraphs(path):
    """Yield MindFormers' paragraph documents of a WikiText file (UTF-8) as `(text, nbytes)`."""
    try:
        # Universal newlines, as MindFormers opens the file: "\r\n" reads as "\n".
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise WikiTextError(f"{path}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise WikiTextError(f"{path}: cannot read WikiText file ({error.strerror or error})") from None
    yield from split_paragraphs(clean_wikitext(text))


def read_articles(path):
    """Yield the articles of a WikiText file (UTF-8), one at a time."""
    try:
        # newline="" keeps "\r\n" as written, so byte counts match the file.
        with open(path, encoding="utf-8", newline="") as handle:
            yield from split_articles(handle)
    except UnicodeDecodeError as error:
        raise WikiTextError(f"{path}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise WikiTextError(f"{path}: cannot read WikiText file ({error.strerror or error})") from None
