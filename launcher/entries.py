"""The two ways ranks are hosted, around one trainer (launcher/trainer.py):

- `run_rank(run_dir, stop)`, the function entry: runs in any thread, on the process group that exists
  (Ray Train creates one) or on one it creates from torchrun's environment; stops when the `StopSource`
  says so; returns a `Result`. Ray's per-worker function and tests call it.
- `main()`, the torchrun entry (`python -m launcher.train --run-dir RUN_DIR`): installs the POSIX signal
  handlers (main thread), calls `run_rank`, and maps the outcome to the exit code (launcher/outcome.py).
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path
from typing import Callable

from launcher.checkpoint import LATEST, checkpoint_root
from launcher.errors import FTLError
from launcher.job import RankJob
from launcher.outcome import EXIT_USER_ERROR, Outcome, Result, write_outcome
from launcher.planner import replan_for_world
from launcher.quiet import hide_library_warnings
from launcher.rank_env import RankEnv
from launcher.rank_log import rank_log_header, rank_log_path, tee_output
from launcher.runtime import RankRuntime, check_precision, resolve_device
from launcher.stop import SignalStop, StopSource
from launcher.trainer import Trainer


def run_rank(
    run_dir: Path,
    stop: StopSource,
    env: RankEnv | None = None,
    before_publish: Callable[[Path], None] | None = None,
    after_publish: Callable[[Path, int], None] | None = None,
) -> Result:
    """Run this rank's part of the job in `run_dir` exactly as planned there. Collective: every rank calls
    it. Leaves a process group it did not create alive (and destroys the ones it did)."""
    job = RankJob.read(run_dir)
    env = env or RankEnv.from_env()
    hide_library_warnings()
    with tee_output(rank_log_path(job.run_dir, env.rank), rank_log_header(env.rank, env.world_size)):  # RUN_DIR/logs/rank-N.log
        return _run_job(job, env, stop, before_publish, after_publish)


def _run_job(job: RankJob, env: RankEnv, stop: StopSource, before_publish: Callable | None, after_publish: Callable | None) -> Result:
    try:
        device, plan = plan_for_world(job, env)  # before anything is written
    except FTLError as exc:
        if env.is_main:
            write_outcome(job.run_dir, Result(Outcome.ERROR, 0, detail=str(exc)))
        raise
    planned = job.plan.request
    runtime = RankRuntime.start(env, device, planned.precision, job.spec.train.collective_timeout_s)
    trainer = Trainer(job, plan, runtime, stop, before_publish=before_publish, after_publish=after_publish)
    try:
        result = trainer.run()
        if env.is_main:
            write_outcome(job.run_dir, result)
        return result
    except BaseException as exc:
        if isinstance(exc, FTLError) and env.is_main:  # the launcher turns this into its exit code 2
            write_outcome(job.run_dir, Result(Outcome.ERROR, trainer.state.step, detail=str(exc)))
        # The traceback's frames hold the model and its DDP wrapper: free them before the groups go.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        trainer.close()
        # Tear down only after the trainer's objects are gone: a DDP reducer freed after the gloo group was
        # destroyed joins the group's threads in its destructor and can hang forever (seen here).
        gc.collect()
        runtime.close()


def plan_for_world(job: RankJob, env: RankEnv) -> tuple:
    """(device, plan) for the ranks that started: the plan as written, or re-planned openly for another
    world size when a checkpoint is there to resume from."""
    planned = job.plan.request
    device = resolve_device(planned.device, env.cuda_index, str(job.run_dir / "plan.json"))
    check_precision(device, planned.precision, str(job.run_dir / "plan.json"))
    plan = job.plan
    if env.world_size != planned.world_size:
        if not (checkpoint_root(job.run_dir) / LATEST).is_file():
            raise FTLError(
                f"The plan {job.run_dir / 'plan.json'} was made for {planned.world_size} ranks ({planned.nodes} node(s) x "
                f"{planned.gpus_per_node}), but {env.world_size} ranks started. Ranks run the plan they are given: "
                f"re-plan for this world with `ftl run JOB.yaml --nodes N --gpus G`, which writes a new plan."
            )
        # Resuming on another world size (a requeue on fewer nodes, Ray restarting fewer workers): re-plan openly,
        # keeping the strategy so its checkpoint loads; the trainer logs a `replanned` event.
        plan = replan_for_world(job.plan, max(env.world_size // env.local_world_size, 1), env.local_world_size)
    elif planned.nodes > 1 and env.local_world_size != planned.gpus_per_node and env.local_rank == 0 and plan.strategy.startswith("fsdp2"):
        # Ray places workers where resources are free: HSDP's shard groups (planned per node) then span nodes.
        # Correct, only slower; say so once per node.
        print(
            f"warning: this node runs {env.local_world_size} ranks, the plan {planned.gpus_per_node} per node: {plan.strategy}'s "
            "shard groups span nodes (correct, but their all-gathers cross the network). Give the cluster nodes of "
            f"{planned.gpus_per_node} GPUs, or plan for the nodes it has (`--gpus`).",
            file=sys.stderr, flush=True,
        )
    return device, plan


def main(argv: list[str] | None = None, stop: SignalStop | None = None) -> int:
    """The torchrun entry; launcher/train.py installs `stop` before importing this module."""
    parser = argparse.ArgumentParser(prog="launcher.train", description="FTL per-rank training entry (started by torchrun).")
    parser.add_argument("--run-dir", required=True, type=Path, help="the run dir `ftl run` prepared (spec.yaml, plan.json)")
    args = parser.parse_args(argv)
    stop = stop or SignalStop()
    env = RankEnv.from_env()
    try:
        return run_rank(args.run_dir, stop, env).exit_code
    except FTLError as exc:
        line = f"error (rank {env.rank}): {exc}"
        if env.local_rank == 0:  # once per node on the terminal: a node's ranks meet the same mistake (rank 0's is in outcome.json)
            print(line, file=sys.stderr)
        else:  # the others only in their own log (RUN_DIR/logs/rank-N.log), where a rank's different reason is kept
            try:
                with open(rank_log_path(args.run_dir, env.rank), "a") as log:
                    log.write(line + "\n")
            except OSError:
                print(line, file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        stop.close()
