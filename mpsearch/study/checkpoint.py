"""``search_state.json``: the digest of the search algorithm's state after every generation.

A resumed study rebuilds its algorithm by replaying the recorded generations through ask/tell
(every algorithm is deterministic given its seed and what it was told); each replayed state must
match the digest written when that generation first ran, else the resume stops before running
anything new. The file is data (JSON), written atomically. A study that writes no files keeps
the digests in memory only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from mpsearch.errors import UserError
from mpsearch.host.files import atomic_write_text

__all__ = ["CHECKPOINT_FILE", "SearchCheckpoint", "checkpoint_file"]

CHECKPOINT_FILE = "search_state.json"
logger = logging.getLogger(__name__)


def checkpoint_file(out_dir: Path, method: str, single: bool) -> Path:
    """The checkpoint of ``method``: one file per method when a study runs several."""
    return out_dir / (CHECKPOINT_FILE if single else f"search_state.{method.replace('+', '-')}.json")


class SearchCheckpoint:
    """The digests of one method's generations; see the module docstring."""

    def __init__(self, path: Path | None, *, fresh: bool) -> None:
        self.path = path
        self.digests: list[str] = []
        if fresh or path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            digests = data["digests"]
            if not (isinstance(digests, list) and all(isinstance(d, str) for d in digests)):
                raise ValueError("digests")
            self.digests = digests
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning(f"warning: {path} is unreadable; the replay rewrites it")

    def record(self, generation: int, state: dict[str, Any], study_name: str) -> None:
        digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
        if generation < len(self.digests):
            if self.digests[generation] != digest:
                raise UserError(
                    f"cannot resume study {study_name!r}: replaying generation {generation} gave another search state than "
                    f"its checkpoint in {self.path} (another mpsearch, pymoo or optuna version?); start a new study under "
                    "another name"
                )
            return
        self.digests = self.digests[:generation] + [digest]
        if self.path is not None:
            doc = {"version": 1, "study": study_name, "generation": generation, "digests": self.digests, "state": state}
            atomic_write_text(self.path, json.dumps(doc), what="search checkpoint")
