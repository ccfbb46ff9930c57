"""Ray sweep: `ftl sweep --to ray` runs a prepared sweep dir's points as Ray Tune trials, one Ray Train
`TorchTrainer` per trial (Ray's supported shape since Train V2: a Tune function trainable that builds and
fits a trainer, with `TuneReportCallback` passing the workers' reports to Tune).

Host side: `submit` hands the sweep dir to the cluster as one Ray job whose entrypoint is this module
(`python -m cluster.ray_sweep SWEEP_DIR ...`); the submission id derives from the sweep dir, as a run's does
from its run dir. Job side: `run_sweep` runs a `Tuner` with one trial per point (`point-i`, planned and
written by `ftl sweep`); each trial's trainer is cluster/ray_train.py's, whose experiment dir is the point's
run dir, so a point reads exactly like a run of `ftl submit --to ray`. At the end it prints one row per point
(also written as `sweep-results.json`) and exits 0 only if every point ended without work left.

Resources: a trial's own function only starts and watches its trainer, so it reserves no CPU (Tune refuses a
trial with nothing at all: it reserves one byte of memory instead). Trials run at once as many as whole
worker sets fit on the alive nodes (`concurrent_trials`), at most `--max-parallel`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from launcher.errors import FTLError

SWEEP_FILE = "sweep.json"  # written by `ftl sweep`: the points and their overrides
RESULTS_FILE = "sweep-results.json"
TUNE_DIR = "tune"  # Tune's experiment dir, inside the sweep dir; the points' run dirs are its siblings
# Tune refuses a trial that reserves nothing; one byte of memory is the least it takes (a CPU fraction
# would keep a whole-CPU worker off that node).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1}
PG_SETTLE_S = 10.0  # how long Tune and Train get to remove their own placement groups before we do


def read_points(sweep_dir: Path) -> list[dict]:
    listing = sweep_dir / SWEEP_FILE
    if not listing.is_file():
        raise FTLError(f"{listing} does not exist: {sweep_dir} is not a sweep written by `ftl sweep`.")
    return json.loads(listing.read_text())["points"]


def point_dir(sweep_dir: Path, index: int) -> Path:
    return sweep_dir / f"point-{index}"


def concurrent_trials(nodes: list[dict[str, float]], workers: int, per_worker: dict[str, float]) -> int:
    """How many trials of `workers` workers each can hold their whole worker sets at once: the workers that
    fit on each node (whole workers: a worker never spans nodes), summed, divided by a trial's."""
    from cluster.ray import worker_slots

    return worker_slots(nodes, per_worker) // max(workers, 1)


# --- host side ---------------------------------------------------------------------------------------


def entrypoint(sweep_dir: Path, options, max_parallel: int | None) -> str:
    """The job's shell command (`options`: cluster.ray.RayOptions), run on the head in the cluster's Python."""
    argv = ["python", "-m", "cluster.ray_sweep", str(sweep_dir.resolve()), "--max-failures", str(options.max_failures)]
    if max_parallel:
        argv += ["--max-parallel", str(max_parallel)]
    if options.cpus_per_worker is not None:
        argv += ["--cpus-per-worker", str(options.cpus_per_worker)]
    return shlex.join(argv)


def submit(sweep_dir: Path, options, max_parallel: int | None) -> str:
    """Submit the written sweep dir as one Ray job (cluster.ray.submit: the id from the sweep dir, an ended
    earlier attempt's log kept); returns its submission id."""
    from cluster import ray as ray_backend
    from cluster.ray_train import clear_stop

    for point in read_points(sweep_dir):  # a cancel asked every point's ranks; the new attempt must not stop
        clear_stop(point_dir(sweep_dir, point["index"]))
    return ray_backend.submit(sweep_dir, options, command=entrypoint(sweep_dir, options, max_parallel))


# --- job side ----------------------------------------------------------------------------------------


def trial(config: dict) -> dict:
    """One Tune trial: fit the TorchTrainer of point `config["point"]` and say when it ran. A failed
    training run is returned, not raised, so Tune does not run the point again: its trainer already spent
    the restarts `--max-failures` allows."""
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.ray_train import STOP_FILE, build_trainer
    from launcher.job import RankJob
    from launcher.outcome import clear_outcome

    run_dir = point_dir(Path(config["sweep_dir"]), config["point"])
    if (run_dir / STOP_FILE).is_file():  # `ftl cancel` reached the sweep before this point started
        return {"point": config["point"], "started_at": None, "ended_at": None, "failure": "", "not_started": True}
    job = RankJob.read(run_dir)
    clear_outcome(run_dir)
    trainer = build_trainer(job, config["max_failures"], config["cpus_per_worker"], callbacks=(TuneReportCallback(),))
    started, failure = time.time(), ""
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        failure = " ".join(str(exc).strip().splitlines()[:3])[:600]
    return {"point": config["point"], "started_at": started, "ended_at": time.time(), "failure": failure}


def result_rows(sweep_dir: Path, points: list[dict], trials: dict[int, dict]) -> list[dict]:
    """One row per point, from its run dir (outcome.json, metrics.jsonl) and its trial's times."""
    from launcher.metrics import read_metrics
    from launcher.outcome import Outcome, Result, read_outcome

    rows = []
    for point in points:
        run_dir = point_dir(sweep_dir, point["index"])
        records = read_metrics(run_dir)
        losses = [r for r in records if "loss" in r]
        val = [r["val_loss"] for r in records if "val_loss" in r]
        result = read_outcome(run_dir)
        ran = trials.get(point["index"], {})
        if ran.get("not_started"):
            result = Result(Outcome.PREEMPTED, losses[-1]["step"] if losses else 0, detail="cancelled before it started; resubmit to run it")
        rows.append({
            "point": point["index"],
            "settings": " ".join(point["overrides"]),
            "outcome": result.outcome.value if result else "failed",
            "exit_code": result.exit_code if result else 1,
            "step": result.step if result else (losses[-1]["step"] if losses else 0),
            "loss": losses[-1]["loss"] if losses else None,
            "best_val_loss": min(val) if val else None,
            "checkpoint": result.checkpoint if result else None,
            "started_at": ran.get("started_at"),
            "ended_at": ran.get("ended_at"),
            "detail": (result.detail if result else "") or ran.get("failure", "") or ran.get("error", ""),
        })
    return rows


def render_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (a job log is plain text)."""
    def number(value) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"

    header = ("point", "settings", "step", "loss", "best val_loss", "outcome")
    cells = [header] + [
        (str(r["point"]), r["settings"], str(r["step"]), number(r["loss"]), number(r["best_val_loss"]), r["outcome"]) for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def remove_leftover_placement_groups(job_id: str, settle_s: float = PG_SETTLE_S) -> list[str]:
    """Placement groups this job created that are still there after `tuner.fit()` returned, removed.
    Tune with Train can leave a trial's or a worker group's group behind (ray#54305), holding its CPUs
    and GPUs for as long as the cluster runs. Tune and Train get `settle_s` to remove their own first."""
    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_placement_groups

    def alive() -> list:
        groups = list_placement_groups(filters=[("creator_job_id", "=", job_id)], limit=10_000, raise_on_missing_output=False)
        return [g for g in groups if g.state != "REMOVED"]

    deadline = time.monotonic() + settle_s
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for group in left:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group.placement_group_id))))
    return [g.placement_group_id for g in left]


def run_sweep(sweep_dir: Path, max_failures: int, max_parallel: int | None, cpus_per_worker: float | None) -> int:
    """The Ray job's entrypoint: every point of the sweep as a Tune trial. Returns the exit code."""
    import ray
    import ray.tune

    from cluster.ray import worker_resources
    from launcher.job import RankJob

    sweep_dir = sweep_dir.resolve()
    # The job starts in Ray's unpacked copy of the working dir, which Ray may unpack again while the job runs
    # (seen where two nodes share one session dir: a trial placed on the second node re-extracts the package
    # over the head's), leaving this process in a deleted dir; Tune needs a valid one (os.getcwd in
    # ExperimentAnalysis). The sweep dir is where this driver works anyway; imports use sys.path's absolute path.
    os.chdir(sweep_dir)
    points = read_points(sweep_dir)
    requests = [RankJob.read(point_dir(sweep_dir, p["index"])).plan.request for p in points]
    ray.init(log_to_driver=True)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    workers = max(r.world_size for r in requests)  # the largest trial decides what fits at once
    per_worker = worker_resources(requests[0].device, cpus_per_worker)
    fit_at_once = concurrent_trials(nodes, workers, per_worker)
    if fit_at_once == 0:
        raise FTLError(
            f"No trial of the sweep fits the Ray cluster now: a trial needs {workers} workers of {per_worker}, the alive nodes "
            f"have {[{k: v for k, v in n.items() if k in ('CPU', 'GPU')} for n in nodes]}. Add nodes or plan fewer ranks."
        )
    at_once = min(fit_at_once, max_parallel or fit_at_once, len(points))
    print(
        f"FTL sweep on Ray: {len(points)} points, {workers} worker(s) of {per_worker} per trial; {fit_at_once} trial(s) fit the "
        f"cluster at once" + (f", --max-parallel {max_parallel}" if max_parallel else "") + f": {at_once} at a time",
        flush=True,
    )
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trial, TRIAL_DRIVER_RESOURCES),
        param_space={
            "point": ray.tune.grid_search([p["index"] for p in points]),
            "sweep_dir": str(sweep_dir), "max_failures": max_failures, "cpus_per_worker": cpus_per_worker,
        },
        tune_config=ray.tune.TuneConfig(
            max_concurrent_trials=at_once, trial_dirname_creator=lambda t: f"point-{t.config['point']}",
        ),
        run_config=ray.tune.RunConfig(storage_path=str(sweep_dir), name=TUNE_DIR, verbose=1),
    )
    trials: dict[int, dict] = {}
    for result in tuner.fit():
        index = (result.config or {}).get("point")
        if index is not None:
            trials[index] = {**(result.metrics or {}), **({"error": str(result.error).splitlines()[0][:300]} if result.error else {})}
    removed = remove_leftover_placement_groups(ray.get_runtime_context().get_job_id())
    if removed:
        print(f"FTL sweep on Ray: removed {len(removed)} placement group(s) Tune/Train left behind (ray#54305): {', '.join(removed)}", flush=True)
    rows = result_rows(sweep_dir, points, trials)
    (sweep_dir / RESULTS_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    print(render_table(rows), flush=True)
    failed = [r["point"] for r in rows if r["exit_code"] != 0]
    print(f"FTL sweep on Ray: {len(rows) - len(failed)}/{len(rows)} points done" + (f"; not done: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ray_sweep", description="Run a prepared sweep dir on Ray Tune (a Ray job's entrypoint).")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per trial after failures")
    parser.add_argument("--max-parallel", type=int, help="trials at once, at most (default: as many as fit the cluster)")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs Ray reserves per worker (default 8 per GPU, 1 per CPU rank)")
    args = parser.parse_args(argv)
    try:
        return run_sweep(args.sweep_dir, args.max_failures, args.max_parallel, args.cpus_per_worker)
    except FTLError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
