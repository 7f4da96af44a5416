"""WikiText article splitting: on the real validation file, and on the edge cases it does not contain."""
import re

import pytest

from mindpretrain.data.wikitext import Article, WikiTextError, read_articles, split_articles, top_level_title

# Independent of the implementation: a raw top-level heading line as the released files write it.
RAW_TOP_HEADING = re.compile(r" = ([^=].*) = ")
RAW_ANY_HEADING = re.compile(r" (= )+[^=].*( =)+ ")


@pytest.fixture(scope="module")
def valid_lines(wikitext_valid):
    with open(wikitext_valid, encoding="utf-8", newline="") as handle:
        return handle.read().splitlines(keepends=True)


@pytest.fixture(scope="module")
def valid_articles(wikitext_valid):
    return list(read_articles(wikitext_valid))


def test_one_article_per_top_level_heading(valid_lines, valid_articles):
    titles = [match.group(1) for line in valid_lines if (match := RAW_TOP_HEADING.fullmatch(line.rstrip("\n")))]
    assert len(titles) == 60
    assert len(valid_articles) == len(titles)
    assert [article.title for article in valid_articles] == titles
    assert valid_articles[0].title == "Homarus gammarus"
    assert valid_articles[-1].title == "<unk> <unk>"


def test_article_starts_with_its_heading_and_keeps_subheadings(valid_articles):
    first = valid_articles[0].text.split("\n")
    assert first[0] == "= Homarus gammarus ="
    assert first[1].startswith("Homarus gammarus , known as the European lobster")
    assert "= = Description = =" in first and "= = Life cycle = =" in first
    assert "= Frank <unk> =" not in first  # the next article's heading
    m82 = next(article for article in valid_articles if article.title == "M @-@ 82 ( Michigan highway )")
    assert "= = = Previous designation = = =" in m82.text.split("\n")
    for article in valid_articles:
        assert [line for line in article.text.split("\n") if top_level_title(line)] == [article.text.split("\n")[0]]


def test_text_is_every_nonempty_line_stripped_in_order(valid_lines, valid_articles):
    nonempty = [line.strip() for line in valid_lines if line.strip()]
    lines = [line for article in valid_articles for line in article.text.split("\n")]
    assert lines == nonempty
    assert all(line and line == line.strip() for line in lines)  # empty lines dropped, padding removed
    assert sum(RAW_ANY_HEADING.fullmatch(line.rstrip("\n")) is not None for line in valid_lines) == sum(
        line.startswith("= ") and line.endswith(" =") for line in lines)
    assert "@-@" in valid_articles[0].text  # tokenization artefacts are kept verbatim


def test_byte_counts_add_up_to_the_file(wikitext_valid, valid_articles):
    assert sum(article.nbytes for article in valid_articles) == wikitext_valid.stat().st_size


@pytest.mark.parametrize("line, title", [
    (" = Homarus gammarus = \n", "Homarus gammarus"),
    ("= No padding =", "No padding"),
    (" = E = mc2 = \n", "E = mc2"),
    (" = = Description = = \n", None),
    (" = = = Previous designation = = = \n", None),
    (" = <unk> for the next round \n", None),  # a table key in test.txt, not a heading
    (" q = \n", None),
    (" == \n", None),
    (" = = \n", None),
    (" \n", None),
])
def test_top_level_title(line, title):
    assert top_level_title(line) == title


def test_text_before_the_first_heading_is_its_own_article():
    lines = [" \n", " Some preamble . \n", " \n", " = First = \n", " \n", " Body . \n"]
    assert list(split_articles(lines)) == [
        Article(None, "Some preamble .", len(" \n Some preamble . \n \n")),
        Article("First", "= First =\nBody .", len(" = First = \n \n Body . \n")),
    ]


def test_leading_blank_lines_belong_to_the_first_article():
    assert list(split_articles([" \n", " \n", " = A = \n", " a \n"])) == [Article("A", "= A =\na", 16)]


def test_file_without_final_newline(tmp_path):
    path = tmp_path / "wiki.tokens"
    path.write_bytes(" = A = \n a \n = = S = = \n s \n = B = \n last line".encode())
    assert [(a.title, a.text) for a in read_articles(path)] == [("A", "= A =\na\n= = S = =\ns"),
                                                                 ("B", "= B =\nlast line")]


def test_consecutive_headings_give_title_only_articles():
    articles = list(split_articles([" = A = \n", " = B = \n", " \n", " = C = \n", " c \n"]))
    assert [(a.title, a.text) for a in articles] == [("A", "= A ="), ("B", "= B ="), ("C", "= C =\nc")]


def test_windows_line_endings_and_non_ascii(tmp_path):
    path = tmp_path / "wiki.tokens"
    raw = " = Café = \r\n \r\n Crème brûlée – 5 @,@ 000 \r\n".encode("utf-8")
    path.write_bytes(raw)
    assert list(read_articles(path)) == [Article("Café", "= Café =\nCrème brûlée – 5 @,@ 000", len(raw))]


def test_blank_input_has_no_articles():
    assert list(split_articles([" \n", "\n", "   "])) == []


def test_reading_is_streaming():
    consumed = []

    def lines():
        for number, line in enumerate([" = A = \n", " a \n", " = B = \n", " b \n", " = C = \n"]):
            consumed.append(number)
            yield line

    articles = split_articles(lines())
    assert next(articles).title == "A"
    assert consumed == [0, 1, 2]  # stopped at the heading that ended article A


def test_unreadable_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.tokens"
    with pytest.raises(WikiTextError, match=re.escape(str(missing))):
        list(read_articles(missing))
    latin1 = tmp_path / "latin1.tokens"
    latin1.write_bytes(" = Caf\xe9 = \n".encode("latin-1"))
    with pytest.raises(WikiTextError, match=re.escape(str(latin1)) + ".*not UTF-8"):
        list(read_articles(latin1))
