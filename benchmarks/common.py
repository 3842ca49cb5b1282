"""What the benchmark scripts share that is not about the released stack (released_stack.py): the
crash-safe JSON write every script makes after each phase, so a run cut short keeps its last good
file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path, obj, indent: int = 2) -> None:
    """`obj` as JSON at `path` through a temporary name beside it (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    os.replace(tmp, path)
