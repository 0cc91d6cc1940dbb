"""Spelling help for bp-train's command line: a key or an option it does not know, answered with the nearest
names the composed config has (its typed schema's fields), instead of Hydra's advice to add the key with ``+``
(which the schema refuses anyway).

Light on purpose (difflib, OmegaConf, Hydra's errors): it runs where Hydra fails, before torch is imported.
"""

from __future__ import annotations

import difflib
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

HIDDEN_KEYS = ("_target_", "_partial_", "hydra")  # never what a user meant to type


def _close(word: str, names: list[str], n: int = 1) -> list[str]:
    return difflib.get_close_matches(word, names, n=n, cutoff=0.6)


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key path of a plain container (``model.net.hidden``), without Hydra's own node."""
    if not isinstance(node, dict):
        return []
    keys = []
    for key, value in node.items():
        if key in HIDDEN_KEYS:
            continue
        path = f"{prefix}{key}"
        keys += [path, *_dotted_keys(value, f"{path}.")]
    return keys


def nearest_keys(key: str, root: DictConfig, n: int = 1, siblings_only: bool = False) -> list[str]:
    """Full key paths of ``root`` that ``key`` (``a.b.c``) was probably meant to be: a close sibling of its
    last part first, else any key in the config whose last part is the same or close (``lr`` -> ``optimizer.lr``)."""
    plain = OmegaConf.to_container(root, resolve=False)  # no interpolation resolved: ${hydra:...} may not be set
    everything = [k for k in _dotted_keys(plain) if k != key]  # a key added with + is in the config already
    parent, _, last = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in everything if k.rpartition(".")[0] == parent]
    close = _close(last, siblings, n)
    if close or siblings_only:
        return [f"{parent}.{name}" if parent else name for name in close]
    same = [k for k in everything if k.rpartition(".")[2] == last and k != key]
    if same:
        return same[:n]
    by_last = {}
    for k in everything:
        by_last.setdefault(k.rpartition(".")[2], k)
    return [by_last[name] for name in _close(last, list(by_last), n)]


def unknown_key(exc: BaseException) -> str | None:
    """``unknown key 'lrr' in optimizer; did you mean 'lr'?`` for Hydra's "Could not override" of a key the
    composed config lacks; None for any other error."""
    cause = exc.__cause__
    if not isinstance(exc, ConfigCompositionException) or not isinstance(cause, ConfigAttributeError | ConfigKeyError):
        return None
    parent = cause.parent_node
    key, full_key = str(cause.key), str(cause.full_key or cause.key)
    if not isinstance(parent, DictConfig) or not full_key.endswith(key):
        return None
    where, _, _ = full_key.rpartition(".")
    place = f" in {where}" if where else ""
    arguments = OmegaConf.get_type(parent) is dict  # a class's keyword arguments, not a schema: it may take more
    close = nearest_keys(full_key, parent._get_root(), siblings_only=arguments)  # the composed config, Hydra's too
    if close:
        sibling = where and close[0].startswith(f"{where}.") and "." not in close[0][len(where) + 1 :]
        hint = f"did you mean {(close[0][len(where) + 1 :] if sibling else close[0])!r}?"
    else:
        keys = [str(k) for k in parent if k not in HIDDEN_KEYS]
        hint = f"its keys are {', '.join(keys)}" if keys else "it takes no keys"
    value = _value_of(exc, full_key)
    if arguments and value and not close:
        hint += f" (to pass an argument its class takes, add it: +{full_key}={value})"
    return f"unknown key {key!r}{place}; {hint}"


def _value_of(exc: BaseException, full_key: str) -> str | None:
    """The value the command line gave ``full_key``, from Hydra's message (``... use +a.b=value``)."""
    marker = f"+{full_key}="
    for line in str(exc).splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None


def unknown_option(exc: BaseException) -> str | None:
    """Hydra's "Could not find 'data/irs'" (its options listed after it), with ``did you mean 'iris'?`` added;
    None for any other error, or when no option is close."""
    if not isinstance(exc, MissingConfigException) or not exc.missing_cfg_file or not exc.options:
        return None
    choice = exc.missing_cfg_file.rpartition("/")[2]
    close = _close(choice, [str(o) for o in exc.options])
    if not close:
        return None
    group = exc.missing_cfg_file.rpartition("/")[0]
    return f"Could not find '{exc.missing_cfg_file}' (did you mean {group}={close[0]}?)"


def spelling_hint(exc: BaseException, line: str) -> str:
    """``line`` (Hydra's error, folded to one line) with the names it probably meant: an unknown key's whole
    message replaced, an unknown option's choice suggested beside Hydra's list of options."""
    message = unknown_key(exc)
    if message:
        return message
    option = unknown_option(exc)
    if option:
        found = f"Could not find '{exc.missing_cfg_file}'"
        return line.replace(found, option, 1) if found in line else f"{option}; {line}"
    return line
