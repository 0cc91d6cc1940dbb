"""What of the config a run records, whatever the backend: the params, and the config file, without secrets."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

ENV_REDACTED = "<from the environment: not recorded>"


def recordable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config with every value taken from ``${oc.env:...}`` replaced by a marker.

    Environment values may be secrets (tokens, passwords in URIs): they never reach the record, neither as
    params nor inside the logged ``config.yaml``.
    """

    def walk(raw_node: Any, node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: walk(raw_node.get(k) if isinstance(raw_node, Mapping) else None, v) for k, v in node.items()}
        if isinstance(raw_node, str) and "${oc.env:" in raw_node:
            return ENV_REDACTED
        return node

    return walk(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(cfg, resolve=True))


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config flattened to ``a.b.c`` keys, without environment values (see recordable_config)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif node != ENV_REDACTED:
            out[prefix[:-1]] = json.dumps(node) if isinstance(node, list | dict) else str(node)

    walk(recordable_config(cfg), "")
    # Where a run writes is not a hyperparameter: as params these would differ between every pair of
    # runs and crowd the dashboard's comparisons. They are tags instead (see run.run_tags).
    # The same goes for the callbacks' folders, and for Hydra's _partial_ markers, which say nothing.
    return {k: v for k, v in out.items() if not k.startswith("paths.") and not k.endswith(("._partial_", ".dirpath"))}
