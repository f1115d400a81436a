"""Find and load experiment files: `experiments/<name>.py` defining `config()`."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

from llm_jax.config import ConfigError, ExperimentConfig, override

# Where experiments are looked for, in order: $LLM_JAX_EXPERIMENTS, ./experiments, and the
# experiments/ folder of the checkout that this package was installed from.
_REPO_EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def search_path() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("LLM_JAX_EXPERIMENTS", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "experiments", _REPO_EXPERIMENTS]
    unique = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def available() -> dict[str, Path]:
    """Experiment name -> file, first match along the search path winning."""
    found: dict[str, Path] = {}
    for d in search_path():
        for f in sorted(d.glob("*.py")) if d.is_dir() else []:
            if not f.name.startswith("_"):
                found.setdefault(f.stem, f)
    return found


def resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise ConfigError(f"experiment file {name_or_path!r} does not exist")
        return path
    known = available()
    if name_or_path not in known:
        raise ConfigError(
            f"unknown experiment {name_or_path!r}; available: {', '.join(sorted(known)) or '(none found)'} "
            f"(searched {', '.join(map(str, search_path()))})"
        )
    return known[name_or_path]


def load_module(name_or_path: str):
    path = resolve(name_or_path)
    spec = importlib.util.spec_from_file_location(f"llm_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "config", None)):
        raise ConfigError(f"experiment file {path} must define config() -> ExperimentConfig")
    return module


def load(name_or_path: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment's config with dotted `key=value` overrides applied."""
    cfg = load_module(name_or_path).config()
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"config() of experiment {name_or_path!r} returned {type(cfg).__name__}, not ExperimentConfig")
    return override(cfg, overrides)
