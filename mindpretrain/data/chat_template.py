"""Render a conversation with the tokenizer's own chat template, tokenize it once, and mark its target tokens.

Training must see exactly the text inference will see, so the template is the tokenizer's
(`chat_template` of tokenizer_config.json, or a file) rendered the way transformers'
`apply_chat_template` renders it: a sandboxed jinja2 environment with `trim_blocks`/`lstrip_blocks`, the
`loopcontrols` extension, `raise_exception`, `strftime_now`, transformers' `tojson`, and the special tokens
(`bos_token`, `eos_token`, ...) and `add_generation_prompt=False` as variables. A `{% generation %}` block
renders its body (its tracking is not needed here).

Where the trained assistant text lies is found by rendering, never by scanning token ids: the conversation
is rendered twice, once as is and once with each trained assistant content wrapped in two private-use
marker characters. With the markers removed the second rendering must equal the first (else the template
changes the content it is given, as DeepSeek-R1's does by cutting everything up to `</think>`), and the text
between the markers must be the content verbatim. The target span of a turn is its content plus the EOS the
template writes right after it. The plain text is tokenized once (no special tokens added: the template
writes BOS), and each span boundary must fall between two tokens according to the tokenizer's offsets; a
boundary inside a token is a `token_boundary` reject, since no mask could then be exact.

Quirks of DeepSeek-V3's template worth knowing: it hoists every system message to the start (joined by
blank lines) and keeps the `<think>` text of earlier assistant turns.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mindpretrain.data.preprocess import PreprocessError
from mindpretrain.data.sft_records import RecordError
from mindpretrain.data.tokenizer import special_token_from_config

TARGET_BEGIN, TARGET_END = "\U000F0001", "\U000F0002"  # private use: never in real text, refused in content
MARKERS = (TARGET_BEGIN, TARGET_END)
TEMPLATE_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
CONFIG_NAME = "tokenizer_config.json"


class ChatTemplateError(PreprocessError):
    """The chat template (or the tokenizer with it) cannot give exact targets; no record could be trained."""


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    source: str  # the file it was read from

    @property
    def sha256(self):
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EncodedChat:
    ids: np.ndarray          # int32, one BOS first
    target_mask: np.ndarray  # uint8, 1 on the tokens the model must predict
    spans: tuple             # (first token, end token, message number) of each trained turn


def tokenizer_config_path(tokenizer_path):
    return os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), CONFIG_NAME)


def load_chat_template(tokenizer_path, template_path=None):
    """The template of `template_path` (a jinja file, or a tokenizer_config.json), else the one beside the
    tokenizer.json (`chat_template` of its tokenizer_config.json, or a chat_template.jinja file)."""
    if template_path is not None:
        if not os.path.isfile(template_path):
            raise ChatTemplateError(f"{template_path}: chat template file not found")
        if str(template_path).endswith(".json"):
            return ChatTemplate(_template_of_config(template_path), str(template_path))
        return ChatTemplate(_read_text(template_path), str(template_path))
    config_path = tokenizer_config_path(tokenizer_path)
    if os.path.isfile(config_path) and "chat_template" in _read_json(config_path):
        return ChatTemplate(_template_of_config(config_path), config_path)
    jinja_path = os.path.join(os.path.dirname(config_path), "chat_template.jinja")
    if os.path.isfile(jinja_path):
        return ChatTemplate(_read_text(jinja_path), jinja_path)
    raise ChatTemplateError(f"{tokenizer_path}: no chat template beside it ({config_path} has no chat_template "
                            "and there is no chat_template.jinja); pass --chat-template FILE")


def _template_of_config(config_path):
    template = _read_json(config_path).get("chat_template")
    if isinstance(template, list):  # named templates, as transformers stores several: use "default"
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ChatTemplateError(f"{config_path}: chat_template is missing or not a string "
                                "(or a list holding one named 'default')")
    return template


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise ChatTemplateError(f"{path}: cannot read ({error})") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path}: expected a JSON object")
    return data


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ChatTemplateError(f"{path}: cannot read ({error})") from None


# --------------------------------------------------------------------------- rendering like transformers


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` without underscore-prefixed attributes, as transformers restricts it."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the namespace attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(text):
    """A jinja2 template in transformers' environment (same options, filters and globals)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                               dict=dict, namespace=_TemplateNamespace)
    try:
        return environment.from_string(text)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ChatTemplateError(f"the chat template does not compile: {error} (line {error.lineno})") from None


# --------------------------------------------------------------------------------- encoding with targets


class ChatEncoder:
    """(ids, target_mask) of validated conversations, for one tokenizer (an HFTokenizer) and chat template."""

    def __init__(self, tokenizer, template):
        self._backend = _backend_of(tokenizer)
        self._template = compile_template(template.text)
        self.bos_id, self.eos_id = tokenizer.bos_id, tokenizer.eod_id
        if self.bos_id is None or self.eos_id is None:
            raise ChatTemplateError(f"{tokenizer.path}: the tokenizer needs a BOS and an EOS token "
                                    "(a tokenizer_config.json naming bos_token and eos_token)")
        self.variables = self._special_token_strings(tokenizer)
        self.eos_token = self._backend.id_to_token(self.eos_id)

    def _special_token_strings(self, tokenizer):
        """The special tokens transformers passes to templates: the config's, else the tokenizer's BOS/EOS."""
        config = tokenizer_config_path(tokenizer.path)
        strings = {key: special_token_from_config(config, key) if os.path.isfile(config) else None
                   for key in TEMPLATE_SPECIAL_TOKENS}
        strings["bos_token"] = strings["bos_token"] or self._backend.id_to_token(self.bos_id)
        strings["eos_token"] = strings["eos_token"] or self._backend.id_to_token(self.eos_id)
        return {key: value for key, value in strings.items() if value is not None}

    def added_tokens(self):
        """The strings the tokenizer turns into control tokens wherever they appear, plus the span markers."""
        return sorted(token.content for token in self._backend.get_added_tokens_decoder().values()) + list(MARKERS)

    def render(self, messages):
        """The template's text for `messages` (a list of {"role", "content"} dicts), as transformers renders it."""
        try:
            return self._template.render(messages=messages, tools=None, documents=None, add_generation_prompt=False,
                                         **self.variables)
        except jinja2.exceptions.TemplateError as error:
            raise RecordError("template_error", str(error)) from None

    def encode(self, turns):
        """The one-BOS token ids of `turns` and the mask of their trained assistant contents and EOS tokens."""
        text = self.render([{"role": turn.role, "content": turn.content} for turn in turns])
        trained = [turn for turn in turns if turn.trained]
        marked = self.render([{"role": turn.role, "content": _marked(turn)} for turn in turns])
        char_spans = _locate_targets(marked, text, trained)
        char_spans = [(start, self._end_with_eos(text, end, turn), turn.number)
                      for (start, end), turn in zip(char_spans, trained)]
        encoding = self._backend.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        spans = [(_token_index(offsets, start, number), _token_index(offsets, end, number), number)
                 for start, end, number in char_spans]
        ids, spans = self._one_bos(ids, spans)
        mask = np.zeros(ids.size, dtype=np.uint8)
        for first, end, _ in spans:
            mask[first:end] = 1
        return EncodedChat(ids, mask, tuple(spans))

    def _end_with_eos(self, text, end, turn):
        if not text.startswith(self.eos_token, end):
            raise ChatTemplateError(
                f"the chat template does not close the assistant turn (message {turn.number}) with EOS "
                f"{self.eos_token!r} right after its content (it writes {text[end:end + 30]!r}); the model could "
                "not learn to stop, so this template cannot be trained with")
        return end + len(self.eos_token)

    def _one_bos(self, ids, spans):
        """Exactly one BOS, first: prepended when the template writes none (transformers would leave it out)."""
        if ids.size == 0 or ids[0] != self.bos_id:
            ids = np.concatenate([np.asarray([self.bos_id], dtype=np.int32), ids])
            spans = [(first + 1, end + 1, number) for first, end, number in spans]
        count = int(np.count_nonzero(ids == self.bos_id))
        if count != 1:
            raise ChatTemplateError(f"the chat template writes BOS (id {self.bos_id}) {count} times in one "
                                    "conversation; a document must hold exactly one")
        return ids, spans


def _backend_of(tokenizer):
    """The `tokenizers.Tokenizer` behind an HFTokenizer: offsets and added tokens come from it."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        raise ChatTemplateError(f"{tokenizer.path}: chat records need a Hugging Face tokenizer.json "
                                f"(HFTokenizer), not {tokenizer.kind}")
    if backend.truncation is not None or backend.padding is not None:
        raise ChatTemplateError(f"{tokenizer.path}: the tokenizer.json enables truncation or padding, which "
                                "would cut or pad conversations silently; remove them from the file")
    return backend


def _marked(turn):
    return f"{TARGET_BEGIN}{turn.content}{TARGET_END}" if turn.trained else turn.content


def _locate_targets(marked, text, trained):
    """Character spans (in `text`) of the trained contents, from the markers of the `marked` rendering."""
    pieces = marked.split(TARGET_BEGIN)
    spans, clean = [], [pieces[0]]
    position = len(pieces[0])
    for piece, turn in zip(pieces[1:], trained):
        content, end_marker, rest = piece.partition(TARGET_END)
        if not end_marker or content != turn.content or TARGET_END in rest:
            break
        spans.append((position, position + len(content)))
        clean.extend((content, rest))
        position += len(content) + len(rest)
    if len(spans) != len(trained) or len(pieces) != len(trained) + 1 or TARGET_END in pieces[0] \
            or "".join(clean) != text:
        number = trained[min(len(spans), len(trained) - 1)].number if trained else "?"
        raise ChatTemplateError(
            f"the chat template does not render the assistant content of message {number} verbatim (it edits, "
            "moves or drops it), so its tokens cannot be located; use a template that writes message['content'] "
            "as given (DeepSeek-R1's cuts reasoning out of every turn; DeepSeek-V3's keeps it)")
    return spans


def _token_index(offsets, char, number):
    """The index of the first token at or after character `char`, which must be a token boundary."""
    before = offsets[:, 1] <= char
    index = int(np.count_nonzero(before))
    if not before[:index].all() or not (offsets[index:, 0] >= char).all():
        raise RecordError("token_boundary", f"the trained span of the assistant turn has a boundary at character "
                                            f"{char} inside a token of the rendered chat", number)
    return index
