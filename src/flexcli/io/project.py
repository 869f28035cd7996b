"""The project file (./flex-project.json): which elastic checkpoints were converted in this directory.

Later commands (profile, train-router, extract) default to the single checkpoint recorded here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError
from .atomic import atomic_write
from .layout import PROJECT as PROJECT_FILE
from .layout import PROJECT_VERSION


def _load(cwd: Path) -> dict:
    p = cwd / PROJECT_FILE
    if not p.is_file():
        return {"version": PROJECT_VERSION, "elastic": []}
    try:
        data = json.loads(p.read_text())
        assert isinstance(data.get("elastic"), list)
        return data
    except (json.JSONDecodeError, AssertionError, AttributeError):
        raise UsageError(f"{p} is not a valid flexcli project file; remove it or fix it") from None


def record(elastic_dir: Path, source: str, cwd: Path | None = None) -> Path:
    """Add (or refresh) an elastic checkpoint in the project file, atomically."""
    cwd = Path.cwd() if cwd is None else cwd
    data = _load(cwd)
    try:
        rel = os.path.relpath(elastic_dir.resolve(), cwd.resolve())
    except ValueError:
        rel = str(elastic_dir.resolve())
    data["elastic"] = [e for e in data["elastic"] if e.get("path") != rel] + [{"path": rel, "source": source}]
    p = cwd / PROJECT_FILE
    atomic_write(p, json.dumps(data, indent=2) + "\n")
    return p


def default_elastic(cwd: Path | None = None) -> Path:
    """The one elastic checkpoint recorded here that still exists; otherwise a one-line error."""
    cwd = Path.cwd() if cwd is None else cwd
    entries = [e["path"] for e in _load(cwd)["elastic"] if (cwd / e["path"]).is_dir()]
    if not entries:
        raise UsageError(
            f"no elastic checkpoint given and none recorded in ./{PROJECT_FILE}; "
            "run `flex convert MODEL` here first or pass ELASTIC"
        )
    if len(entries) > 1:
        raise UsageError(
            f"several elastic checkpoints in ./{PROJECT_FILE}: {', '.join(entries)}; pass one as ELASTIC"
        )
    return cwd / entries[0]
