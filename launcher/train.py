"""The per-rank entry that torchrun starts: `python -m launcher.train --run-dir RUN_DIR`.

The loop is launcher/trainer.py; this module only hosts it (launcher/entries.py: signals, exit codes).
Before anything heavy is imported (torch takes seconds), the rank asks for SIGTERM when torchrun dies
and installs its stop handlers and the stack-dump signal: a signal in that window is not lost.
"""

import faulthandler
import os
import signal
import sys

from launcher.stop import SignalStop, signal_when_parent_dies

if __name__ == "__main__":
    parent = os.getppid()
    signal_when_parent_dies()  # torchrun killed outright: save and exit rather than train on unsupervised
    stop = SignalStop(parent_pid=parent)  # a stop request from here on is a checkpoint, not a lost job
    # `kill -USR1 <rank pid>` prints every thread's stack: the first thing to look at in a hung job.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from launcher.entries import main

    sys.exit(main(stop=stop))
