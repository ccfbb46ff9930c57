"""Ray backend, host side: `ftl submit --to ray` hands the prepared run dir to a Ray cluster through Ray's
Job Submission API (what `ray job submit` does); `job_info` and `cancel` ask it about the
job. The job side (the entrypoint, Ray Train, the workers) is cluster/ray_train.py.

The submission id derives from the run dir (`ftl-<name>-<hash of its path>`), so a resubmission of the
same job is the same Ray job id and continues the run instead of starting over; a finished earlier
attempt's log is kept in the run dir before its record is replaced. `ray-ledger.jsonl` keeps one line
per submission and cancel. Ray's dashboard refuses uploads over 100 MiB with an opaque
`HTTPRequestEntityTooLarge`: the working dir is measured first, with Ray's own traversal and excludes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import ledger
from launcher.errors import FTLError
from launcher.rank_env import VERBOSE_ENV, verbose_requested

LEDGER_FILE = "ray-ledger.jsonl"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
UPLOAD_LIMIT_BYTES = 100 * 2**20  # the dashboard's request size limit for a package upload
# Never worth uploading: version control, virtualenvs, caches, FTL's own run dirs.
DEFAULT_EXCLUDES = (".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", "runs")


@dataclass(frozen=True)
class RayOptions:
    """What `ftl submit --to ray` takes besides the plan (which decides the number of workers)."""

    address: str = DEFAULT_ADDRESS
    max_failures: int = 2  # worker-group restarts after failures; Ray's pre-emption restarts do not count
    working_dir: Path | None = Path(".")  # uploaded for the entrypoint and workers; None: nothing uploaded
    cpus_per_worker: float | None = None  # default: 8 per GPU worker, 1 per CPU worker


def auth_mode() -> str:
    """Set Ray's client auth mode explicitly (Ray guesses from files otherwise): the user's RAY_AUTH_MODE
    if set; else `token` when a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token),
    else `disabled`."""
    if "RAY_AUTH_MODE" not in os.environ:
        has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file()
        os.environ["RAY_AUTH_MODE"] = "token" if has_token else "disabled"
    return os.environ["RAY_AUTH_MODE"]


def node_resources(address: str) -> list[dict[str, float]]:
    """The total resources of each alive node of the cluster behind the dashboard at `address`."""
    auth_mode()
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=10_000, raise_on_missing_output=False)
    except Exception as exc:  # the state API raises its own and requests' errors: all mean "not reachable"
        raise unreachable(address, exc) from None
    return [dict(node.resources_total) for node in nodes]


def worker_resources(device: str, cpus_per_worker: float | None) -> dict[str, float]:
    """What Ray reserves for each worker: one GPU and 8 CPUs (data loading, the host side of the step), or
    one CPU for a CPU rank."""
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else (8.0 if device == "cuda" else 1.0)}
    if device == "cuda":
        resources["GPU"] = 1.0
    return resources


def worker_slots(nodes: list[dict[str, float]], per_worker: dict[str, float]) -> int:
    """How many workers of `per_worker` resources the nodes hold at once (a worker never spans nodes)."""
    return sum(int(min(node.get(key, 0.0) // need for key, need in per_worker.items() if need > 0)) for node in nodes)


def check_fits(nodes: list[dict[str, float]], workers: int, per_worker: dict[str, float], address: str) -> None:
    """Refuse a job whose workers cannot all be placed on the cluster's alive nodes now: Ray Train would
    otherwise retry starting the group every minute, for ever (an infeasible request is not an error to it)."""
    fit = worker_slots(nodes, per_worker)
    if fit < workers:
        have = ", ".join(f"{{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}}}" for n in nodes) or "no alive node"
        raise FTLError(
            f"The plan needs {workers} Ray workers of {per_worker} each, but the cluster at {address} can place {fit} "
            f"(alive nodes: {have}). Plan for fewer ranks (`--gpus`/`--nodes`), lower `--cpus-per-worker`, or add nodes."
        )


def submission_id(run_dir: Path) -> str:
    """A stable Ray submission id for the run dir: resubmitting the same job continues it."""
    run_dir = run_dir.resolve()
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", run_dir.name).strip("-")[:40] or "run"
    return f"ftl-{name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


def entrypoint(run_dir: Path, options: RayOptions) -> str:
    """The job's shell command, run on the head node in the cluster's Python."""
    argv = ["python", "-m", "launcher.cli", "run-ray", str(run_dir.resolve()), "--max-failures", str(options.max_failures)]
    if options.cpus_per_worker is not None:
        argv += ["--cpus-per-worker", str(options.cpus_per_worker)]
    return shlex.join(argv)


def runtime_env(run_dir: Path, options: RayOptions) -> dict:
    """What Ray installs for the job: the working dir (without the excludes) and the few variables the
    entrypoint needs. Nothing from this machine's environment is forwarded: a runtime_env is shown in
    the dashboard and its logs, so no secrets go in it."""
    env: dict = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if verbose_requested():  # `ftl --verbose submit --to ray`: the job's ranks show third-party notices too
        env["env_vars"][VERBOSE_ENV] = "1"
    if options.working_dir is not None:
        env["working_dir"] = str(options.working_dir.resolve())
        env["excludes"] = list(upload_excludes(options.working_dir, run_dir))
    return env


def upload_excludes(working_dir: Path, run_dir: Path) -> tuple[str, ...]:
    excludes = list(DEFAULT_EXCLUDES)
    try:  # the run dir, when it lies inside the working dir: checkpoints are never uploaded
        excludes.append(str(run_dir.resolve().relative_to(working_dir.resolve())))
    except ValueError:
        pass
    return tuple(excludes)


def check_upload_size(working_dir: Path, excludes: tuple[str, ...], limit_bytes: int = UPLOAD_LIMIT_BYTES) -> int:
    """The bytes Ray would upload from `working_dir` (its own traversal: these excludes plus .gitignore
    and .rayignore); refused, naming the largest files, when the package would pass the limit."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes, create_package

    root = working_dir.resolve()
    files: list[tuple[int, Path]] = []

    def add(path: Path) -> None:
        if path.is_file():
            files.append((path.stat().st_size, path))

    _dir_travel(root, [_get_excludes(root, list(excludes))], add, include_gitignore=True)
    total = sum(size for size, _ in files)
    if total <= limit_bytes:
        return total
    with tempfile.TemporaryDirectory() as tmp:  # compressed, it may still fit: measure the real package
        package = Path(tmp) / "package.zip"
        create_package(str(root), package, include_gitignore=True, excludes=list(excludes))
        zipped = package.stat().st_size
    if zipped <= limit_bytes:
        return zipped
    largest = ", ".join(f"{p.relative_to(root)} ({size / 2**20:.1f} MiB)" for size, p in sorted(files, reverse=True)[:5])
    raise FTLError(
        f"The working dir {root} would upload {zipped / 2**20:.0f} MiB to Ray ({total / 2**20:.0f} MiB before "
        f"compression), over the dashboard's {limit_bytes / 2**20:.0f} MiB limit. Largest files: {largest}. Keep data and "
        "models on storage the Ray nodes read directly (point the spec at it), list big files in .rayignore, or pass "
        "`--working-dir` a smaller folder (`--no-working-dir` uploads nothing)."
    )


def unreachable(address: str, exc: Exception) -> FTLError:
    text = str(exc)
    if type(exc).__name__ == "AuthenticationError" or "401" in text or "403" in text or "nauthorized" in text:
        return FTLError(
            f"The Ray cluster at {address} refused FTL's request: it asks for token authentication and this client's "
            f"RAY_AUTH_MODE is {os.environ.get('RAY_AUTH_MODE')!r} ({text.splitlines()[0][:200] if text else type(exc).__name__}). "
            "Set RAY_AUTH_MODE=token and give the cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)."
        )
    return FTLError(
        f"Cannot reach the Ray dashboard at {address} ({str(exc).splitlines()[0][:200]}). Start the cluster (`ray start "
        "--head --dashboard-host 127.0.0.1`), or pass `--address http://HEAD:8265` / set RAY_ADDRESS."
    )


def client(address: str):
    """A Job Submission client, with Ray's token auth set explicitly: if ~/.ray/auth_token exists Ray turns
    it on by itself, and a cluster started without it then refuses every call."""
    auth_mode()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    quiet_ray_logs()

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as exc:
        raise unreachable(address, exc) from None


def quiet_ray_logs() -> None:
    """Ray's client logs each packaging and upload step at INFO on its own loggers; FTL says what it
    submitted itself."""
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("ray")] + ["ray"]:
        logging.getLogger(name).setLevel(logging.ERROR)


def check_options(options: RayOptions) -> None:
    """The submit flags themselves, before the cluster is asked anything."""
    if options.cpus_per_worker is not None and not options.cpus_per_worker > 0:
        raise FTLError(f"`--cpus-per-worker {options.cpus_per_worker:g}`: Ray reserves this many CPUs per worker; give a number above 0 (e.g. 1, 0.5).")
    if options.max_failures < -1:
        raise FTLError(f"`--max-failures {options.max_failures}`: give 0 or more restarts (-1: no limit).")
    if options.working_dir is not None and not options.working_dir.is_dir():
        raise FTLError(f"`--working-dir {options.working_dir}` is not a folder here: give the folder Ray uploads for the job (the repo with the code), or `--no-working-dir`.")


def preflight(run_dir: Path, options: RayOptions, plans: list, nodes: list[dict[str, float]]) -> None:
    """Before anything is written: the run dir's job is not running, the upload fits the dashboard's
    limit and each plan's workers fit the cluster (`plans`: the job's plan, or a sweep's points')."""
    check_not_running(run_dir, options.address)
    if options.working_dir is not None:
        check_upload_size(options.working_dir, upload_excludes(options.working_dir, run_dir))
    for plan in plans:
        check_fits(nodes, plan.request.world_size, worker_resources(plan.request.device, options.cpus_per_worker), options.address)


def check_not_running(run_dir: Path, address: str) -> None:
    """One run dir runs one job at a time: refuse while Ray still runs (or queues) the run dir's job."""
    from ray.job_submission import JobStatus

    sid = submission_id(run_dir)
    earlier = _job_info(client(address), sid)
    if earlier is not None and not JobStatus(earlier.status).is_terminal():
        raise FTLError(
            f"Ray job {sid} for {run_dir} is still {earlier.status}: one run dir runs one job at a time. Follow it with "
            f"`ftl logs -f {run_dir}`, wait for it to end, or `ftl cancel {run_dir}`."
        )


def submit(run_dir: Path, options: RayOptions, command: str | None = None) -> str:
    """Submit the prepared run dir's plan (checked by `preflight`); returns the submission id (the same
    for every attempt). `command`: another entrypoint for the same dir (a sweep's driver)."""
    from cluster.ray_train import clear_stop

    jobs = client(options.address)
    sid = submission_id(run_dir)
    env = runtime_env(run_dir, options)
    earlier = _job_info(jobs, sid)
    if earlier is not None:
        check_not_running(run_dir, options.address)  # checked before anything was written; a race ends here
        attempt = sum(1 for e in read_ledger(run_dir) if e.get("event") == "submitted")
        (run_dir / f"ray-{sid}-attempt{attempt}.log").write_text(jobs.get_job_logs(sid))
        jobs.delete_job(sid)  # frees the id; its log is kept above
    clear_stop(run_dir)
    quiet_ray_logs()  # the loggers of the modules imported since
    jobs.submit_job(entrypoint=command or entrypoint(run_dir, options), submission_id=sid, runtime_env=env)
    append_ledger(run_dir, {"event": "submitted", "submission_id": sid, "address": options.address})
    return sid


def job_info(address: str, sid: str) -> dict:
    """Ray's record of the job ({} when it has none): status, message, times."""
    from ray.job_submission import JobStatus

    info = _job_info(client(address), sid)
    if info is None:
        return {}
    return {"status": JobStatus(info.status).value, "message": info.message or "",
            "start_time": info.start_time, "end_time": info.end_time}


def cancel(run_dir: Path, address: str, sid: str, grace_s: float, stop_dirs: list[Path] | None = None) -> str:
    """Ask the ranks to checkpoint and stop (the stop file in `run_dir`, or in each of `stop_dirs`: a
    sweep's points), wait up to `grace_s` for the job to end, then stop it in Ray (SIGTERM, SIGKILL 3 s
    later) if it has not. Returns the job's final status."""
    from ray.job_submission import JobStatus

    from cluster.ray_train import request_stop

    append_ledger(run_dir, {"event": "cancelled", "submission_id": sid})
    for path in stop_dirs or [run_dir]:
        request_stop(path, "cancelled with `ftl cancel`")
    jobs = client(address)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        info = _job_info(jobs, sid)
        if info is None or JobStatus(info.status).is_terminal():
            return job_info(address, sid).get("status", "unknown")
        time.sleep(1)
    jobs.stop_job(sid)
    return "STOPPED"


def _job_info(jobs, sid: str):
    try:
        return jobs.get_job_info(sid)
    except RuntimeError as exc:  # the client raises RuntimeError for an unknown id (HTTP 404)
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise


def read_ledger(run_dir: Path) -> list[dict]:
    return ledger.read_ledger(run_dir / LEDGER_FILE)


def append_ledger(run_dir: Path, entry: dict) -> None:
    ledger.append_ledger(run_dir / LEDGER_FILE, entry)


def run_dir_of(sid: str, address: str | None = None) -> Path:
    """The run dir of an FTL Ray job, from its entrypoint (`... run-ray RUN_DIR ...`)."""
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    info = _job_info(client(address), sid)
    if info is None:
        raise FTLError(f"{sid!r} is not a job the Ray cluster at {address} knows; give the run dir instead (or `--address`/RAY_ADDRESS).")
    argv = shlex.split(info.entrypoint)
    if "run-ray" not in argv:
        raise FTLError(f"Ray job {sid} was not submitted by FTL (its entrypoint is {info.entrypoint!r}).")
    return Path(argv[argv.index("run-ray") + 1])
