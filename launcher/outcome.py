"""How a training run ended, and the exit code each ending maps to.

0 means "nothing left to do for now" (done, early-stopped, paused at `train.stop_at`, already complete);
EXIT_PREEMPTED means "stopped on request, checkpoint saved: requeue me"; 2 is a user mistake (one
paragraph on stderr); anything else is a failure. 75 is EX_TEMPFAIL of sysexits.h ("temporary failure,
retry later"): no Python, torchrun, or shell error uses it, so a batch script can tell it from a crash.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
OUTCOME_FILE = "outcome.json"


class Outcome(str, enum.Enum):
    DONE = "done"
    EARLY_STOPPED = "early_stopped"
    PAUSED = "paused"  # reached `train.stop_at`: a planned pause
    PREEMPTED = "preempted"  # a stop request: checkpoint saved, rerun (requeue) to continue
    ALREADY_COMPLETE = "already_complete"
    ERROR = "error"  # a mistake in the job found by the ranks (the paragraph is in `detail` and on stderr)


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    step: int
    checkpoint: str | None = None
    detail: str = ""

    @property
    def exit_code(self) -> int:
        return {Outcome.PREEMPTED: EXIT_PREEMPTED, Outcome.ERROR: EXIT_USER_ERROR}.get(self.outcome, EXIT_OK)

    def to_dict(self) -> dict:
        return {**asdict(self), "outcome": self.outcome.value, "exit_code": self.exit_code}

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        return cls(Outcome(data["outcome"]), data["step"], data.get("checkpoint"), data.get("detail", ""))


def write_outcome(run_dir: Path, result: Result) -> None:
    """Rank 0, after the last collective: how the run ended, for whoever launched it (`ftl run` turns it
    into its exit code; torchrun reports any non-zero worker exit as its own exit 1)."""
    tmp = run_dir / f"{OUTCOME_FILE}.{os.getpid()}.tmp"  # any rank may write an error: one temp file each
    tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    os.replace(tmp, run_dir / OUTCOME_FILE)


def read_outcome(run_dir: Path) -> Result | None:
    try:
        return Result.from_dict(json.loads((run_dir / OUTCOME_FILE).read_text()))
    except (OSError, ValueError, KeyError):
        return None


def clear_outcome(run_dir: Path) -> None:
    """Before a launch: an outcome left by an earlier run must not be read as this one's."""
    (run_dir / OUTCOME_FILE).unlink(missing_ok=True)


def launcher_exit_code(torchrun_code: int, result: Result | None) -> int:
    """What a launcher (`ftl run`, a Slurm step) exits with: torchrun reports any non-zero worker exit (the
    pre-emption code included) as its own 1, so the outcome rank 0 wrote says whether the job was
    pre-empted with its checkpoint saved (EXIT_PREEMPTED: requeue me) or stopped on a user error."""
    if torchrun_code == 0 or result is None:
        return torchrun_code
    if result.outcome is Outcome.PREEMPTED:
        return EXIT_PREEMPTED
    if result.outcome is Outcome.ERROR:
        return EXIT_USER_ERROR
    return torchrun_code
