"""Ray, job side: FTL's one training loop inside Ray Train (Train V2's `TorchTrainer`).

`fit(run_dir)` is what a Ray job's entrypoint runs (`ftl run-ray`): it turns the run dir's plan into a
`TorchTrainer` (workers = the plan's ranks) and maps how the run ended to FTL's exit codes. Each worker
runs `launcher.entries.run_rank`, the function entry torchrun's ranks run too, on the process group
Ray created, in the non-main thread Ray runs it in (so stops are polled, never signals).

The Ray experiment dir *is* the FTL run dir (`storage_path` = its parent, `name` = its name): FTL
writes its own sharded checkpoints there and registers each with `ray.train.report(...,
checkpoint_upload_mode=NO_UPLOAD)` only once every shard and the manifest are complete, so Ray never
copies or half-registers one (ray#41700). A restarted worker group resumes from FTL's `latest`, with the
data position and RNG exact (the trainer state is part of the checkpoint).

Stops: `ftl cancel` writes `stop-request` into the run dir (Ray has no signal for a graceful stop:
`ray job stop` SIGKILLs after 3 s): the ranks save at the next step boundary and end pre-empted (exit
75). Ray's notice that a node is about to be reclaimed (`ray.train.get_preemption_info`) makes the ranks
save at once and train on: Ray then restarts the group from that checkpoint, counted against
`max_preemption_failures`, never against `max_failures`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import FTLError
from launcher.outcome import EXIT_PREEMPTED, EXIT_USER_ERROR, Outcome, Result, clear_outcome, read_outcome

if TYPE_CHECKING:
    from launcher.job import RankJob

STOP_FILE = "stop-request"  # written by `ftl cancel`; its text is the reason
CONTROLLER_RETRIES = 2  # worker-group starts (60 s each) that may fail beyond max_failures while a node is replaced
PREEMPTION_POLL_S = 1.0  # how often the ranks ask Ray about pre-emption; drain windows are tens of seconds


class RayStop:
    """The stop sources of a Ray worker, polled at step boundaries.

    `requested()`: the run dir's stop file (read at most once a second per rank; the trainer agrees
    across ranks). `save_requested()`: Ray's pre-emption notice. `ray.train.get_preemption_info` is a
    barrier over Ray's actors that every worker must call equally often, so the ranks first agree (one
    tiny all-reduce on the default group, whose CPU backend is gloo) that a poll is due by the clock."""

    def __init__(self, run_dir: Path, poll_s: float = PREEMPTION_POLL_S) -> None:
        self.flag = run_dir / STOP_FILE
        self.poll_s = poll_s
        self.reason: str | None = None
        self._flag_checked = 0.0
        self._preemption_polled = time.monotonic()
        self._preemption_seen = False

    def requested(self) -> str | None:
        now = time.monotonic()
        if self.reason is None and now - self._flag_checked >= 1.0:
            self._flag_checked = now
            if self.flag.is_file():
                self.reason = self.flag.read_text().strip() or "stop requested"
        return self.reason

    def save_requested(self) -> str | None:
        import ray.train
        import torch
        import torch.distributed as dist

        if self._preemption_seen:  # one just-in-time checkpoint per notice; Ray restarts the group after it
            return None
        due = torch.tensor([int(time.monotonic() - self._preemption_polled >= self.poll_s)])
        dist.all_reduce(due, op=dist.ReduceOp.MAX)
        if not due.item():
            return None
        self._preemption_polled = time.monotonic()
        info = ray.train.get_preemption_info()  # the same value on every worker (Ray broadcasts rank 0's)
        if info is None:
            return None
        self._preemption_seen = True
        left = f", {max(info.deadline_ms / 1000 - time.time(), 0):.0f} s before the deadline" if info.deadline_ms else ""
        return f"Ray reports node(s) {', '.join(n[:12] for n in info.preempted_node_ids)} (ranks {info.preempted_ranks}) about to be pre-empted{left}"

    def close(self) -> None:
        pass


def report_checkpoint(path: Path, step: int) -> None:
    """Register a finished FTL checkpoint with Ray (every worker calls this at the same point: it is a
    barrier). Only rank 0 names the dir; Ray merges nothing and copies nothing (NO_UPLOAD)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    from launcher.metrics import read_metrics

    rank = ray.train.get_context().get_world_rank()
    metrics: dict = {"step": step}
    if rank == 0:
        for record in read_metrics(path.parents[1]):
            metrics.update({k: v for k, v in record.items() if k in ("loss", "val_loss", "accuracy") and isinstance(v, (int, float))})
    checkpoint = ray.train.Checkpoint.from_directory(str(path)) if rank == 0 else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def worker(config: dict) -> None:
    """The per-worker function: one FTL rank on Ray's process group."""
    import torch
    import torch.distributed as dist

    from launcher.entries import run_rank
    from launcher.outcome import write_outcome
    from launcher.rank_env import RankEnv

    run_dir = Path(config["run_dir"])
    env = RankEnv.from_env()  # Ray sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE
    if torch.cuda.is_available():
        # Ray's workers on a node share one CUDA_VISIBLE_DEVICES, sorted as text ("0,1,10,11,2,..."): the GPU a
        # worker was given is Ray's answer, not its local rank's position in that list.
        from ray.train.torch import get_device

        env = dataclasses.replace(env, device_index=get_device().index)
    # A restart after a mistake in the job (outcome.json says so; the driver cleared it before this fit):
    # the same mistake would come back, so every worker returns and the driver exits 2 with it.
    ended = read_outcome(run_dir)
    failed = torch.tensor([int(ended is not None and ended.outcome is Outcome.ERROR)])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        return
    try:
        # Every worker must see the run dir the driver wrote (checkpoints are shared there): agree first, so a
        # node without it fails every rank at once instead of leaving the others in a collective.
        seen = torch.tensor([int((run_dir / "plan.json").is_file())])
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
        if not seen.item():
            raise FTLError(
                f"Some Ray worker cannot see the run dir {run_dir} (no plan.json there). FTL's checkpoints and plan live in "
                "`output_dir`, which every Ray node must mount at the same path (a shared filesystem: NFS, Lustre, a "
                "Kubernetes volume). Set `output_dir` to such a path."
            )
        run_rank(run_dir, RayStop(run_dir), env, after_publish=report_checkpoint)
    except FTLError as exc:
        # A mistake in the job. It may be this rank's alone (a node without a GPU), with the others waiting in a
        # collective: raising ends the worker group at once. The restart then finds outcome.json and returns.
        print(f"error (rank {env.rank}): {exc}", file=sys.stderr, flush=True)
        if run_dir.is_dir() and read_outcome(run_dir) is None:  # rank 0's own (with its step) wins
            write_outcome(run_dir, Result(Outcome.ERROR, 0, detail=str(exc)))
        raise


def build_trainer(job: RankJob, max_failures: int, cpus_per_worker: float | None = None, callbacks: tuple = ()):
    """The `TorchTrainer` that runs a prepared run dir's plan (`job`: its `RankJob`): workers = the plan's
    ranks, Ray's experiment dir = the run dir. `fit` runs one; each trial of a Ray sweep runs one too
    (cluster/ray_sweep.py, with Tune's report callback in `callbacks`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray import worker_resources
    from launcher.runtime import default_group_backend

    request = job.plan.request
    resources = worker_resources(request.device, cpus_per_worker)
    forget_ray_checkpoints(job.run_dir)
    return TorchTrainer(
        worker,
        train_loop_config={"run_dir": str(job.run_dir)},
        scaling_config=ray.train.ScalingConfig(num_workers=request.world_size, use_gpu=request.device == "cuda", resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            storage_path=str(job.run_dir.parent),
            name=job.run_dir.name,
            # Starting the worker group is the controller's part: when it cannot (a node gone and not replaced),
            # Ray retries every minute for ever by default. FTL waits a couple of minutes more than the workers'
            # budget for a replacement node, then ends the job with the reason.
            # Ray counts both limits over the whole run, not per incident; -1 is no limit for both.
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=-1 if max_failures < 0 else max_failures + CONTROLLER_RETRIES
            ),
            # FTL keeps and prunes its own checkpoints (`checkpoint.keep`); Ray only keeps the pointers.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            callbacks=list(callbacks),
        ),
        torch_config=TorchConfig(backend=default_group_backend(request.device), timeout_s=int(job.spec.train.collective_timeout_s)),
    )


def forget_ray_checkpoints(run_dir: Path) -> None:
    """Before a new attempt: drop Ray's record of the checkpoints reported so far. FTL resumes from its own
    `latest` and prunes old checkpoints itself (`checkpoint.keep`); Ray's record still names the pruned
    ones and refuses to start a run over them ("a reference to a checkpoint that does not exist anymore")."""
    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as name
    except ImportError:  # internal: the name Ray 2.5x-2.6x use
        name = "checkpoint_manager_snapshot.json"
    (run_dir / name).unlink(missing_ok=True)


def fit(run_dir: Path, max_failures: int, cpus_per_worker: float | None = None) -> int:
    """Run the prepared run dir's plan on the Ray cluster this process is connected to (a Ray job's
    entrypoint runs it on the head). Returns FTL's exit code."""
    import ray.train

    from cluster.ray import worker_resources
    from launcher.job import RankJob

    run_dir = run_dir.resolve()
    job = RankJob.read(run_dir)
    # The driver needs nothing from its working dir past this point; a node sharing this one's session dir
    # (two nodes on one host, as in tests) unpacks the job's package again over it, deleting the cwd.
    os.chdir(run_dir)
    clear_outcome(run_dir)  # only this fit's workers may write the outcome the exit code comes from
    request = job.plan.request
    resources = worker_resources(request.device, cpus_per_worker)
    trainer = build_trainer(job, max_failures, cpus_per_worker)
    print(
        f"FTL on Ray: {job.plan.strategy} x {request.world_size} workers ({request.device}, {resources}), run dir {run_dir}, "
        f"max_failures={max_failures}",
        flush=True,
    )
    start = time.monotonic()
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        ended = read_outcome(run_dir)
        if ended is not None and ended.outcome is Outcome.ERROR:  # a mistake in the job, found by a rank
            print(f"error: {ended.detail}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        first = str(exc).strip().splitlines()
        print(
            f"FTL on Ray: training failed after {time.monotonic() - start:.0f} s and {max_failures} restart(s) allowed "
            f"(`--max-failures`): {' '.join(first[:3])[:600]}\nThe last complete checkpoint stays in {run_dir / 'checkpoints'}; "
            "`ftl submit` again resumes from it.",
            file=sys.stderr, flush=True,
        )
        return 1
    result = read_outcome(run_dir)
    if result is None:
        print(f"FTL on Ray: the workers returned without writing {run_dir / 'outcome.json'}", file=sys.stderr, flush=True)
        return 1
    print(f"FTL on Ray: {result.outcome.value} at step {result.step}" + (f"; checkpoint {result.checkpoint}" if result.checkpoint else ""), flush=True)
    if result.outcome is Outcome.PREEMPTED:
        print(f"FTL on Ray: stopped on request ({result.detail}); resubmit to continue (exit {EXIT_PREEMPTED})", flush=True)
    if result.outcome is Outcome.ERROR:
        print(f"error: {result.detail}", file=sys.stderr, flush=True)
    if result.exit_code == 0:
        # Here, in the job's driver after the worker group is gone: the checkpoint is complete and one process
        # reads it whatever the strategy (launcher/export.py), with no process group to share or tear down.
        from launcher.export import write_final

        write_final(run_dir, say=lambda line: print(f"FTL on Ray: {line}", flush=True))
    return result.exit_code


def request_stop(run_dir: Path, reason: str) -> None:
    """Ask a running job's ranks to save at the next step boundary and end (`ftl cancel`)."""
    (run_dir / STOP_FILE).write_text(reason + "\n")


def clear_stop(run_dir: Path) -> None:
    """Before a (re)submission: an old request must not stop the new attempt."""
    (run_dir / STOP_FILE).unlink(missing_ok=True)

