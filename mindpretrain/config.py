"""YAML run configuration as MindFormers users write it: `base_config` inheritance and `--key.sub=value` overrides.

A run's YAML may name one or more parent files in `base_config` (a path or a list, relative to the
file that names them). Parents are resolved depth-first, merged in the order listed, and the file
itself is merged last, so the most specific setting wins. Dicts merge key by key; any other value
(lists included) is replaced whole.

Overrides from the command line (`--model.model_config.num_layers=4`, `--callbacks.1.save_checkpoint_steps=50`
for a list item) are applied after loading.
They must name a key that exists, so a typo fails loudly instead of training the wrong model;
`--+key.sub=value` adds a key on purpose. Values are parsed as YAML scalars (`4`, `1.e-4`, `True`,
`[1, 2]`, `null`).

Every problem is a `ConfigError` (mindpretrain/validation.py) naming the key, the value and the rule.
"""
import copy
import difflib
import os

import yaml

from mindpretrain.validation import ConfigError

BASE_CONFIG_KEY = "base_config"


class Config(dict):
    """A dict with attribute access (`config.model.model_config.num_layers`), as MindFormers' config is."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __deepcopy__(self, memo):
        return Config({key: copy.deepcopy(value, memo) for key, value in self.items()})

    def to_dict(self):
        return _plain(self)

    def get_path(self, dotted, default=None):
        node = self
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _wrap(value):
    if isinstance(value, dict):
        return Config({key: _wrap(item) for key, item in value.items()})
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    return value


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def merge(base, override):
    """Deep-merge `override` into a copy of `base` (dicts recursively, everything else replaced)."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _read_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _load_tree(path, chain):
    path = os.path.realpath(path)
    if path in chain:
        cycle = " -> ".join(chain[chain.index(path):] + [path])
        raise ConfigError(f"base_config forms a cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop(BASE_CONFIG_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(item, str) for item in bases):
        raise ConfigError(f"base_config ({bases!r}) in {path} must be a path or a list of paths")
    merged = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = merge(merged, _load_tree(base_path, chain + [path]))
    return merge(merged, data)


def load_config(path, overrides=()):
    """Load `path` with its `base_config` parents and apply `--key.sub=value` overrides."""
    run_config = _load_tree(path, [])
    for override in overrides:
        apply_override(run_config, override)
    return _wrap(run_config)


def parse_override_args(args):
    """Split `["--a.b=1", "--c", "2", "--+d.e=x"]` into override strings `["a.b=1", "c=2", "+d.e=x"]`."""
    overrides, index = [], 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --key.sub=value")
        body = arg[2:]
        if "=" not in body:
            if index + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value (use --key.sub=value)")
            body = f"{body}={args[index + 1]}"
            index += 1
        overrides.append(body)
        index += 1
    return overrides


def apply_override(run_config, override):
    """Apply one `key.sub=value` (or `+key.sub=value` to add a new key) to the run config (a plain dict) in place."""
    dotted, _, raw = override.partition("=")
    add = dotted.startswith("+")
    dotted = dotted.lstrip("+")
    if not dotted or not _:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = dotted.split(".")
    node = run_config
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, dotted, ".".join(parts[:depth + 1]), add)
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:depth + 1])} is a value "
                              f"({node!r}), not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
        return
    if last not in node and not add:
        raise ConfigError(_unknown_key(dotted, dotted, node))
    node[last] = value


def _child(node, part, dotted, path, add):
    """Step into `node[part]`: a dict key, or a list position (`callbacks.1.save_checkpoint_steps`)."""
    if isinstance(node, list):
        return node[_list_index(node, part, dotted)]
    if part not in node:
        if not add:
            raise ConfigError(_unknown_key(dotted, path, node))
        node[part] = {}
    return node[part]


def _list_index(node, part, dotted):
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {dotted}: {part!r} is not a position in a list of {len(node)} items "
                          f"(use 0 to {len(node) - 1})")
    return int(part)


def _unknown_key(dotted, missing, node):
    close = difflib.get_close_matches(missing.split(".")[-1], list(node), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"override {dotted}: key {missing} does not exist in the config{hint}; "
            f"write --+{dotted}=... to add a new key")
