"""Run a job on this machine through torchrun (`torch.distributed.run`), forwarding signals.

`torchrun_argv` only renders the command (pure; shown by `ftl plan`); `run_local` executes it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

# Signals a user or scheduler sends to `ftl run` that must reach the ranks (through torchrun, which
# forwards them to its workers): Ctrl-C, kill, and Slurm's pre-emption warning.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def torchrun_argv(
    spec_path: Path,
    nproc_per_node: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    run_id: str = "ftl",
    python: str = sys.executable,
) -> list[str]:
    """The exact command `ftl run` executes. One node: `--standalone` (torchrun picks a free port).
    Several nodes: the same command on each machine, meeting at a c10d rendezvous endpoint."""
    argv = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node)]
    if nnodes == 1:
        argv.append("--standalone")
    else:
        endpoint = rdzv_endpoint or "$MASTER_ADDR:29500"
        argv += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
    argv += ["--max-restarts", "0", "-m", "launcher.train", "--spec", str(spec_path)]
    return argv


def job_env(device: str, base: dict[str, str]) -> dict[str, str]:
    """The environment the ranks get: `base` plus what makes the device choice explicit to libraries.
    DeepSpeed otherwise probes for accelerators itself; on a CPU job it must pick its CPU accelerator."""
    env = dict(base)
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


def run_local(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Run `argv`, forward the signals above to it, and return its exit code (128+N if killed by N)."""
    child = subprocess.Popen(argv, env=env, cwd=cwd)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code
