"""wikitext_to_bin.py in MindFormers' paragraph mode against a re-derivation of MindFormers' tool.

The reference below is written from MindFormers' research/deepseek3/wikitext_to_bin.py (commit
1d7cbefcb9616b4d731422757f30e0366293206a): its cleaning steps one by one, its paragraph filter, its
tokenizer (transformers' LlamaTokenizerFast with add_bos_token, the class MindFormers ported), its
stitch and pad loops, and the Megatron index it writes, parsed here with `struct`. Nothing of
mindpretrain is used to compute the expected bytes.
"""
import re
import struct

import numpy as np
import pytest

from conftest import require_reference, shared_path
from mindpretrain.data.wikitext import clean_wikitext
from research.deepseek3 import wikitext_to_bin

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# WikiText layout (lines padded with one space) with every artefact the cleaning handles, a quote left
# open across a paragraph break, headings of every depth, and a whitespace-only paragraph.
HANDMADE = (" \n = Lobsters = \n \n"
            " The lobster 's claws are 2 @-@ 3 @,@ 000 @.@ 5 m long : yes ; no . Done ! Why ? N times , \n"
            " The Jones ' house /' 5/ stood at 5 ° C ( in brackets ) [ square ] { curly } \" quoted \" "
            "' single ' end . \n \n = = Life = = \n \n = = = Young = = = \n \n = = = = Eggs = = = = \n \n"
            " An \" unpaired quote \n \n closes in the next paragraph \" here . \n \n"
            " \t \n \n Last words .\n")


def reference_clean(text):
    """MindFormers' clean_wikitext, step by step as written there (no ' .' rule in that version)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for old, new in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                     (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(old, new)
    for opening, closing in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'")):
        o, c = re.escape(opening), re.escape(closing)
        text = re.sub(o + r"\s*([^" + c + r"]*?)\s*" + c, lambda m, a=opening, b=closing: a + m.group(1) + b, text)
    for old, new in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" ° ", "°"), (" \n", "\n"),
                     ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(old, new)
    return text


def reference_paragraphs(path):
    with open(path, "r", encoding="utf-8") as handle:
        pieces = reference_clean(handle.read()).split("\n\n")
    return [piece for piece in pieces if piece and piece.strip().startswith("=") is False]


def reference_samples(token_lists, mode, length, eos, pad):
    """MindFormers' stitch (full chunks of the concatenation) or pad (right-padded, truncated) loop."""
    if mode == "pad":
        return [(ids + [pad] * (length - len(ids)))[:length] for ids in token_lists]
    content = [token for ids in token_lists for token in ids]
    chunks = [content[start:start + length] for start in range(0, len(content), length)]
    return [chunk for chunk in chunks if len(chunk) == length]


def read_megatron(prefix):
    """(tokens per document, sequence lengths, pointers, document indices) of an int32 MMIDIDX dataset."""
    index = open(f"{prefix}.idx", "rb").read()
    magic, version, code, sequences, documents = struct.unpack_from("<9sQBQQ", index)
    assert (magic, version, code) == (b"MMIDIDX\x00\x00", 1, 4)  # code 4: int32, as MindFormers writes
    offset = struct.calcsize("<9sQBQQ")
    lengths = np.frombuffer(index, np.int32, sequences, offset).tolist()
    pointers = np.frombuffer(index, np.int64, sequences, offset + 4 * sequences).tolist()
    doc_index = np.frombuffer(index, np.int64, documents, offset + 12 * sequences).tolist()
    assert len(index) == offset + 12 * sequences + 8 * documents
    tokens = np.fromfile(f"{prefix}.bin", dtype="<i4")
    return tokens, lengths, pointers, doc_index


@pytest.fixture(scope="module")
def tokenizer_json():
    return shared_path("data", "deepseek-v3-tokenizer", "tokenizer.json")


@pytest.fixture(scope="module")
def llama_fast(tokenizer_json):
    transformers = require_reference("transformers")
    # As MindFormers' tokenizer_add_tokens builds it; add_bos_token=True is that class's default there.
    return transformers.LlamaTokenizerFast(tokenizer_file=str(tokenizer_json), unk_token=None, bos_token=BOS,
                                           eos_token=EOS, add_bos_token=True)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    path = tmp_path_factory.mktemp("handmade") / "wiki.tokens"
    path.write_text(HANDMADE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenized(llama_fast):
    """Paragraph token lists of an input file by the reference tokenizer, computed once per file."""
    cache = {}

    def tokenize(path):
        if path not in cache:
            cache[path] = llama_fast(reference_paragraphs(path))["input_ids"]
        return cache[path]
    return tokenize


def run_tool(path, tokenizer_json, out, seq_length, extra=()):
    argv = ["--input", str(path), "--output-prefix", str(out / "wiki"), "--vocab-file", str(tokenizer_json),
            "--seq-length", str(seq_length), *extra]
    assert wikitext_to_bin.main(argv) == 0
    return out / "wiki_text_document"


def check_against_reference(prefix, token_lists, mode, length, append_eod, llama_fast):
    eos = llama_fast.eos_token_id
    if append_eod:
        token_lists = [ids + [eos] for ids in token_lists]
    expected = reference_samples(token_lists, mode, length, eos, pad=eos)
    tokens, lengths, pointers, doc_index = read_megatron(prefix)
    assert len(expected) > 0
    assert tokens.tolist() == [token for sample in expected for token in sample]
    assert lengths == [length] * len(expected)
    assert pointers == [4 * length * number for number in range(len(expected))]
    assert doc_index == list(range(len(expected) + 1))


CASES = [  # (flags, mode, seq_length, append_eod); the first uses no --pad-or-stitch: stitch is the default
    ((), "stitch", 4096, False),
    (("--pad-or-stitch", "pad"), "pad", 128, False),
    (("--pad-or-stitch", "stitch", "--append-eod"), "stitch", 4096, True),
    (("--pad-or-stitch", "pad", "--append-eod"), "pad", 128, True),
]


@pytest.mark.parametrize("flags, mode, seq_length, append_eod", CASES, ids=["stitch", "pad", "stitch-eod", "pad-eod"])
def test_wikitext2_valid_matches_mindformers(flags, mode, seq_length, append_eod, tokenizer_json, llama_fast,
                                             tokenized, tmp_path):
    valid = shared_path("data", "wikitext-2", "valid.txt")
    prefix = run_tool(valid, tokenizer_json, tmp_path, seq_length, ("--worker", "1", *flags))
    check_against_reference(prefix, tokenized(valid), mode, seq_length + 1, append_eod, llama_fast)


@pytest.mark.parametrize("flags, mode, seq_length, append_eod", [
    ((), "stitch", 8, False), (("--pad-or-stitch", "pad"), "pad", 8, False),
    (("--append-eod",), "stitch", 8, True), (("--pad-or-stitch", "pad", "--append-eod"), "pad", 40, True),
], ids=["stitch", "pad", "stitch-eod", "pad-eod"])
def test_handmade_artefacts_match_mindformers(flags, mode, seq_length, append_eod, handmade, tokenizer_json,
                                              llama_fast, tokenized, tmp_path):
    prefix = run_tool(handmade, tokenizer_json, tmp_path, seq_length, flags)
    check_against_reference(prefix, tokenized(handmade), mode, seq_length + 1, append_eod, llama_fast)


def test_handmade_paragraphs_as_mindformers_sees_them(handmade):
    """Known answers: headings dropped, apostrophes paired across sentences by the quote rule, a quote
    pair keeping its inner blank line (so the paragraph still splits), a blank paragraph kept."""
    assert reference_paragraphs(handmade) == [
        "The lobster's claws are 2-3,000.5 m long: yes; no. Done! Why? 1 times,\n"
        "The Jones' house /'[0-9]/ stood at 5°C (in brackets) [square] {curly} \"quoted\"' single ' end.",
        'An "unpaired quote',
        'closes in the next paragraph" here.',
        "\t",
        "Last words .\n",
    ]


@pytest.mark.parametrize("raw, cleaned", [
    (" 2 @-@ 3 @,@ 000 @.@ 5 ", " 2-3,000.5 "),
    ("a : b ; c . d ! e ? f , g", "a: b; c. d! e? f, g"),
    ("x ( a b ) [ c ] { d } y", "x (a b) [c] {d} y"),
    ('say " hi there " now', 'say "hi there" now'),
    ("the Jones ' house", "the Jones' house"),
    ("= = = = A = = = =\n= = = B = = =\n= = C = =", "==== A ====\n=== B ===\n== C =="),
    ("5 ° C and N times", "5°C and 1 times"),
    ("end .\n next", "end .\nnext"),  # no " ." rule in the version the guide ran
    ("a /' 5/ b", "a /'[0-9]/ b"),
    ('" open\n \n close "', '"open\n\nclose"'),  # the pairing crosses the blank line
    ('a " \n \n " b', 'a "" b'),  # ... and can swallow a paragraph break
])
def test_cleaning_known_answers(raw, cleaned):
    assert clean_wikitext(raw) == cleaned
    assert reference_clean(raw) == cleaned


@pytest.mark.parametrize("name", ["valid.txt", "test.txt"])
def test_cleaning_equals_reference_on_wikitext2(name):
    text = shared_path("data", "wikitext-2", name).read_text(encoding="utf-8")
    assert clean_wikitext(text) == reference_clean(text)


def test_reference_tokenizer_is_bos_plus_plain_tokens(llama_fast, tokenizer_json, tokenized, handmade):
    """BOS comes from LlamaTokenizerFast's template; the tokenizer.json's own post-processor adds none."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_file(str(tokenizer_json))
    assert plain.encode("Hello world").ids == plain.encode("Hello world", add_special_tokens=False).ids
    assert llama_fast.bos_token_id == plain.token_to_id(BOS) == 0
    paragraphs = reference_paragraphs(handmade)
    assert tokenized(handmade) == [[0] + plain.encode(text, add_special_tokens=False).ids for text in paragraphs]


def test_two_workers_write_the_same_bytes(tokenizer_json, tmp_path):
    valid = shared_path("data", "wikitext-2", "valid.txt")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_tool(valid, tokenizer_json, tmp_path / "one", 512, ("--workers", "1", "--append-eod"))
    two = run_tool(valid, tokenizer_json, tmp_path / "two", 512, ("--workers", "2", "--append-eod"))
    for suffix in (".bin", ".idx"):
        assert one.with_name(one.name + suffix).read_bytes() == two.with_name(two.name + suffix).read_bytes()


def test_corpus_smaller_than_one_sample_writes_nothing(handmade, tokenizer_json, tmp_path, capsys):
    argv = ["--input", str(handmade), "--output-prefix", str(tmp_path / "w"), "--vocab-file", str(tokenizer_json),
            "--seq-length", "100000"]
    assert wikitext_to_bin.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than one sample of 100001 tokens" in err[0] and "nothing was written" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_pad_or_stitch_is_refused_in_article_mode(handmade, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        wikitext_to_bin.main(["--input", str(handmade), "--output-prefix", str(tmp_path / "w"),
                              "--document-unit", "article", "--pad-or-stitch", "pad"])
    assert exit_info.value.code == 2
    assert "--pad-or-stitch applies to --document-unit paragraph only" in capsys.readouterr().err
