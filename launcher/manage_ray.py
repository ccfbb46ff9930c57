"""The CLI side of Ray jobs: `ftl submit --to ray`, `ftl run-ray`, and `ftl status|logs|cancel` for a job
submitted to Ray (cluster/ray.py asks Ray; cluster/ray_train.py runs in the job)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from launcher.errors import FTLError
from launcher.metrics import read_metrics


def ray_options(args: argparse.Namespace):
    import os

    from cluster.ray import DEFAULT_ADDRESS, RayOptions

    return RayOptions(
        address=args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        max_failures=args.max_failures,
        working_dir=None if args.no_working_dir else args.working_dir,
        cpus_per_worker=args.cpus_per_worker,
    )


def submit_ray(args: argparse.Namespace, spec) -> int:
    from cluster.ray import check_options, entrypoint, node_resources, preflight, runtime_env, submit
    from launcher.cli import console
    from launcher.job import prepare_run_dir
    from launcher.manage import cluster_plan

    options = ray_options(args)
    check_options(options)
    nodes = node_resources(options.address)
    if spec.hardware.device == "auto":  # the cluster's nodes decide, not this machine
        device = "cuda" if any(node.get("GPU", 0) > 0 for node in nodes) else "cpu"
        spec = spec.model_copy(update={"hardware": spec.hardware.model_copy(update={"device": device})})
    job_plan = cluster_plan(spec)
    run_dir = spec.output_dir.resolve()
    preflight(run_dir, options, [job_plan], nodes)
    if args.dry_run:
        print(json.dumps({"address": options.address, "entrypoint": entrypoint(run_dir, options), "runtime_env": runtime_env(run_dir, options)}, indent=2))
        return 0
    prepare_run_dir(spec, job_plan, fresh=args.no_resume, say=console.print)
    sid = submit(run_dir, options)
    request = job_plan.request
    console.print(
        f"[bold]FTL[/] submitted Ray job {sid}: {job_plan.strategy} x {request.world_size} workers -> {escape(str(run_dir))}\n"
        f"  ftl status {escape(str(run_dir))}    ftl logs -f {escape(str(run_dir))}"
    )
    return 0


def cmd_run_ray(args: argparse.Namespace) -> int:
    """The Ray job's entrypoint: plan a job spec here (the head node sees the cluster's GPUs), or run the
    plan `ftl submit` wrote into a run dir."""
    from cluster.ray_train import clear_stop, fit
    from launcher.cli import console, make_job_plan
    from launcher.job import prepare_run_dir
    from launcher.spec import load_spec

    run_dir = args.target
    if not args.target.is_dir():
        spec = load_spec(args.target, args.overrides)
        if spec.hardware.device == "auto":  # this process is in the Ray cluster: its GPUs decide
            import ray

            ray.init(log_to_driver=True)
            device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
            spec = spec.model_copy(update={"hardware": spec.hardware.model_copy(update={"device": device})})
        job_plan = make_job_plan(spec)
        if not job_plan.fits and spec.strategy == "auto":
            raise FTLError(f"The job does not fit: {job_plan.reason} Run `ftl plan` on it for what would fit.")
        if "_ray_pkg_" in str(spec.output_dir.resolve()):
            console.print(
                f"[bold yellow]warning:[/] output_dir {escape(str(spec.output_dir.resolve()))} lies inside this job's uploaded "
                "working dir, which Ray deletes with the job and other nodes cannot see: set `output_dir` to an absolute "
                "path on storage every node mounts."
            )
        prepare_run_dir(spec, job_plan, fresh=args.no_resume, say=console.print)
        clear_stop(spec.output_dir)
        run_dir = spec.output_dir
    elif args.overrides:
        raise FTLError(f"{run_dir} is a prepared run dir: its spec and plan are fixed. Give overrides with a job spec instead.")
    return fit(run_dir, args.max_failures, args.cpus_per_worker)


def ray_address(run_dir: Path, sid: str) -> str:
    from cluster.ray import DEFAULT_ADDRESS, read_ledger

    entries = [e for e in read_ledger(run_dir) if e.get("submission_id") == sid and e.get("address")]
    return entries[-1]["address"] if entries else DEFAULT_ADDRESS


def ray_status(run_dir: Path, sid: str) -> int:
    from cluster.ray import job_info, read_ledger
    from launcher.cli import console
    from launcher.job import RankJob
    from launcher.manage import add_progress_rows
    from launcher.outcome import read_outcome

    info = job_info(ray_address(run_dir, sid), sid)
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    max_steps = RankJob.read(run_dir).spec.train.max_steps if (run_dir / "spec.yaml").is_file() else None
    table = Table(show_header=False, box=None)
    state = info.get("status", "unknown to Ray")
    table.add_row("job", f"{sid} (Ray {state})")
    if info.get("message"):
        table.add_row("ray says", info["message"][:300])
    table.add_row("run dir", str(run_dir))
    submissions = sum(1 for e in read_ledger(run_dir) if e.get("event") == "submitted")
    resumes = [r["step"] for r in records if r.get("event") == "resumed"]
    table.add_row("attempts", f"{submissions} submission(s); resumed in-job at step(s) {resumes or 'none'}")
    outcome = read_outcome(run_dir)
    if outcome is not None and state not in ("RUNNING", "PENDING"):
        table.add_row("outcome", f"{outcome.outcome.value} at step {outcome.step}" + (f" ({outcome.detail})" if outcome.detail else ""))
    add_progress_rows(table, run_dir, steps, max_steps, running=state == "RUNNING")
    console.print(table, width=max(console.width, 120))
    return 0


def ray_cancel(run_dir: Path, sid: str) -> int:
    from cluster.ray import cancel
    from launcher.cli import console
    from launcher.job import RankJob

    from cluster.ray_sweep import SWEEP_FILE, point_dir, read_points

    is_sweep = (run_dir / SWEEP_FILE).is_file()  # a sweep: every point's ranks are asked
    points = [point_dir(run_dir, p["index"]) for p in read_points(run_dir)] if is_sweep else [run_dir]
    grace_s = max(RankJob.read(point).plan.save_grace_s for point in points)
    console.print(f"asking job {sid}'s ranks to checkpoint and stop (waiting up to {grace_s} s)...")
    status = cancel(run_dir, ray_address(run_dir, sid), sid, grace_s, stop_dirs=points)
    console.print(f"cancelled Ray job {sid} ({escape(str(run_dir))}): {status}; its last checkpoint stays; `ftl submit` again resumes from it")
    return 0


def ray_logs(run_dir: Path, sid: str, follow: bool) -> int:
    from cluster.ray import client, job_info

    address = ray_address(run_dir, sid)
    if not job_info(address, sid):
        raise FTLError(f"The Ray cluster at {address} has no job {sid} (for {run_dir}): it was never submitted there, or the cluster was restarted since. Its ranks' output stays in the run dir's metrics.jsonl.")
    jobs = client(address)
    if not follow:
        print(jobs.get_job_logs(sid), end="", flush=True)
        return 0
    import asyncio

    async def tail() -> None:  # Ray streams new output over a websocket until the job ends
        async for chunk in jobs.tail_job_logs(sid):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    return 0
