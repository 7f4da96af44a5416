"""GRPO prompts: the `rl_config.data` jsonl files read into token ids once, and the order they are drawn in.

`load_prompts` reads every line of every file first, so a malformed line stops the run (naming `file:line`)
before anything is tokenized or computed. A prompt is a string or a list of chat messages; with
`apply_chat_template` and a chat template it is rendered as transformers' `apply_chat_template(...,
add_generation_prompt=True)` renders it (the template writes BOS; one is prepended only when it does not),
otherwise it is BOS + the tokens of the string. Prompts longer than `max_prompt_length` tokens are dropped
and counted, as verl's `filter_overlong_prompts` does.

`PromptSampler` deals prompt indices in epochs, a fresh permutation per epoch derived from (seed, epoch) alone,
so its whole future is fixed by `state()`: a resumed run draws exactly the batches the uninterrupted one would.
`rank_slice` gives each data-parallel rank a contiguous share of a batch, whole prompts (hence whole groups).
"""
import dataclasses
import json
import os
from typing import List, NamedTuple, Tuple

import numpy as np

from mindpretrain.utils.logging import get_logger
from mindpretrain.validation import ConfigError, require

logger = get_logger("rl")

DATA_KEY = "rl_config.data"
MESSAGE_FIELDS = ("role", "content")


class PromptRecord(NamedTuple):
    index: int        # position in the prompt set, after filtering
    ids: List[int]    # what the model sees, one BOS first
    text: str         # the rendered prompt
    label: str        # the ground truth handed to the grader
    source: str       # "file:line"


@dataclasses.dataclass(frozen=True)
class PromptSet:
    records: List[PromptRecord]
    filtered_overlong: int   # prompts dropped for exceeding max_prompt_length
    sources: Tuple[str, ...]  # the files read, in order

    def __len__(self):
        return len(self.records)


class _RawPrompt(NamedTuple):
    prompt: object   # a string or a validated list of {"role", "content"} messages
    label: str
    source: str


# --------------------------------------------------------------------------------------- reading the files


def _line_error(source, problem):
    return ConfigError(f"{DATA_KEY}.path: {source}: {problem}")


def _check_messages(messages, source, prompt_key):
    """A non-empty list of {"role": str, "content": str} dicts, else the line's error."""
    if not messages:
        raise _line_error(source, f"{prompt_key!r} is an empty message list")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"] \
                or not isinstance(message.get("content"), str):
            raise _line_error(source, f"{prompt_key!r} message {number} ({message!r:.80}) must be an object with a "
                                      "non-empty string 'role' and a string 'content'")
    return [{field: message[field] for field in MESSAGE_FIELDS} for message in messages]


def _check_prompt(record, source, prompt_key):
    if prompt_key not in record:
        raise _line_error(source, f"the prompt key {prompt_key!r} is missing (keys: {sorted(record)})")
    prompt = record[prompt_key]
    if isinstance(prompt, list):
        return _check_messages(prompt, source, prompt_key)
    if not isinstance(prompt, str) or not prompt:
        raise _line_error(source, f"{prompt_key!r} ({prompt!r:.80}) must be a non-empty string or a list of chat "
                                  "messages")
    return prompt


def _check_label(record, source, label_key):
    if label_key not in record:
        raise _line_error(source, f"the label key {label_key!r} is missing (keys: {sorted(record)})")
    label = record[label_key]
    is_number = isinstance(label, (int, float)) and not isinstance(label, bool)
    if not (is_number or (isinstance(label, str) and label)):
        raise _line_error(source, f"{label_key!r} ({label!r:.80}) must be a non-empty string or a number")
    return str(label)


def _parse_line(line, source, data_config):
    try:
        record = json.loads(line)
    except ValueError as error:
        raise _line_error(source, f"not JSON ({error})") from None
    if not isinstance(record, dict):
        raise _line_error(source, f"expected a JSON object, got {type(record).__name__}")
    return _RawPrompt(_check_prompt(record, source, data_config.prompt_key),
                      _check_label(record, source, data_config.label_key), source)


def _read_file(path, data_config):
    require(os.path.isfile(path), f"{DATA_KEY}.path", path, "is not a file (a jsonl file of prompts and labels)")
    prompts = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    prompts.append(_parse_line(line, f"{path}:{number}", data_config))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{DATA_KEY}.path ({path!r}) cannot be read: {error}") from None
    return prompts


# ------------------------------------------------------------------------------------------ tokenizing


class _TemplateRenderer:
    """The chat template with the generation prompt, as transformers' apply_chat_template renders it.

    ChatEncoder.render always passes add_generation_prompt=False (SFT renders whole conversations), so the
    template is compiled here in the same environment and given the special tokens ChatEncoder gives it.
    """

    def __init__(self, tokenizer, chat_template):
        import jinja2

        from mindpretrain.data.chat_template import ChatEncoder, ChatTemplate, ChatTemplateError, compile_template

        template = chat_template if isinstance(chat_template, ChatTemplate) else ChatTemplate(chat_template, "")
        try:
            self._variables = ChatEncoder(tokenizer, template).variables
            self._template = compile_template(template.text)
        except ChatTemplateError as error:
            raise ConfigError(f"{DATA_KEY}.apply_chat_template (True): {error}") from None
        self._template_error = jinja2.exceptions.TemplateError

    def render(self, messages, source):
        try:
            return self._template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                         **self._variables)
        except self._template_error as error:
            raise _line_error(source, f"the chat template refuses this prompt ({error})") from None


def _encode(tokenizer, raw, renderer):
    """(text, ids) of one prompt: rendered by the template when there is one, else BOS + the string's tokens."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if renderer is None:
        if not isinstance(raw.prompt, str):
            raise _line_error(raw.source, "the prompt is a message list, which needs a chat template "
                                          f"({DATA_KEY}.apply_chat_template: true and a tokenizer that has one)")
        return raw.prompt, bos + list(tokenizer.encode(raw.prompt))
    messages = [{"role": "user", "content": raw.prompt}] if isinstance(raw.prompt, str) else raw.prompt
    text = renderer.render(messages, raw.source)
    ids = list(tokenizer.encode(text))
    if bos and ids[:1] != bos:  # the template wrote no BOS: one is prepended, never a second
        ids = bos + ids
    return text, ids


def load_prompts(data_config, tokenizer, chat_template=None):
    """The PromptSet of `data_config.paths`: every line validated, then encoded and filtered by length.

    `chat_template` is a ChatTemplate (`load_chat_template`) or the template text; it is used only when
    `data_config.apply_chat_template` is true.
    """
    raw_prompts = []
    for path in data_config.paths:
        raw_prompts.extend(_read_file(path, data_config))
    use_template = data_config.apply_chat_template and chat_template is not None
    renderer = _TemplateRenderer(tokenizer, chat_template) if use_template else None
    records, overlong = [], 0
    for raw in raw_prompts:
        text, ids = _encode(tokenizer, raw, renderer)
        if len(ids) > data_config.max_prompt_length:
            overlong += 1
            continue
        records.append(PromptRecord(len(records), ids, text, raw.label, raw.source))
    if not records:
        raise ConfigError(f"{DATA_KEY}.path ({list(data_config.paths)!r}) leaves no prompt: {len(raw_prompts)} read, "
                          f"{overlong} longer than {DATA_KEY}.max_prompt_length ({data_config.max_prompt_length}) "
                          "tokens")
    if overlong:
        logger.warning("%d of %d prompts are longer than %s.max_prompt_length (%d tokens) and are left out",
                       overlong, len(raw_prompts), DATA_KEY, data_config.max_prompt_length)
    return PromptSet(records, overlong, tuple(data_config.paths))


# ------------------------------------------------------------------------------------------- the order


def _positive_int(value, key):
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value,
            "must be a positive integer")


class PromptSampler:
    """Batches of prompt indices, epoch after epoch; each epoch a permutation fixed by (seed, epoch).

    A batch may straddle an epoch boundary (the end of one epoch, then the start of the next), so every
    batch has exactly `prompts_per_step` indices and each epoch deals every index exactly once.
    """

    def __init__(self, num_prompts, prompts_per_step, seed, shuffle=True):
        _positive_int(num_prompts, "num_prompts")
        _positive_int(prompts_per_step, "rl_config.rollout.prompts_per_step")
        require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, f"{DATA_KEY}.seed", seed,
                "must be an integer >= 0")
        self.num_prompts, self.prompts_per_step = num_prompts, prompts_per_step
        self.seed, self.shuffle = seed, bool(shuffle)
        self.epoch, self.position, self.consumed = 0, 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch):
        if not self.shuffle:
            return np.arange(self.num_prompts)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def next_batch(self):
        batch = []
        while len(batch) < self.prompts_per_step:
            take = min(self.prompts_per_step - len(batch), self.num_prompts - self.position)
            batch.extend(int(index) for index in self._order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        self.consumed += len(batch)
        return batch

    def state(self):
        """Where the sampler stands (JSON-serialisable); `from_state` continues from exactly here."""
        return {"epoch": self.epoch, "position": self.position, "consumed": self.consumed,
                "num_prompts": self.num_prompts}

    @classmethod
    def from_state(cls, num_prompts, prompts_per_step, seed, shuffle, state):
        """A sampler that continues `state`, refused when it does not fit this prompt set."""
        sampler = cls(num_prompts, prompts_per_step, seed, shuffle)
        require(isinstance(state, dict) and all(isinstance(state.get(key), int) and state[key] >= 0
                                                for key in ("epoch", "position", "consumed")),
                "prompt sampler state", state, "must hold non-negative integers epoch, position and consumed")
        saved = state.get("num_prompts", num_prompts)
        require(saved == num_prompts, "prompt sampler state", state,
                f"was saved for {saved} prompts, but the prompt set now has {num_prompts} (the data files or "
                f"{DATA_KEY}.max_prompt_length changed); resuming would draw a different order")
        require(state["position"] < num_prompts and state["consumed"] == state["epoch"] * num_prompts
                + state["position"], "prompt sampler state", state,
                f"is inconsistent with {num_prompts} prompts (consumed must be epoch x prompts + position)")
        sampler.epoch, sampler.position, sampler.consumed = state["epoch"], state["position"], state["consumed"]
        sampler._order = sampler._epoch_order(sampler.epoch)
        return sampler


def rank_slice(batch, dp_rank, dp_size):
    """The contiguous share of `batch` (prompt indices) for data-parallel rank `dp_rank` of `dp_size`."""
    _positive_int(dp_size, "dp_size")
    require(isinstance(dp_rank, int) and 0 <= dp_rank < dp_size, "dp_rank", dp_rank, f"must be in [0, {dp_size})")
    require(len(batch) % dp_size == 0, "prompt batch size", len(batch),
            f"must be divisible by the data-parallel size ({dp_size}): groups are never split across ranks")
    share = len(batch) // dp_size
    return list(batch[dp_rank * share:(dp_rank + 1) * share])
