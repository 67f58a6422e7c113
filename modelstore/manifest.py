"""models/manifest.json: one entry per model file (sha256, size, accuracy, settings), read and written here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelstore.files import write_text_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


def read_manifest(models_dir: str | Path) -> dict[str, Any]:
    """The manifest's model entries ({} when there is no manifest yet)."""
    path = Path(models_dir) / MANIFEST_NAME
    try:
        return dict(json.loads(path.read_text()).get("models", {}))
    except FileNotFoundError:
        return {}
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a valid edgeq manifest: {err}") from err


def write_manifest(models_dir: str | Path, models: dict[str, Any]) -> Path:
    """Replace the manifest with `models` (sorted by key), atomically: a reader never sees half a file."""
    path = Path(models_dir) / MANIFEST_NAME
    text = json.dumps({"format": MANIFEST_FORMAT, "models": dict(sorted(models.items()))}, indent=2) + "\n"
    return write_text_atomic(path, text)


def update_manifest(models_dir: str | Path, entries: dict[str, Any]) -> Path:
    """Add or replace `entries`, keeping every other model's entry."""
    return write_manifest(models_dir, {**read_manifest(models_dir), **entries})
