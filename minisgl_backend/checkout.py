"""Where things are in a source checkout, and which model folder a server serves."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRITONSERVER_WRAPPER = ROOT / "scripts" / "tritonserver"
DEFAULT_MODEL_SUBDIR = os.path.join("build", "models", "smollm2")
# consulted when a Triton model's model_path parameter is empty
MODEL_PATH_ENV = "MINISGL_MODEL_PATH"


def repo_root_of(path: str | os.PathLike) -> Path | None:
    """The source checkout holding `path` (a folder with minisgl_backend/ and model_repository/)."""
    for parent in Path(path).resolve().parents:
        if (parent / "minisgl_backend" / "__init__.py").is_file() and (parent / "model_repository").is_dir():
            return parent
    return None


def resolve_model_path(configured: str, model_file: str | os.PathLike | None) -> str:
    """config.pbtxt's model_path, else $MINISGL_MODEL_PATH, else <checkout>/build/models/smollm2
    (the checkout that holds `model_file`)."""
    if configured:
        return configured
    from_env = os.environ.get(MODEL_PATH_ENV, "")
    if from_env:
        return from_env
    root = repo_root_of(model_file) if model_file else None
    if root is not None and (root / DEFAULT_MODEL_SUBDIR).is_dir():
        return str(root / DEFAULT_MODEL_SUBDIR)
    raise ValueError(
        "no model: set the model_path parameter in config.pbtxt, or the environment variable "
        f"{MODEL_PATH_ENV}, or run 'make model' to prepare the default model in {DEFAULT_MODEL_SUBDIR}")
