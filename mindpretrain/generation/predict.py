"""`run_mindformer.py --run_mode predict`: prompts in, sampled text out (stdout and a JSONL file).

    python run_mindformer.py --register_path research/deepseek3 --config predict.yaml --run_mode predict \\
        --load_checkpoint DIR --predict_data "first prompt" "second prompt"      # or a .txt / .jsonl file

What is read, with MindFormers' names:
* prompts: `--predict_data`, one or more strings; a single existing file is read instead, one prompt per line
  (`.jsonl`: one JSON object per line with a "prompt" or "text" string, or a JSON string). A literal `\\n` in a
  string is a newline, as in MindFormers. `--predict_batch_size` (or the YAML's `predict_batch_size`, default 8)
  prompts are decoded together.
* model: `--load_checkpoint`, an HF directory, a native weights directory or a training checkpoint; the model
  is the one the checkpoint's own config (config.json / config.yaml) describes, run in float32 without its MTP
  layers (`load_inference_model`). The YAML's `model.model_config` supplies only the generation keys below.
* tokenizer: `--tokenizer`, else the YAML's `processor.tokenizer.tokenizer_file` / `vocab_file`, else the
  checkpoint's tokenizer.json. A tokenizer.json (or a SentencePiece `.model`) is read by
  `mindpretrain.data.tokenizer`; BOS is prepended (`processor.tokenizer.add_bos_token: false` turns it off), and
  special tokens are left out of the decoded text.
* generation keys of `model.model_config` (MindFormers' GenerationConfig names): `do_sample`, `top_k`, `top_p`,
  `temperature`, `repetition_penalty`, `max_new_tokens`, else `max_decode_length` / `max_length` (prompt plus new
  tokens, counted on the batch's longest prompt as MindFormers does), else 32 new tokens; `eos_token_id` (an id
  or a list; default: the checkpoint's and the tokenizer's EOS); the top-level `seed` seeds sampling.

Out: every prompt and its completion on stdout, and `<output_dir>/predict_results.jsonl` (written whole or not at
all) with prompt, completion, tokens, logprobs and finish_reason per line.
"""
import json
import os
import time

from mindpretrain.generation.sampling import SamplingParams, generate
from mindpretrain.utils.atomic_files import atomic_write
from mindpretrain.utils.logging import get_logger
from mindpretrain.validation import ConfigError, require

logger = get_logger("predict")

RESULTS_FILE = "predict_results.jsonl"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 32
# The model runs in float32 without recompute, whatever the checkpoint was trained with (tools/logits.py too).
INFERENCE_FIELDS = {"compute_dtype": "float32", "param_init_type": "float32", "layernorm_compute_type": "float32",
                    "softmax_compute_type": "float32", "recompute": False}
GENERATION_KEYS = ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty", "max_new_tokens",
                   "max_decode_length", "max_length", "eos_token_id")


# ----- prompts ---------------------------------------------------------------------------------------------------

def read_prompts(predict_data):
    """`--predict_data` (a string, a list of strings, or one path of a .txt / .jsonl file) -> [prompt]."""
    require(predict_data not in (None, "", []), "predict_data", predict_data,
            "must give the prompts (--predict_data TEXT [TEXT ...] or a .txt / .jsonl file)")
    items = [predict_data] if isinstance(predict_data, str) else list(predict_data)
    if len(items) == 1 and os.path.isfile(items[0]):
        return _prompts_from_file(items[0])
    require(all(isinstance(item, str) and item for item in items), "predict_data", items,
            "must be non-empty strings")
    return [item.replace("\\n", "\n") for item in items]


def _prompts_from_file(path):
    with open(path, "r", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if path.endswith(".jsonl"):
        prompts = [_jsonl_prompt(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    else:
        prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    require(prompts, "predict_data", path, "holds no prompt (empty lines are skipped)")
    return prompts


def _jsonl_prompt(path, number, line):
    try:
        record = json.loads(line)
    except ValueError as error:
        raise ConfigError(f"predict_data ({path!r}) line {number} is not JSON ({error})") from None
    prompt = record if isinstance(record, str) else (
        (record.get("prompt", record.get("text")) if isinstance(record, dict) else None))
    require(isinstance(prompt, str) and prompt, "predict_data", f"{path}:{number}",
            'must hold a JSON string or an object with a non-empty "prompt" (or "text") string')
    return prompt


# ----- tokenizer -------------------------------------------------------------------------------------------------

def tokenizer_path(run_config, cli_path, checkpoint):
    """--tokenizer, else processor.tokenizer.tokenizer_file / vocab_file, else <checkpoint>/tokenizer.json."""
    section = ((run_config.get("processor") or {}).get("tokenizer") or {})
    for key, value in (("--tokenizer", cli_path), ("processor.tokenizer.tokenizer_file", section.get("tokenizer_file")),
                       ("processor.tokenizer.vocab_file", section.get("vocab_file"))):
        if value:
            require(os.path.exists(value), key, value, "does not exist")
            return value
    fallback = os.path.join(checkpoint, "tokenizer.json")
    require(os.path.isfile(fallback), "processor.tokenizer.tokenizer_file", None,
            f"is not set and {checkpoint} has no tokenizer.json: pass --tokenizer PATH")
    return fallback


def load_prompt_tokenizer(path):
    from mindpretrain.data.tokenizer import load_tokenizer

    return load_tokenizer("SentencePiece" if str(path).endswith(".model") else "HFTokenizer", path)


def decode(tokenizer, ids):
    """Text of `ids` without special tokens."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def encode_prompts(tokenizer, prompts, add_bos=True):
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    encoded = [bos + list(tokenizer.encode(prompt)) for prompt in prompts]
    empty = [index for index, ids in enumerate(encoded) if not ids]
    require(not empty, "predict_data", [prompts[index] for index in empty], "encode to no token")
    return encoded


# ----- generation settings ---------------------------------------------------------------------------------------

def generation_section(run_config):
    """The generation keys of the YAML's `model.model_config` (MindFormers keeps them there)."""
    section = ((run_config.get("model") or {}).get("model_config") or {})
    return {key: section[key] for key in GENERATION_KEYS if key in section and section[key] is not None}


def eos_ids(section, model_config, tokenizer):
    """`eos_token_id` of the YAML (an id or a list), else the checkpoint's and the tokenizer's EOS."""
    value = section.get("eos_token_id")
    if value is None:
        value = [getattr(model_config, "eos_token_id", None), getattr(tokenizer, "eod_id", None)]
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(sorted({int(token) for token in values if token is not None}))


def max_new_tokens(section, longest_prompt):
    """`max_new_tokens`, else `max_decode_length` / `max_length` minus the batch's longest prompt, else 32."""
    if "max_new_tokens" in section:
        return section["max_new_tokens"]
    for key in ("max_decode_length", "max_length"):
        if key in section:
            total = section[key]
            require(isinstance(total, int) and total > longest_prompt, f"model.model_config.{key}", total,
                    f"counts the prompt too and must exceed the longest prompt of the batch ({longest_prompt} "
                    "tokens); raise it or set max_new_tokens")
            return total - longest_prompt
    return DEFAULT_MAX_NEW_TOKENS


def sampling_params(section, new_tokens, eos, seed):
    """SamplingParams from the YAML's generation keys (MindFormers' defaults for the others)."""
    options = {key: section[key] for key in ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty")
               if key in section}
    return SamplingParams(max_new_tokens=new_tokens, eos_token_ids=eos, seed=seed, **options)


def batches(items, size):
    return [items[start:start + size] for start in range(0, len(items), size)]


# ----- model -----------------------------------------------------------------------------------------------------

def load_inference_model(checkpoint, seq_length):
    """(spec, model config, model) of a checkpoint directory (HF, native weights or training checkpoint), built
    from the checkpoint's own config, float32, RoPE tables for `seq_length` positions, without MTP layers."""
    from mindpretrain import registry
    from mindpretrain.checkpoint.conversion import load_native_config, spec_of_native

    spec = spec_of_native(checkpoint)
    model_config = load_native_config(checkpoint, spec, seq_length=max(int(seq_length), 1), **INFERENCE_FIELDS)
    if spec.without_mtp is not None:
        model_config = spec.without_mtp(model_config)
    model = registry.get("model", spec.model_class)(model_config)
    spec.load_hf_weights(model, checkpoint, allow_missing_mtp=True, drop_mtp=spec.without_mtp is not None)
    model.set_train(False)
    return spec, model_config, model


# ----- the run ---------------------------------------------------------------------------------------------------

def run_predict(run_config, predict_data, batch_size=None, tokenizer=None):
    """Generate for every prompt; print and write `<output_dir>/predict_results.jsonl`. Returns the records."""
    checkpoint = run_config.get("load_checkpoint")
    require(bool(checkpoint), "load_checkpoint", checkpoint, "must name the checkpoint to predict with")
    require(os.path.isdir(checkpoint), "load_checkpoint", checkpoint, "is not a directory")
    if batch_size is None:
        batch_size = run_config.get("predict_batch_size", DEFAULT_BATCH_SIZE)
    require(isinstance(batch_size, int) and batch_size >= 1, "predict_batch_size", batch_size,
            "must be an integer >= 1")
    prompts = read_prompts(predict_data)
    text_tokenizer = load_prompt_tokenizer(tokenizer_path(run_config, tokenizer, checkpoint))
    add_bos = ((run_config.get("processor") or {}).get("tokenizer") or {}).get("add_bos_token", True)
    encoded = encode_prompts(text_tokenizer, prompts, add_bos=bool(add_bos))
    section = generation_section(run_config)
    plan = [(chunk, max_new_tokens(section, max(len(ids) for ids in chunk))) for chunk in batches(encoded, batch_size)]
    longest = max(max(len(ids) for ids in chunk) + new - 1 for chunk, new in plan)
    spec, model_config, model = load_inference_model(checkpoint, longest)
    require(spec.cached_decoder is not None, "load_checkpoint", checkpoint,
            f"holds a {spec.name} model, whose plugin provides no cached decoder for generation")
    require(max(max(ids) for ids in encoded) < model_config.vocab_size, "processor.tokenizer", text_tokenizer.path,
            f"yields token ids beyond the model's vocabulary ({model_config.vocab_size})")
    eos = eos_ids(section, model_config, text_tokenizer)
    seed = int(run_config.get("seed", 0) or 0)
    completions, started = [], time.time()
    for index, (chunk, new_tokens) in enumerate(plan):
        params = sampling_params(section, new_tokens, eos, (seed, index))
        decoder = spec.cached_decoder(model, len(chunk), max(len(ids) for ids in chunk) + new_tokens - 1)
        completions += generate(decoder, chunk, params, pad_id=text_tokenizer.pad_id or 0)
    elapsed = time.time() - started
    records = [_record(prompt, completion, text_tokenizer) for prompt, completion in zip(prompts, completions)]
    path = write_results(run_config.get("output_dir") or "./output", records)
    generated = sum(len(completion.tokens) for completion in completions)
    for index, record in enumerate(records):
        print(f"[{index}] ({record['finish_reason']}, {len(record['tokens'])} tokens) {record['prompt']}"
              f"{record['completion']}", flush=True)
    logger.info("generated %d tokens for %d prompts in %.1f s (%.1f tokens/s); results in %s", generated,
                len(prompts), elapsed, generated / max(elapsed, 1e-9), path)
    return records


def _record(prompt, completion, tokenizer):
    return {"prompt": prompt, "completion": decode(tokenizer, completion.tokens), "tokens": completion.tokens,
            "logprobs": completion.logprobs, "finish_reason": completion.finish_reason}


def write_results(output_dir, records):
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RESULTS_FILE)
    with atomic_write(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path
