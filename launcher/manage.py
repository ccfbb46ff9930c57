"""`ftl submit`, `ftl sweep`, `ftl status`, `ftl sweep-status`, `ftl cancel`, `ftl logs`, `ftl run-ray`: jobs
handed to a cluster (Slurm: cluster/slurm.py; Ray: cluster/ray.py, and cluster/ray_train.py in the job).
The host side only: plan once, write the run dir (spec + plan, the contract the ranks run), render and
submit; then read the run dir and ask the scheduler."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from launcher.errors import FTLError
from launcher.manage_ray import cmd_run_ray, ray_cancel, ray_logs, ray_status, submit_ray
from launcher.metrics import read_metrics


def add_commands(sub: argparse._SubParsersAction, job_command) -> None:
    s = job_command("submit", "Plan the job, write its run dir and submit it to a cluster scheduler.")
    _scheduler_options(s)
    s.set_defaults(func=cmd_submit)

    w = job_command("sweep", "A grid of the job's settings as one Slurm job array: one run dir and one array task per point.")
    w.add_argument("--grid", nargs="+", required=True, metavar="key=v1,v2", help="the values to try, e.g. train.lr=1e-5,3e-5 method.lora.r=8,16")
    w.add_argument("--max-parallel", type=int, help="array tasks running at once (Slurm's %%N)")
    _scheduler_options(w)
    w.set_defaults(func=cmd_sweep)

    r = sub.add_parser(
        "run-ray", help="Run a job on the Ray cluster this process is in, with Ray Train (a Ray job's entrypoint).",
        description="Run a job with Ray Train on the Ray cluster this process belongs to: `ray job submit --working-dir . "
        "-- ftl run-ray JOB.yaml` plans it there; `ftl submit --to ray` submits `ftl run-ray RUN_DIR` with the plan made at submit.",
    )
    r.add_argument("target", type=Path, help="a job spec (YAML: planned here) or a run dir prepared by `ftl submit --to ray`")
    r.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override spec fields (with a job spec)")
    r.add_argument("--max-failures", type=int, default=2, help="worker-group restarts after failures (Ray's pre-emption restarts do not count)")
    r.add_argument("--cpus-per-worker", type=float, help="CPUs Ray reserves per worker (default 8 per GPU, 1 per CPU rank)")
    r.add_argument("--no-resume", action="store_true", help="with a job spec: start fresh instead of resuming")
    r.set_defaults(func=cmd_run_ray)  # launcher/manage_ray.py

    t = sub.add_parser("sweep-status", help="One row per point of a sweep: its settings, state, step and best validation metric.")
    t.add_argument("sweep_dir", type=Path, help="the sweep's dir (the job's output_dir)")
    t.set_defaults(func=cmd_sweep_status)
    _status_commands(sub)


def _scheduler_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--to", choices=["slurm", "ray"], required=True, help="the scheduler")
    s.add_argument("--address", help="Ray: the dashboard address (default $RAY_ADDRESS, else http://127.0.0.1:8265)")
    s.add_argument("--working-dir", type=Path, default=Path("."), help="Ray: the folder uploaded for the job (default: here)")
    s.add_argument("--no-working-dir", action="store_true", help="Ray: upload nothing (the nodes have the code and data)")
    s.add_argument("--cpus-per-worker", type=float, help="Ray: CPUs reserved per worker (default 8 per GPU, 1 per CPU rank)")
    s.add_argument("--partition", help="Slurm partition")
    s.add_argument("--account", help="Slurm account")
    s.add_argument("--qos", help="Slurm QOS")
    s.add_argument("--time", help="time limit, e.g. 04:00:00 (the job is signalled to checkpoint before it)")
    s.add_argument("--constraint", help="Slurm node features, e.g. a100")
    s.add_argument("--exclusive", action="store_true", help="whole nodes only")
    s.add_argument("--gpus-per-node", type=int, dest="gpus", metavar="G", help="= --gpus")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per node's task (default 8 per GPU, or one per CPU rank)")
    s.add_argument("--container-image", help="run the step in this container (pyxis `--container-image`)")
    s.add_argument("--max-failures", type=int, default=2, help="failed attempts after which the job is no longer requeued / restarted (pre-emptions never count)")
    s.add_argument("--max-stalled", type=int, default=3, help="attempts in a row ending at the same checkpoint after which it is not requeued either")
    s.add_argument("--no-resume", action="store_true", help="start fresh instead of resuming from the run dir's checkpoint")
    s.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")


def _status_commands(sub: argparse._SubParsersAction) -> None:
    for name, func, text in (
        ("status", cmd_status, "State of a submitted job: scheduler state, restarts, last step, loss, checkpoint, ETA."),
        ("cancel", cmd_cancel, "Cancel a submitted job."),
        ("logs", cmd_logs, "Print a submitted job's log (the scheduler's output file)."),
    ):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("target", help="the run dir (output_dir) or the job id")
        if name == "logs":
            c.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows, until the job ends")
        c.set_defaults(func=func)


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.slurm import render_sbatch, submit
    from launcher.cli import console, load_job
    from launcher.job import prepare_run_dir

    if args.to == "ray":
        return submit_ray(args, load_job(args))  # launcher/manage_ray.py
    spec = cluster_spec(load_job(args))
    job_plan = cluster_plan(spec)
    request = job_plan.request
    script = render_sbatch(spec.output_dir, request.nodes, request.gpus_per_node, request.device, job_plan.save_grace_s, slurm_options(args))
    if args.dry_run:
        print(script, end="")
        return 0
    prepare_run_dir(spec, job_plan, fresh=args.no_resume, say=console.print)
    job_id = submit(spec.output_dir, script)
    console.print(
        f"[bold]FTL[/] submitted job {job_id}: {job_plan.strategy} on {request.nodes} node(s) x {request.gpus_per_node} -> "
        f"{escape(str(spec.output_dir))}\n  log: {escape(str(spec.output_dir / f'slurm-{job_id}.out'))}\n"
        f"  ftl status {escape(str(spec.output_dir))}"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Every point of the grid planned and written as its own run dir (point-i, with its overrides); sweep.json
    in the sweep dir lists the points. Slurm runs them as one job array whose task i runs point-i; Ray as one
    job running a Ray Tune trial (a TorchTrainer) per point (cluster/ray_sweep.py)."""
    if args.to == "ray":
        return _sweep_ray(args)
    from cluster.slurm import render_sbatch, submit
    from launcher.cli import console

    sweep = plan_sweep(args, cluster_spec)
    shapes = {(p.request.nodes, p.request.gpus_per_node, p.request.device) for p in sweep.plans}
    if len(shapes) > 1:
        raise FTLError(
            f"The grid's points need different resources ({sorted(shapes)} as nodes, ranks per node, device); one job array "
            "has one shape. Fix `hardware` in the job, or sweep the differing settings as separate `ftl sweep` runs."
        )
    nodes, ranks, device = shapes.pop()
    array = f"0-{len(sweep.points) - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    script = render_sbatch(sweep.sweep_dir, nodes, ranks, device, max(p.save_grace_s for p in sweep.plans), slurm_options(args), array=array)
    if args.dry_run:
        print(script, end="")
        return 0
    write_sweep(sweep, fresh=args.no_resume, say=console.print)
    job_id = submit(sweep.sweep_dir, script, points=len(sweep.points))
    console.print(f"[bold]FTL[/] submitted sweep {job_id}: {len(sweep.points)} points as array {array} -> {escape(str(sweep.sweep_dir))}\n  ftl sweep-status {escape(str(sweep.sweep_dir))}")
    return 0


def _sweep_ray(args: argparse.Namespace) -> int:
    """`ftl sweep --to ray`: the points planned for the Ray cluster's devices, each checked to fit it, then
    one Ray job (its id derived from the sweep dir, recorded in the sweep dir's ray ledger)."""
    from cluster.ray import check_options, node_resources, preflight, runtime_env, worker_resources
    from cluster.ray_sweep import concurrent_trials, entrypoint, submit
    from launcher.cli import console
    from launcher.manage_ray import ray_options

    options = ray_options(args)
    check_options(options)
    nodes = node_resources(options.address)
    device = "cuda" if any(node.get("GPU", 0) > 0 for node in nodes) else "cpu"  # `auto`: the cluster's nodes decide

    def on_cluster(spec):
        if spec.hardware.device != "auto":
            return spec
        return spec.model_copy(update={"hardware": spec.hardware.model_copy(update={"device": device})})

    sweep = plan_sweep(args, on_cluster)
    preflight(sweep.sweep_dir, options, sweep.plans, nodes)
    workers = max(p.request.world_size for p in sweep.plans)
    at_once = concurrent_trials(nodes, workers, worker_resources(sweep.plans[0].request.device, options.cpus_per_worker))
    at_once = min(at_once, args.max_parallel or at_once)
    if args.dry_run:
        print(json.dumps({
            "address": options.address, "entrypoint": entrypoint(sweep.sweep_dir, options, args.max_parallel),
            "runtime_env": runtime_env(sweep.sweep_dir, options), "points": len(sweep.points), "trials_at_once_now": at_once,
        }, indent=2))
        return 0
    write_sweep(sweep, fresh=args.no_resume, say=console.print)
    sid = submit(sweep.sweep_dir, options, args.max_parallel)
    console.print(
        f"[bold]FTL[/] submitted sweep as Ray job {sid}: {len(sweep.points)} points as Ray Tune trials, up to {at_once} at once "
        f"(the cluster now) -> {escape(str(sweep.sweep_dir))}\n  ftl sweep-status {escape(str(sweep.sweep_dir))}    ftl logs -f {escape(str(sweep.sweep_dir))}"
    )
    return 0


@dataclass(frozen=True)
class SweepPlan:
    """The grid's points, each planned as its own job: `specs[i]` and `plans[i]` are point-i's, with
    `points[i]` its overrides and `sweep_dir/point-i` its run dir."""

    sweep_dir: Path
    points: list[list[str]]
    specs: list
    plans: list


def plan_sweep(args: argparse.Namespace, on_cluster) -> SweepPlan:
    """Plan every point of `args.grid` (key=v1,v2 ...: their product), its spec made a cluster job by
    `on_cluster` (where `hardware.device: auto` is decided); refused before anything is written."""
    from launcher.cli import load_job

    axes = []
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise FTLError(f"`--grid {item}` is not key=v1,v2: give a spec field and its values, e.g. train.lr=1e-5,3e-5.")
        axes.append([f"{key}={value}" for value in values.split(",")])
    sweep_dir = on_cluster(load_job(args)).output_dir
    points = [list(combo) for combo in itertools.product(*axes)]
    specs, plans = [], []
    for index, overrides in enumerate(points):
        args_i = argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *overrides, f"output_dir={sweep_dir / f'point-{index}'}"]})
        spec = on_cluster(load_job(args_i))
        specs.append(spec)
        plans.append(cluster_plan(spec))
    return SweepPlan(sweep_dir, points, specs, plans)


def write_sweep(sweep: SweepPlan, fresh: bool, say) -> None:
    """Each point's run dir (spec + plan, resumed unless `fresh`) and sweep.json listing the points."""
    from launcher.job import prepare_run_dir

    for spec, job_plan in zip(sweep.specs, sweep.plans):
        prepare_run_dir(spec, job_plan, fresh=fresh, say=say)
    listing = {"points": [{"index": i, "overrides": o} for i, o in enumerate(sweep.points)]}
    (sweep.sweep_dir / "sweep.json").write_text(json.dumps(listing, indent=2) + "\n")


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cluster import ray as ray_backend
    from cluster.slurm import checkpoint_step, job_state, read_ledger
    from launcher.cli import console
    from launcher.outcome import read_outcome

    listing = args.sweep_dir / "sweep.json"
    if not listing.is_file():
        raise FTLError(f"{listing} does not exist: {args.sweep_dir} is not a sweep written by `ftl sweep`.")
    on_ray = [e for e in ray_backend.read_ledger(args.sweep_dir) if e.get("event") == "submitted"]
    ray_state = ""
    if on_ray:  # one Ray job runs every point: its state, then each point's own outcome and metrics
        ray_state = ray_backend.job_info(on_ray[-1].get("address") or ray_backend.DEFAULT_ADDRESS, on_ray[-1]["submission_id"]).get("status", "unknown to Ray")
        console.print(f"Ray job {on_ray[-1]['submission_id']}: {ray_state}")
    table = Table("point", "settings", "state", "step", "checkpoint", "best val_loss", "best accuracy")
    for point in json.loads(listing.read_text())["points"]:
        run_dir = args.sweep_dir / f"point-{point['index']}"
        records = read_metrics(run_dir)
        steps = [r["step"] for r in records if "loss" in r]
        if on_ray:
            outcome = read_outcome(run_dir)
            running = "RUNNING" if steps else "PENDING"
            state = outcome.outcome.value if outcome else running if ray_state in ("RUNNING", "PENDING") else ray_state
        else:
            submitted = [e["job_id"] for e in read_ledger(run_dir) if e.get("event") == "submitted"]
            state = job_state(submitted[-1]).get("JobState", "?") if submitted else "not submitted"
        val = [r["val_loss"] for r in records if "val_loss" in r]
        acc = [r["accuracy"] for r in records if "accuracy" in r]
        table.add_row(
            str(point["index"]), " ".join(point["overrides"]), state, str(steps[-1]) if steps else "-", str(checkpoint_step(run_dir)),
            f"{min(val):.4f}" if val else "-", f"{max(acc):.4f}" if acc else "-",
        )
    # Rich caps a print's width at the console's (80 columns in a log): a console of its own keeps the settings readable.
    Console(highlight=False, width=max(console.width, 160)).print(table)
    return 0


def cluster_spec(spec):
    """The spec as a cluster job: `hardware.device: auto` means CUDA nodes (the plan is made here, on a
    login node that may have no GPU)."""
    if spec.hardware.device != "auto":
        return spec
    return spec.model_copy(update={"hardware": spec.hardware.model_copy(update={"device": "cuda"})})


def cluster_plan(spec):
    """The plan, refused here if it does not fit or its library is missing (before anything is written)."""
    from launcher.cli import check_before_ranks, job_command, make_job_plan, print_plan
    from strategies.registry import check_available

    job_plan = make_job_plan(spec)
    if not job_plan.fits:
        print_plan(job_plan, job_command(spec, job_plan))
        raise FTLError(f"The job does not fit: {job_plan.reason} See `what would fit` above.")
    check_available(job_plan.strategy)
    check_before_ranks(spec, job_plan)
    return job_plan


def slurm_options(args: argparse.Namespace):
    from cluster.slurm import SlurmOptions

    return SlurmOptions(
        partition=args.partition, account=args.account, qos=args.qos, time=args.time, constraint=args.constraint,
        exclusive=args.exclusive, container_image=args.container_image, cpus_per_task=args.cpus_per_task,
        max_failures=args.max_failures, max_stalled=args.max_stalled,
    )


def resolve_target(target: str) -> tuple[Path, str, str]:
    """(run dir, backend, current job id) from a run dir or a job id (Slurm's, or a Ray submission id)."""
    from cluster import ray as ray_backend
    from cluster.slurm import job_state, read_ledger

    path = Path(target)
    if path.is_dir():
        submitted = [(e.get("time", 0), "slurm", e["job_id"]) for e in read_ledger(path) if e.get("event") == "submitted"]
        submitted += [(e.get("time", 0), "ray", e["submission_id"]) for e in ray_backend.read_ledger(path) if e.get("event") == "submitted"]
        if not submitted:
            raise FTLError(f"{path} has no ledger with a submission (slurm-ledger.jsonl, ray-ledger.jsonl): it was not submitted with `ftl submit`.")
        _, backend, job_id = max(submitted)
        return path, backend, job_id
    if target.startswith("ftl-"):  # FTL's Ray submission ids
        return ray_backend.run_dir_of(target), "ray", target
    state = job_state(target)
    if not state:
        raise FTLError(f"{target!r} is neither a run dir nor a job id Slurm knows (`scontrol show job {target}` finds nothing).")
    work_dir = Path(state.get("WorkDir", "."))
    task = state.get("ArrayTaskId")
    if task is not None and task.isdigit() and (work_dir / f"point-{task}").is_dir():  # a sweep's task runs its point
        return work_dir / f"point-{task}", "slurm", target
    return work_dir, "slurm", target


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.slurm import job_state, read_ledger
    from launcher.cli import console
    from launcher.job import RankJob

    run_dir, backend, job_id = resolve_target(args.target)
    if backend == "ray":
        return ray_status(run_dir, job_id)
    state = job_state(job_id)
    ledger = read_ledger(run_dir)
    ends = [e for e in ledger if e.get("event") == "ended"]
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    max_steps = RankJob.read(run_dir).spec.train.max_steps if (run_dir / "spec.yaml").is_file() else None
    table = Table(show_header=False, box=None)
    table.add_row("job", f"{job_id} ({state.get('JobState', 'unknown to Slurm')}{', ' + state['Reason'] if state.get('Reason', 'None') != 'None' else ''})")
    table.add_row("run dir", str(run_dir))
    causes = ", ".join(f"{e['cause']} at step {e['step']} -> {e['decision']}" for e in ends) or "none"
    table.add_row("attempts", f"{len(ends)} ended ({causes})")
    add_progress_rows(table, run_dir, steps, max_steps, running=state.get("JobState") == "RUNNING")
    console.print(table)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from cluster.slurm import cancel
    from launcher.cli import console

    run_dir, backend, job_id = resolve_target(args.target)
    if backend == "ray":
        return ray_cancel(run_dir, job_id)
    cancel(run_dir, job_id)
    console.print(f"cancelled job {job_id} ({escape(str(run_dir))}); its last checkpoint stays; `ftl submit` again resumes from it")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from cluster.slurm import job_state

    run_dir, backend, job_id = resolve_target(args.target)
    if backend == "ray":
        return ray_logs(run_dir, job_id, args.follow)
    log = run_dir / f"slurm-{job_id}.out"
    position = 0
    while True:
        if log.is_file():
            with open(log, errors="replace") as fh:
                fh.seek(position)
                chunk = fh.read()
                position = fh.tell()
            print(chunk, end="", flush=True)
        if not args.follow or job_state(job_id).get("JobState") in (None, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            return 0
        time.sleep(1)


def add_progress_rows(table: Table, run_dir: Path, steps: list[dict], max_steps: int | None, running: bool) -> None:
    """The rows every backend's `ftl status` shows from the run dir: step, loss, tokens/s, ETA, checkpoint."""
    from cluster.slurm import checkpoint_step

    if steps:
        last = steps[-1]
        table.add_row("step", f"{last['step']}" + (f" / {max_steps}" if max_steps else ""))
        table.add_row("loss", f"{last['loss']:.4f}")
        table.add_row("tokens/s", f"{last.get('tokens_per_s', 0):,.0f}")
        eta = eta_s(steps, max_steps)
        if eta is not None and running:
            table.add_row("ETA", time.strftime("%H:%M:%S", time.gmtime(eta)))
    table.add_row("checkpoint", f"step {checkpoint_step(run_dir)}")


def eta_s(steps: list[dict], max_steps: int | None) -> float | None:
    if max_steps is None or len(steps) < 2 or "elapsed_s" not in steps[-1]:
        return None
    a, b = steps[-2], steps[-1]
    rate = (b["step"] - a["step"]) / max(b["elapsed_s"] - a["elapsed_s"], 1e-9)
    return (max_steps - b["step"]) / rate if rate > 0 else None
