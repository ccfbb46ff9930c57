"""torchrun (`torch.distributed.run`, unchanged arguments and exit codes) without its failure report when
the ranks have already said what happened.

torchrun ends every non-zero worker exit with a Python traceback of its own and a "Root Cause" table, and
a stop signal with a `SignalException` traceback. For a user mistake (the ranks exit EXIT_USER_ERROR after
printing the paragraph) and for a pre-emption (EXIT_PREEMPTED, checkpoint saved) that report is noise a
user learns to skip, and then misses a real crash. So here: those two outcomes exit as torchrun would (1)
with one line instead of the report; any other failure (a crash, a rank killed by the OOM killer) keeps
torchrun's full report. `FTL_VERBOSE=1` keeps everything.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from launcher.outcome import EXIT_PREEMPTED, EXIT_USER_ERROR

EXPLAINED = {EXIT_USER_ERROR: "a user error (printed above; every rank's in RUN_DIR/logs/rank-N.log)", EXIT_PREEMPTED: "pre-empted (checkpoint saved)"}
TORCHRUN_FAILED = 1  # what torchrun exits with for any failed worker (an uncaught ChildFailedError)


class _ExplainedExits(logging.Filter):
    """Drops torchrun's per-worker "failed (exitcode: 2)" and "closing signal" lines for explained exits."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("closing signal" in text or "death signal" in text or any(f"(exitcode: {code})" in text for code in EXPLAINED))


def main(argv: list[str] | None = None) -> int:
    verbose = os.environ.get("FTL_VERBOSE") == "1"
    args = parse_args(argv)
    if not verbose:  # torchrun's loggers propagate to the handlers torch installs on `torch` and `torch.distributed`
        for logger in (logging.getLogger("torch"), logging.getLogger("torch.distributed"), logging.getLogger()):
            for handler in logger.handlers:
                handler.addFilter(_ExplainedExits())
    try:
        run(args)
    except ChildFailedError as exc:
        _, root = exc.get_first_failure()
        if verbose or root.exitcode not in EXPLAINED:
            raise
        print(f"torchrun: the ranks stopped: {EXPLAINED[root.exitcode]}", file=sys.stderr)
        return TORCHRUN_FAILED
    except SignalException as exc:
        if verbose:
            raise
        print(f"torchrun: stopped by {signal.Signals(exc.sigval).name}", file=sys.stderr)
        return TORCHRUN_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
