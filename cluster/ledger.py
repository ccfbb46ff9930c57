"""A backend's ledger in the run dir: one JSON line per submission, cancel and end of an attempt, so
`ftl status` can tell what happened to a job after its scheduler has forgotten it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def read_ledger(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_ledger(path: Path, entry: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
