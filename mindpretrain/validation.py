"""`ConfigError` and `require`: how every configuration problem is reported, in one small module.

A message names the key, the value and the rule broken, so a wrong YAML line is found without a traceback.
Model plugins import these without pulling in the YAML loader.
"""


class ConfigError(ValueError):
    """Invalid configuration: the message names the key, the value and the rule broken."""


def require(condition, key, value, rule):
    """Raise `ConfigError("key (value) rule")` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key} ({value!r}) {rule}")
