"""How long the CLI takes to answer, and how long `ftl run` takes to its first step next to a plain
torchrun DDP script (bench/hand_ddp.py: the quickstart's model, data, batch and optimizer, no FTL).

- `ftl --help`, `ftl spec`, `ftl plan` on configs/quickstart.yaml, llama3-8b-full.yaml and
  llama3-70b-full.yaml: wall time of a new process each time (what a user waits for), best of REPEATS.
- Time to a first step, ROUNDS rounds alternating, median of each: `ftl run configs/quickstart.yaml
  train.max_steps=1 train.warmup_steps=0` from its start until rank 0 has logged step 1 in metrics.jsonl
  (what follows, the final checkpoint and the exported model, is reported as the whole run's time beside
  it), against `torchrun --nproc-per-node 2 bench/hand_ddp.py 1` from its start until it exits. The
  script's exit (a process-group teardown, no checkpoint) is counted against it: that favours ftl by the
  teardown's time, well under a second.

Usage: python bench/cli_latency.py [REPEATS] [ROUNDS]
Last line: RESULT help_s=.. plan_70b_s=.. first_step_ratio=..
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FTL = str(Path(sys.executable).parent / "ftl")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
CLI_COMMANDS = {
    "help": ["--help"],
    "spec": ["spec"],
    "plan_quickstart": ["plan", "configs/quickstart.yaml"],
    "plan_8b": ["plan", "configs/llama3-8b-full.yaml"],
    "plan_70b": ["plan", "configs/llama3-70b-full.yaml"],  # exits 2: it does not fit one node, as its comment says
}


def cli_seconds(argv: list[str], repeats: int) -> tuple[float, float]:
    """(best wall time, best CPU time: user + system of the process and its children). On a shared machine
    the CPU time moves less with the load than the wall time does."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([FTL, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode not in (0, 2) or "error:" in done.stderr:
            raise SystemExit(f"ftl {' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
        best = min(best, elapsed)
        best_cpu = min(best_cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return best, best_cpu


def ftl_first_step(work: Path) -> tuple[float, float]:
    """(seconds until step 1 is in metrics.jsonl, seconds until `ftl run` exits). `work`: a new folder."""
    run_dir = work / "ftl-run"
    metrics = run_dir / "metrics.jsonl"
    start = time.perf_counter()
    errors = open(work / "ftl-run.stderr", "w+")  # a file, not a pipe: nobody reads it while the run goes
    proc = subprocess.Popen(
        [FTL, "run", "configs/quickstart.yaml", "train.max_steps=1", "train.warmup_steps=0", f"output_dir={run_dir}", "--no-resume"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=errors,
    )
    first = None
    while proc.poll() is None:
        if first is None and metrics.is_file() and '"loss"' in metrics.read_text():
            first = time.perf_counter() - start
        time.sleep(0.02)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        errors.seek(0)
        raise SystemExit(f"ftl run failed ({proc.returncode}): {errors.read()[-2000:]}")
    errors.close()
    if first is None:  # step 1 and the exit within one poll
        first = total
    return first, total


def hand_first_step(work: Path) -> float:
    start = time.perf_counter()
    subprocess.run([*TORCHRUN, "bench/hand_ddp.py", "1", str(work / "hand.json")], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    measured = {name: cli_seconds(argv, repeats) for name, argv in CLI_COMMANDS.items()}
    cli = {name: wall for name, (wall, _) in measured.items()}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, argv in CLI_COMMANDS.items():
        print(f"ftl {' '.join(argv):40s} {cli[name]:6.2f} s wall, {measured[name][1]:6.2f} s CPU (best of {repeats})")

    ftl_first, ftl_total, hand = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):  # alternating, so a busy moment of the machine hits both
            work = Path(tmp) / f"round-{i}"
            work.mkdir()
            first, total = ftl_first_step(work)
            ftl_first.append(first)
            ftl_total.append(total)
            hand.append(hand_first_step(work))
    f, t, h = statistics.median(ftl_first), statistics.median(ftl_total), statistics.median(hand)
    print(f"ftl run, 1 step:     first step after {f:6.2f} s, exits after {t:6.2f} s (median of {rounds}: {_list(ftl_first)} / {_list(ftl_total)})")
    print(f"hand DDP, 1 step:    exits after {h:6.2f} s (median of {rounds}: {_list(hand)})")
    print(f"first step ftl/hand: {f / h:.2f} (whole 1-step run: {t / h:.2f})")
    print(f"RESULT help_s={cli['help']:.2f} plan_70b_s={cli['plan_70b']:.2f} first_step_ratio={f / h:.2f}")


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
