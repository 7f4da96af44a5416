"""`run_mindformer.py --run_mode predict` end to end on a tiny checkpoint, checked against transformers.

A tiny random HF DeepSeek-V3 checkpoint (release layout, MTP layers included, which prediction drops) and a
word-level tokenizer.json (built with the `tokenizers` library, DeepSeek-V3's BOS/EOS spellings) go in; the
results file is read back. Greedy completions must equal transformers' greedy `generate` of the same prompts
(encoded independently with `tokenizers`), the text must be that library's decoding of the tokens, and the
sampled tokens' log-probs must equal log_softmax(logits / T) that the transformers model gives for them.
"""
import json
import sys

import numpy as np
import pytest
import yaml

import mindspore as ms

from conftest import PROJECT_ROOT, require_reference
from mindpretrain.generation import predict
from mindpretrain.validation import ConfigError

if str(PROJECT_ROOT) not in sys.path:   # run_mindformer.py lives at the repo root
    sys.path.insert(0, str(PROJECT_ROOT))
import run_mindformer  # noqa: E402

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WORDS = 400
PROMPTS = ["w1 w2 w3", "w17", "w5 w250 w33 w8 w120 w9", "w300 w301"]


@pytest.fixture(scope="module", autouse=True)
def pynative_cpu():
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, checkpoint dir, tokenizer.json path, the `tokenizers` Tokenizer)."""
    require_reference("torch")
    require_reference("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hf_reference import build_tiny_hf_deepseek_v3

    hf, hf_dir = build_tiny_hf_deepseek_v3(tmp_path_factory.mktemp("ckpt"))
    vocab = {BOS: 0, EOS: 1, "<unk>": 2}
    vocab.update({f"w{index}": index + 3 for index in range(WORDS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([BOS, EOS])
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    return hf, hf_dir, str(folder / "tokenizer.json"), tokenizer


def write_yaml(path, tokenizer_json, seed=3, **generation):
    config = {"seed": seed, "run_mode": "predict", "use_parallel": True,   # MindFormers' predict YAMLs say True
              "context": {"mode": 1, "device_target": "CPU"},
              "model": {"model_config": {"type": "DeepseekV3Config", "use_past": True, **generation},
                        "arch": {"type": "DeepseekV3ForCausalLM"}},
              "processor": {"return_tensors": "ms",
                            "tokenizer": {"type": "LlamaTokenizerFast", "tokenizer_file": tokenizer_json,
                                          "vocab_file": tokenizer_json, "bos_token": BOS, "eos_token": EOS}}}
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return str(path)


def run(tmp_path, yaml_path, hf_dir, *extra, output="out"):
    argv = ["--register_path", str(PROJECT_ROOT / "research" / "deepseek3"), "--config", yaml_path,
            "--load_checkpoint", hf_dir, "--output_dir", str(tmp_path / output), *extra]
    return run_mindformer.main(argv)


def read_results(tmp_path, output="out"):
    with open(tmp_path / output / predict.RESULTS_FILE, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def hf_ids(tokenizer, prompt):
    return [0] + tokenizer.encode(prompt, add_special_tokens=False).ids


def test_greedy_prompts_file_end_to_end(tiny, tmp_path, capsys):
    import torch

    hf, hf_dir, tokenizer_json, tokenizer = tiny
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:3]) + "\n\n")
    yaml_path = write_yaml(tmp_path / "predict.yaml", tokenizer_json, do_sample=False, max_decode_length=12,
                           top_k=1, top_p=1, repetition_penalty=1)
    assert run(tmp_path, yaml_path, hf_dir, "--predict_data", str(prompts_file), "--predict_batch_size", "2") == 0
    records = read_results(tmp_path)
    assert [record["prompt"] for record in records] == PROMPTS[:3]
    stdout = capsys.readouterr().out
    batches = [PROMPTS[:2], PROMPTS[2:3]]                 # max_decode_length counts the batch's longest prompt
    for record, prompt in zip(records, PROMPTS[:3]):
        ids = hf_ids(tokenizer, prompt)
        longest = max(len(hf_ids(tokenizer, p)) for p in next(batch for batch in batches if prompt in batch))
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12 - longest, eos_token_id=1,
                              pad_token_id=1, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        expected = out[0, len(ids):].tolist()
        expected = expected[:expected.index(1) + 1] if 1 in expected else expected
        assert record["tokens"] == expected
        assert record["finish_reason"] == ("stop" if expected[-1] == 1 else "length")
        assert record["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert record["completion"] in stdout
        assert len(record["logprobs"]) == len(expected)


def _recomputed_logprobs(hf, tokenizer, record, temperature):
    import torch

    ids = hf_ids(tokenizer, record["prompt"])
    sequence = torch.tensor([ids + record["tokens"]])
    with torch.no_grad():
        logits = hf(input_ids=sequence, use_cache=False).logits[0].float()
    log_probs = torch.log_softmax(logits / temperature, -1)
    positions = range(len(ids) - 1, len(ids) - 1 + len(record["tokens"]))
    return [log_probs[position, token].item() for position, token in zip(positions, record["tokens"])]


def test_sampling_is_seeded_and_logprobs_match_transformers(tiny, tmp_path):
    hf, hf_dir, tokenizer_json, tokenizer = tiny
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(line) + "\n" for line in
                                    [{"prompt": PROMPTS[0]}, {"text": PROMPTS[1]}, PROMPTS[3]]))
    generation = dict(do_sample=True, temperature=1.5, top_k=40, top_p=0.95, max_new_tokens=8, eos_token_id=[])
    yaml_path = write_yaml(tmp_path / "predict.yaml", tokenizer_json, **generation)
    tokens = {}
    for name, seed in (("first", "5"), ("other", "6")):
        assert run(tmp_path, yaml_path, hf_dir, "--predict_data", str(prompts_file), "--seed", seed,
                   output=name) == 0
        tokens[name] = [record["tokens"] for record in read_results(tmp_path, name)]
    assert tokens["first"] != tokens["other"]
    records = read_results(tmp_path, "first")
    assert [record["prompt"] for record in records] == [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    # the same seed again, through the library call the run mode makes: the same tokens
    run_config = yaml.safe_load(open(yaml_path, encoding="utf-8"))
    run_config.update(seed=5, load_checkpoint=hf_dir, output_dir=str(tmp_path / "again"))
    again = predict.run_predict(run_config, [str(prompts_file)])
    assert [record["tokens"] for record in again] == tokens["first"]
    for record in records:
        assert len(record["tokens"]) == 8 and record["finish_reason"] == "length"
        reference = _recomputed_logprobs(hf, tokenizer, record, 1.5)
        np.testing.assert_allclose(record["logprobs"], reference, atol=1e-4)


def test_user_errors_end_with_one_line_and_no_results(tiny, tmp_path, capsys):
    _, hf_dir, tokenizer_json, _ = tiny
    yaml_path = write_yaml(tmp_path / "predict.yaml", tokenizer_json, max_new_tokens=2)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "w1"}\nnot json\n')
    cases = [
        (["--predict_data", str(bad_jsonl)], "line 2"),
        (["--predict_data", "w1", "--predict_batch_size", "0"], "predict_batch_size"),
        (["--predict_data", "w1", "--tokenizer", str(tmp_path / "missing.json")], "--tokenizer"),
        ([], "predict_data"),
    ]
    for extra, needle in cases:
        assert run(tmp_path, yaml_path, hf_dir, *extra, output="errors") == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("run_mindformer.py: error: ") and needle in error
        assert not (tmp_path / "errors" / predict.RESULTS_FILE).exists()
    no_room = write_yaml(tmp_path / "short.yaml", tokenizer_json, max_decode_length=3)
    assert run(tmp_path, no_room, hf_dir, "--predict_data", PROMPTS[2], output="errors") == 1
    assert "max_decode_length" in capsys.readouterr().err
    assert not (tmp_path / "errors" / predict.RESULTS_FILE).exists()


def test_predict_flags_need_predict_mode(tiny, tmp_path, capsys):
    _, hf_dir, tokenizer_json, _ = tiny
    yaml_path = write_yaml(tmp_path / "predict.yaml", tokenizer_json)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, yaml_path, hf_dir, "--run_mode", "train", "--predict_data", "w1")
    assert stopped.value.code == 2 and "--run_mode predict" in capsys.readouterr().err
    evaluate = tmp_path / "eval.yaml"
    evaluate.write_text(f"base_config: {yaml_path}\nrun_mode: eval\n")
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, str(evaluate), hf_dir)
    assert stopped.value.code == 2 and "run_mode ('eval') must be one of train, finetune, predict" in \
        capsys.readouterr().err


def test_prompt_sources(tmp_path):
    assert predict.read_prompts("one\\ntwo") == ["one\ntwo"]
    assert predict.read_prompts(["a", "b c"]) == ["a", "b c"]
    text = tmp_path / "p.txt"
    text.write_text("first\n\n  \nsecond line\n")
    assert predict.read_prompts([str(text)]) == ["first", "second line"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('"plain"\n{"prompt": "x"}\n\n{"text": "y"}\n')
    assert predict.read_prompts(str(lines)) == ["plain", "x", "y"]
    lines.write_text('{"completion": "x"}\n')
    with pytest.raises(ConfigError, match="p.jsonl:1"):
        predict.read_prompts(str(lines))
    with pytest.raises(ConfigError, match="predict_data"):
        predict.read_prompts(None)


def test_length_keys_follow_mindformers():
    """max_new_tokens wins; max_decode_length (alias max_length) counts the prompt, as MindFormers' max_length."""
    assert predict.max_new_tokens({"max_new_tokens": 5, "max_decode_length": 100}, 7) == 5
    assert predict.max_new_tokens({"max_decode_length": 20}, 7) == 13
    assert predict.max_new_tokens({"max_length": 9}, 7) == 2
    assert predict.max_new_tokens({}, 7) == predict.DEFAULT_MAX_NEW_TOKENS
    with pytest.raises(ConfigError, match="max_decode_length"):
        predict.max_new_tokens({"max_decode_length": 7}, 7)
