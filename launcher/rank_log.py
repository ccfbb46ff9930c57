"""Every rank's output also in RUN_DIR/logs/rank-N.log, whoever started the rank.

The rank tees its own file descriptors 1 and 2 (in launcher/entries.py `run_rank`, which torchrun's
ranks, Slurm's through torchrun and Ray Train's workers all run): what Python, the C++ libraries (gloo,
NCCL, torch's own warnings) and child processes write reaches the terminal or the scheduler's log as
before and is appended to the file. The copies are made by `tee` processes, not by a thread of the
rank, so a rank that crashes or is killed still leaves all it wrote in both places. They ignore the
stop signals (Slurm signals every process of a step; a dead tee would break the rank's writes while it
checkpoints) and end when the rank closes its end of the pipe.

A terminal stays a terminal to rich (rank 0's progress bar): TTY_COMPATIBLE, TTY_INTERACTIVE and the
terminal's size are set for the rank, so in that case the file holds what the terminal was sent,
progress-bar redraws included.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOGS_DIR = "logs"

# `trap ''` ignores the signals, and an ignored signal stays ignored across exec (no preexec_fn, which is
# unsafe in a process with threads: a Ray worker runs the rank in one).
_TEE = "trap '' HUP INT TERM QUIT USR1 USR2; exec tee -a \"$1\""


def rank_log_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOGS_DIR / f"rank-{rank}.log"


def rank_log_header(rank: int, world_size: int) -> str:
    """The line that opens each start's part of a rank's log (not shown on the terminal)."""
    return f"FTL rank {rank} of {world_size} on {socket.gethostname()} (pid {os.getpid()}), {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"


@contextmanager
def tee_output(path: Path, header: str = "") -> Iterator[None]:
    """Inside: fds 1 and 2 also go to `path`, after `header` (in the file only). Appended: a resumed run
    adds to its log. On an exception the copies stay on, so the traceback that Python or the host prints
    next reaches the file too; they end with the process."""
    if shutil.which("tee") is None or shutil.which("sh") is None:
        print(f"warning: no `tee` on this machine: this rank's output is not copied to {path}", file=sys.stderr, flush=True)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        log.write(header)
    terminal = _terminal_env() if os.isatty(1) else {}
    previous_env = {key: os.environ.get(key) for key in terminal}
    os.environ.update(terminal)
    sys.stdout.flush()
    sys.stderr.flush()
    saved: dict[int, int] = {}
    tees: list[subprocess.Popen] = []
    for fd in (1, 2):
        saved[fd] = os.dup(fd)
        read_end, write_end = os.pipe()
        tees.append(subprocess.Popen(["sh", "-c", _TEE, "sh", str(path)], stdin=read_end, stdout=saved[fd], close_fds=True))
        os.close(read_end)
        os.dup2(write_end, fd)
        os.close(write_end)
    try:
        yield
    except BaseException:
        raise  # copies left on: see the docstring
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)  # closes this process's last write end of the pipe: the tee sees its end
            os.close(original)
        deadline = time.monotonic() + 2  # one short wait for both: a rank's exit must not eat torchrun's grace
        for tee in tees:
            try:
                tee.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # a child process still holds the pipe; its tee ends with it
                pass
    finally:
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _terminal_env() -> dict[str, str]:
    """What makes rich treat the pipe as the terminal behind it."""
    wanted = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}
    size = os.get_terminal_size(1)
    if size.columns > 0 and size.lines > 0:  # a pseudo-terminal may report 0 x 0: rich then uses its default
        wanted.update(COLUMNS=str(size.columns), LINES=str(size.lines))
    return {key: value for key, value in wanted.items() if key not in os.environ}
