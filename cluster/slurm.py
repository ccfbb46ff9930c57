"""Slurm backend. Host side: `render_sbatch` turns the plan into the batch script (pure: the template in
slurm/ftl.sbatch.j2 filled with concrete values), `submit` writes it into the run dir and calls
`sbatch --parsable`; `job_state` and `cancel` ask Slurm. Job side, run by that script inside the
allocation: `step` (one task per node: torchrun for the node's ranks, stop signals passed on, FTL's exit
code) and `after` (the ledger entry and the requeue decision).

Requeue protocol (submitit's, with separate budgets): a pre-empted step (exit 75, checkpoint saved) is
requeued every time; a failed one while fewer than `max_failures` failures are in the ledger; never one
that finished, stopped on a user error (exit 2) or was cancelled (`ftl cancel`, `scancel`); and never after `max_stalled` restarts in a row that
ended at the same checkpoint (no progress). `slurm-ledger.jsonl` in the run dir keeps one line per
submission and per end of an attempt: job id, restart, cause, step reached, decision.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

from cluster import ledger
from launcher.errors import FTLError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "ftl.sbatch.j2"
SCRIPT_FILE = "job.sbatch"
LEDGER_FILE = "slurm-ledger.jsonl"
LOG_PATTERN = "slurm-%j.out"  # relative: sbatch runs in the run dir
ARRAY_LOG_PATTERN = "point-%a/slurm-%A_%a.out"  # a sweep's: each task's log in its point's run dir
MIN_GRACE_S = 120  # USR2 this long before the time limit at least: a step boundary plus a checkpoint
OUTCOME_WAIT_S = 30  # how long a node's task waits for rank 0's outcome.json after its torchrun failed
# Slurm values go into `#SBATCH` lines, which sbatch parses itself (no shell): plain tokens only.
_TOKEN = re.compile(r"^[A-Za-z0-9_.,:&|!*()\[\]%=+@/-]+$")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^(UNLIMITED|INFINITE)$")


@dataclass(frozen=True)
class SlurmOptions:
    """What `ftl submit --to slurm` takes besides the plan (which decides nodes and ranks per node)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # Slurm's time format: MM, HH:MM:SS, D-HH:MM:SS
    constraint: str | None = None
    exclusive: bool = False
    container_image: str | None = None  # pyxis `--container-image` for the step
    cpus_per_task: int | None = None  # default: 8 per GPU, or one per CPU rank
    max_failures: int = 2  # failed attempts after which the job is no longer requeued
    max_stalled: int = 3  # attempts in a row ending at the same checkpoint after which it is not either


def render_sbatch(
    run_dir: Path, nodes: int, ranks_per_node: int, device: str, save_grace_s: int, options: SlurmOptions,
    python: str = sys.executable, array: str | None = None,
) -> str:
    """The batch script for the prepared run dir (its spec.yaml and plan.json decide what runs). With
    `array` (e.g. "0-3%2"), `run_dir` is a sweep's dir and task i runs `run_dir/point-i`."""
    extra = []
    for flag, value in (("partition", options.partition), ("account", options.account), ("qos", options.qos), ("constraint", options.constraint)):
        if value is not None:
            if not _TOKEN.match(value):
                raise FTLError(
                    f"`--{flag} {value!r}` is not a Slurm {flag} name: it may hold letters, digits and _.,:&|!*()[]%=+@/- "
                    "only (no spaces or quotes). Check the name with `sinfo` / `sacctmgr show assoc`."
                )
            extra.append(f"--{flag}={value}")
    if options.exclusive:
        extra.append("--exclusive")
    if options.time is not None and not _TIME.match(options.time):
        raise FTLError(f"`--time {options.time!r}` is not a Slurm time limit; use MM, HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00).")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    template = env.from_string(TEMPLATE.read_text())
    return template.render(
        job_name=re.sub(r"[^A-Za-z0-9_.-]", "_", Path(run_dir).name)[:64] or "ftl",
        nodes=nodes,
        nproc_per_node=ranks_per_node,
        gpus_per_node=ranks_per_node if device == "cuda" else 0,
        cpus_per_task=options.cpus_per_task or (8 * ranks_per_node if device == "cuda" else ranks_per_node),
        time=options.time,
        log_pattern=ARRAY_LOG_PATTERN if array else LOG_PATTERN,
        array=array,
        grace_s=max(MIN_GRACE_S, save_grace_s),
        extra=extra,
        container_image=options.container_image,
        run_dir=str(Path(run_dir).resolve()),
        python=python,
        max_failures=options.max_failures,
        max_stalled=options.max_stalled,
    )


def submit(run_dir: Path, script: str, points: int = 0) -> str:
    """Write the script into the run dir, submit it from there, record it in the ledger (a sweep's: in
    each point's, with the task's own id); the job id."""
    path = Path(run_dir) / SCRIPT_FILE
    path.write_text(script)
    result = _slurm(["sbatch", "--parsable", str(path)], cwd=run_dir)
    job_id = result.stdout.strip().split(";")[0]
    if points:
        for index in range(points):
            append_ledger(Path(run_dir) / f"point-{index}", {"event": "submitted", "job_id": f"{job_id}_{index}"})
    else:
        append_ledger(run_dir, {"event": "submitted", "job_id": job_id})
    return job_id


def job_state(job_id: str) -> dict[str, str]:
    """Slurm's view of a job (`scontrol show job`): JobState, Reason, RunTime, Restarts, ...; {} if Slurm
    no longer knows it."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    first = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    return parse_job_line(first)


def parse_job_line(line: str) -> dict[str, str]:
    """`scontrol show job -o`'s one line as fields. A value may hold spaces (a WorkDir or StdOut under a
    folder named "my run"), so fields split only at a space followed by the next `Key=`."""
    return dict(field.split("=", 1) for field in re.split(r" (?=[A-Z][A-Za-z/:]*=)", line.strip()) if "=" in field)


def cancel(run_dir: Path, job_id: str) -> None:
    """Recorded first: the job's own `after` must see it and not take the ending for a pre-emption."""
    append_ledger(run_dir, {"event": "cancelled", "job_id": job_id})
    _slurm(["scancel", job_id])


def read_ledger(run_dir: Path) -> list[dict]:
    return ledger.read_ledger(Path(run_dir) / LEDGER_FILE)


def append_ledger(run_dir: Path, entry: dict) -> None:
    ledger.append_ledger(Path(run_dir) / LEDGER_FILE, entry)


# -- the job side --------------------------------------------------------------------------------------
def step(args: argparse.Namespace) -> int:
    """One node's part: torchrun for this node's ranks, meeting the other nodes at the rendezvous."""
    from cluster.local import job_env, run_local, torchrun_argv
    from launcher.job import RankJob
    from launcher.outcome import clear_outcome, launcher_exit_code, read_outcome

    job = RankJob.read(args.run_dir)
    if os.environ.get("SLURM_NODEID", "0") == "0":
        clear_outcome(args.run_dir)  # this attempt's outcome, not the one before the requeue
    argv = torchrun_argv(
        args.run_dir, args.nproc_per_node, args.nnodes, args.rdzv_endpoint, run_id=args.rdzv_id,
        shutdown_timeout_s=job.plan.save_grace_s,
    )
    code = run_local(argv, env=job_env(job.plan.request.device, dict(os.environ), job.plan.request.gpus_per_node))
    result = read_outcome(args.run_dir)
    deadline = time.monotonic() + OUTCOME_WAIT_S
    while code != 0 and result is None and args.nnodes > 1 and time.monotonic() < deadline:
        # Rank 0 may be on another node, still writing how the job ended (a pre-emption's outcome comes
        # right after the collective save). Exiting non-zero first would make srun kill that node's task
        # (--kill-on-bad-exit) and turn a clean pre-emption into a failure.
        time.sleep(0.5)
        result = read_outcome(args.run_dir)
    return launcher_exit_code(code, result)


def after(args: argparse.Namespace) -> int:
    """Record how this attempt ended and requeue the job if the protocol says so (module doc)."""
    from launcher.outcome import EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR

    run_dir, code = args.run_dir, args.exit_code
    ledger = read_ledger(run_dir)
    ends = [e for e in ledger if e.get("event") == "ended"]
    reached = checkpoint_step(run_dir)
    cause = {EXIT_OK: "completed", EXIT_PREEMPTED: "preempted", EXIT_USER_ERROR: "user_error"}.get(code, "failed")
    failures = sum(e["cause"] == "failed" for e in ends) + (cause == "failed")
    stalled = 0
    for earlier in reversed(ends):  # restarts in a row that ended at this same checkpoint
        if earlier.get("step") != reached:
            break
        stalled += 1
    job_id = requeue_id()
    # Cancelled by the user (`ftl cancel`, or `scancel`, which Slurm shows at once): the SIGTERM that
    # ended the step was not a pre-emption.
    if any(e.get("event") == "cancelled" and e.get("job_id") == job_id for e in ledger) or job_state(job_id).get("JobState") == "CANCELLED":
        decision = "stop: cancelled"
    elif cause in ("completed", "user_error"):
        decision = "stop"
    elif stalled >= args.max_stalled:
        decision = f"stop: {stalled + 1} attempts in a row ended at checkpoint step {reached} (no progress)"
    elif cause == "failed" and failures >= args.max_failures:
        decision = f"stop: failure budget spent ({failures} failures, --max-failures {args.max_failures})"
    else:
        decision = "requeue"
    append_ledger(run_dir, {
        "event": "ended", "job_id": job_id, "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "cause": cause, "exit_code": code, "step": reached, "decision": decision,
    })
    print(f"ftl: attempt ended: {cause} (exit {code}), checkpoint step {reached}; {decision}", flush=True)
    if cause == "completed":
        # Once per job, on the batch host, after every node's ranks have exited: the checkpoint is complete and
        # one process reads it whatever the strategy (launcher/export.py).
        try:
            from launcher.export import write_final
        except ImportError as exc:  # a batch host outside the job's container: the run itself succeeded
            print(f"ftl: the final model was not written ({exc}); run `ftl export {run_dir} --to {run_dir / 'final'}`", flush=True)
        else:
            write_final(run_dir, say=lambda line: print(f"ftl: {line}", flush=True))
    if decision == "requeue":
        _slurm(["scontrol", "requeue", job_id])
        return EXIT_OK
    return code


def requeue_id() -> str:
    """The id `scontrol requeue` needs: an array task's own id, or the job's."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


def checkpoint_step(run_dir: Path) -> int:
    """The step of the checkpoint a restart resumes from (0: none)."""
    from launcher.checkpoint import LATEST, checkpoint_root

    try:
        name = (checkpoint_root(Path(run_dir)) / LATEST).read_text().strip()
    except OSError:
        return 0
    match = re.fullmatch(r"step-(\d+)", name)
    return int(match.group(1)) if match else 0


def _slurm(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError:
        raise FTLError(f"`{argv[0]}` is not on PATH: this machine is not a Slurm client. Run `ftl submit` on a login node.") from None
    if result.returncode != 0:
        raise FTLError(f"`{' '.join(argv)}` failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.slurm", description="FTL's job side under Slurm (run by job.sbatch).")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step", help="this node's torchrun")
    s.add_argument("--run-dir", type=Path, required=True)
    s.add_argument("--nnodes", type=int, required=True)
    s.add_argument("--nproc-per-node", type=int, required=True)
    s.add_argument("--rdzv-endpoint", required=True)
    s.add_argument("--rdzv-id", required=True)
    s.set_defaults(func=step)
    a = sub.add_parser("after", help="record the attempt, requeue if due")
    a.add_argument("--run-dir", type=Path, required=True)
    a.add_argument("--exit-code", type=int, required=True)
    a.add_argument("--max-failures", type=int, default=2)
    a.add_argument("--max-stalled", type=int, default=3)
    a.set_defaults(func=after)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
