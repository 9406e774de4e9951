"""posttrain: readable, scalable post-training for large language models.

The Python API: a run config (built in code, or read from YAML with `load_config`) and the loop
that trains it.

    from posttrain import GRPORunConfig, load_config, run_grpo
    cfg = load_config(GRPORunConfig, "grpo.yaml", ["grpo.max_num_steps=10"])
    run_grpo(cfg)

Names are imported on first use, so `import posttrain` (and `posttrain --help`) does not wait for
torch, transformers or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "run_sft": "posttrain.loops.sft",
    "run_dpo": "posttrain.loops.dpo",
    "run_rm": "posttrain.loops.rm",
    "run_grpo": "posttrain.loops.grpo",
    "run_eval": "posttrain.loops.eval",
    "SFTRunConfig": "posttrain.config",
    "DPORunConfig": "posttrain.config",
    "RMRunConfig": "posttrain.config",
    "GRPORunConfig": "posttrain.config",
    "EvalRunConfig": "posttrain.config",
    "ConfigError": "posttrain.config",
    "load_config": "posttrain.config",
    "Environment": "posttrain.envs.base",
    "EnvStepResult": "posttrain.envs.base",
    "Invalid": "posttrain.envs.base",
}

__all__ = ["__version__", *_API]

def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
