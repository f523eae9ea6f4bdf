"""Run identity: the normalised settings of a TrainConfig and the run id hashed from them.

The run id is a readable prefix plus a hash of the normalised config, e.g.
`cnn_s-kd-f0-r4-s0-1a2b3c4d`, so the same settings always map to the same run folder and any grid
can be stopped and started again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdlib.config import to_dict
from kdlib.paths import portable_path
from kdlib.train_config import TrainConfig

RUN_VERSION = 1
"""Version of the training code's results, part of every run id: bump it when a change to kdlib
makes the same config give other numbers, so such runs are retrained instead of reused."""

EXECUTION_SETTINGS: tuple[str, ...] = ("device", "deterministic", "precision", "compile")
"""Settings that say where/how a run executes, not what it is: left out of the run id."""


def canonical(value: Any) -> Any:
    """Plain data with whole floats as ints, so `gamma: 2` and `gamma: 2.0` hash alike."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def config_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The normalised settings that define a run: all but EXECUTION_SETTINGS, cache and splits as
    `portable_path`s, the teacher reduced to its folder name (a run id), whole floats as ints, plus
    `run_version` (RUN_VERSION)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_SETTINGS}
    d["cache"], d["splits"] = portable_path(d["cache"]), portable_path(d["splits"])
    if d.get("teacher"):
        d["teacher"] = Path(d["teacher"]).name
    if d.get("repeat") == 0:  # runs from before repeats (all repeat 0) keep their id
        del d["repeat"]
    d["run_version"] = RUN_VERSION
    return canonical(d)


def method_name(cfg: TrainConfig | Mapping[str, Any]) -> str:
    """`ce`, `logit_adjusted`, `kd`, `kd_original`, `kd+logit_adjusted`, `ce+oversample`,
    `ce+posthoc`, ...: the distiller (if any), the task loss, a sampler and post-hoc adjustment."""
    get = cfg.get if isinstance(cfg, Mapping) else lambda k: getattr(cfg, k)
    distiller, task = get("distiller"), get("task_loss")
    if distiller == "kd" and (get("distill_params") or {}).get("original"):
        distiller = "kd_original"
    name = task if not distiller else distiller if task == "ce" else f"{distiller}+{task}"
    if get("sampler") not in (None, "none"):
        name += f"+{get('sampler')}"
    if get("posthoc_tau") is not None:
        name += "+posthoc"
    return name


def run_id(cfg: TrainConfig) -> str:
    """Readable prefix + 8 hex digits of the hash of `config_identity(cfg)`."""
    digest = hashlib.sha256(json.dumps(config_identity(cfg), sort_keys=True).encode()).hexdigest()
    ratio = "rnat" if cfg.ratio is None else f"r{cfg.ratio:g}"
    return f"{cfg.model}-{method_name(cfg)}-f{cfg.fold}-{ratio}-s{cfg.seed}-{digest[:8]}"
