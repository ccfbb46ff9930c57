"""A torchrun entry for tests: the production rank (launcher.entries.run_rank) with every checkpoint held
in `step-N.tmp/` for DELAY seconds before it is published, so a test can kill the job mid-save. What a
test needs is passed in from outside (`before_publish`), not read from the environment by production
code. Usage: torchrun ... -m tests.hosts.slow_publish_rank RUN_DIR DELAY_S [FROM_STEP]: with FROM_STEP, only
the saves of that step and later are held (earlier ones publish at once, as in production)."""

import sys
import time
from pathlib import Path

from launcher.entries import run_rank
from launcher.stop import SignalStop

if __name__ == "__main__":
    run_dir, delay = Path(sys.argv[1]), float(sys.argv[2])
    from_step = int(sys.argv[3]) if len(sys.argv) > 3 else 0

    def hold(tmp: Path) -> None:  # tmp: checkpoints/step-N.tmp
        if int(tmp.name.removeprefix("step-").removesuffix(".tmp")) >= from_step:
            time.sleep(delay)

    result = run_rank(run_dir, SignalStop(), before_publish=hold)
    sys.exit(result.exit_code)
