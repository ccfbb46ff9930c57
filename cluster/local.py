"""Run a job on this machine through torchrun (`torch.distributed.run`), forwarding signals.

`torchrun_argv` only renders the command (pure; shown by `ftl plan`); `run_local` executes it. The
command is torchrun's own, started through cluster/torchrun.py, which only drops torchrun's failure
report when the ranks have already explained the exit (a user error, a pre-emption).

Signals: torchrun forwards to its workers only the signals named in `--signals-to-handle` (default
SIGTERM, SIGINT, SIGHUP, SIGQUIT); any other one it does not handle kills torchrun itself and leaves
the ranks running as orphans. FTL passes its documented stop signals (launcher/stop.py) and a
shutdown timeout long enough for the ranks to write their checkpoint before torchrun SIGKILLs them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from launcher.stop import STOP_SIGNALS, signal_when_parent_dies

# torchrun's own default; FTL's stop signals must be handled too. SIGQUIT stays with torchrun's meaning.
TORCHRUN_SIGNALS = ",".join(s.name for s in (*STOP_SIGNALS, signal.SIGQUIT))


def torchrun_argv(
    run_dir: Path,
    nproc_per_node: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    run_id: str = "ftl",
    shutdown_timeout_s: int = 120,
    python: str = sys.executable,
) -> list[str]:
    """The exact command `ftl run` executes. One node: `--standalone` (torchrun picks a free port).
    Several nodes: the same command on each machine, meeting at a c10d rendezvous endpoint."""
    argv = [python, "-m", "cluster.torchrun", "--nproc-per-node", str(nproc_per_node)]
    if nnodes == 1:
        argv.append("--standalone")
    else:
        endpoint = rdzv_endpoint or "$MASTER_ADDR:29500"
        argv += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
    argv += ["--signals-to-handle", TORCHRUN_SIGNALS, "--shutdown-timeout", str(shutdown_timeout_s)]
    argv += ["--max-restarts", "0", "-m", "launcher.train", "--run-dir", str(run_dir)]
    return argv


def job_env(device: str, base: dict[str, str], ranks_per_node: int = 1) -> dict[str, str]:
    """The environment the ranks get: `base` plus what makes the device choice explicit to libraries.
    DeepSpeed otherwise probes for accelerators itself; on a CPU job it must pick its CPU accelerator."""
    env = dict(base)
    if ranks_per_node > 1:  # torchrun sets 1 itself then (and prints a banner saying so): the same value, quietly
        env.setdefault("OMP_NUM_THREADS", "1")
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env["GLIBC_TUNABLES"] = with_tunable(env.get("GLIBC_TUNABLES", ""), *NON_TEMPORAL_THRESHOLD)
    return env


# glibc's memcpy bypasses the caches (non-temporal stores) only for copies above a threshold derived
# from the L3 size the CPU reports; on a VM reporting a huge L3 (480 MB on FTL's CI machines, which
# puts the threshold at 190 MB) tensor copies never get there, and the host copy a background
# checkpoint blocks training for runs at 7 instead of 11 GB/s (bench/checkpoint.py). 1 MiB is about
# what glibc derives on usual hardware; training steps measured the same with it (1.27 vs 1.28 s,
# 25M-param DDP). Other CPUs ignore the name.
NON_TEMPORAL_THRESHOLD = ("glibc.cpu.x86_non_temporal_threshold", "0x100000")


def with_tunable(tunables: str, name: str, value: str) -> str:
    """`GLIBC_TUNABLES` with `name` set to `value` unless the user already set that one."""
    entries = [entry for entry in tunables.split(":") if entry]
    if any(entry.split("=", 1)[0] == name for entry in entries):
        return tunables
    return ":".join([*entries, f"{name}={value}"])


# What `ftl run` passes on to the job: the stop signals (torchrun handles them, see above).
FORWARDED_SIGNALS = STOP_SIGNALS


def run_local(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Run `argv` (torchrun), pass the first stop signal on to it, and return its exit code (128+N if
    killed by N).

    Only the first: torchrun answers each stop signal by shutting its workers down again, and a third
    one escapes its wait for them, leaving ranks mid-save (torch.distributed.elastic.agent.server.api).
    Slurm sends USR2 and then SIGTERM to every process of a step, and an impatient Ctrl-C repeats.
    A signal this process ignores (SIGHUP under nohup) stays ignored. The child gets a session of its
    own, so a terminal's Ctrl-C reaches it once (through this process); and it is told to receive
    SIGTERM if this process dies, so even `kill -9` of `ftl run` ends in a checkpoint rather than an
    orphaned job. SIGUSR1 (print every thread's stack) goes to the ranks, never to torchrun, which
    SIGUSR1 would kill."""
    started: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if pending:
            print(f"ftl: {signal.Signals(signum).name} ignored: the job is already stopping (checkpoint in progress)", file=sys.stderr)
            return
        pending.append(signum)
        if started and started[0].poll() is None:
            started[0].send_signal(signum)

    def stacks(_signum: int, _frame: object) -> None:
        for pid in children_of(started[0].pid) if started else []:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, stacks)
    try:
        child = subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True, preexec_fn=signal_when_parent_dies)
        started.append(child)
        if pending:  # a stop asked for while the child was being started
            child.send_signal(pending[0])
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux); [] elsewhere."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found
