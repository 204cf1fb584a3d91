"""`package:<pkg>/<folder>` model paths: weights shipped inside a pip package (light: no torch or transformers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from uegr_dist.config.loading import ConfigError


def resolve_model_path(name_or_path: str) -> str:
    """`package:<pkg>/<folder>` -> that folder inside the installed package; anything else is returned unchanged."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    package, _, folder = name_or_path[len("package:") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name_or_path = {name_or_path!r}: python package {package!r} is not installed "
            f"(for the demo model: pip install 'uegr-dist[demo]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / folder
    if not path.is_dir():
        raise ConfigError(f"model.name_or_path = {name_or_path!r}: {path} does not exist")
    return str(path)
