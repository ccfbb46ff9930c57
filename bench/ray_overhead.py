"""What Ray costs against torchrun on this machine, in one run: the quickstart job (2 ranks, DDP, gloo)
through `ftl run` (torchrun) and through `ftl submit --to ray` on the repo's local two-node Ray
(tests/ray: two 1-CPU nodes, so one worker on each, on the same 2 cores torchrun uses). Torchrun first,
then Ray, `--repeats` times; the median of each figure is kept.

Time to first step: wall time from starting `ftl run` / `ftl submit` until step 1's record is in the run
dir's metrics.jsonl (polled every 50 ms). For Ray that includes submission, the working-dir upload, the
job driver and starting the worker group. Steady steps/s: from metrics.jsonl's `elapsed_s` (rank 0's
clock), from the first logged step past the first 20% of steps (warm-up) to the last one.
Checkpoints during training are off by default (`--checkpoint-every 0`), so the rate is the training
step alone; the final save comes after the last logged step and is outside the rate either way.

Read the figures with the load average printed for each run: Ray starts its workers at nice 15 (Ray's
`worker_niceness` default) while torchrun's ranks keep nice 0, so on a machine others use too, Ray's
ranks yield the cores first and the ratio says more about the load than about Ray.

Where the time goes: over the same steady window the bench reads every process's CPU time from /proc,
split into the ranks (torchrun's `launcher.train` processes, Ray's `RayTrainWorker`s) and everything else
on the machine (Ray's GCS, raylets, dashboard and agents, Ray Train's controller and helper actors, the
job driver; the idle local Ray stays up during the torchrun runs too). Two ranks in lock-step on two
cores wait for each other, so a core another process takes from one rank stalls both.

The local Ray is started if its dashboard does not answer, and stopped at the end only then. The FTL_RAY_*
variables of tests/ray/ray-nodes.sh choose its ports and temp dir (then the dashboard's port is the address).

Usage: python bench/ray_overhead.py [--steps 150] [--log-every 5] [--repeats 1] [--checkpoint-every 0]
Last line: RESULT ray_vs_torchrun_steps_ratio=.. ray_first_step_s=.. torchrun_first_step_s=.. ray_other_cpu_pct=..
torchrun_other_cpu_pct=..
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from launcher.metrics import read_metrics
from launcher.outcome import Outcome, read_outcome

REPO = Path(__file__).resolve().parents[1]
FTL = str(Path(sys.executable).parent / "ftl")
# tests/ray's dashboard; its scripts take FTL_RAY_DASHBOARD_PORT, FTL_RAY_PORT, FTL_RAY_TMP, ... for a second
# local Ray beside one that tests start and stop.
RAY_ADDRESS = f"http://127.0.0.1:{os.environ.get('FTL_RAY_DASHBOARD_PORT', '8265')}"
POLL_S = 0.05
WARMUP_FRACTION = 0.2
RANK_MARKERS = {"torchrun": "launcher.train", "ray": "RayTrainWorker"}  # in a rank's command line


@dataclass(frozen=True)
class Measured:
    first_step_s: float
    steps_per_s: float
    slowest_window: str  # the slowest logged window after warm-up, against the median one
    rank_cpu_pct: float  # the ranks' CPU over the steady window, % of one core (all ranks together)
    other_cpu_pct: float  # every other process's


def cpu_ticks(rank_marker: str) -> tuple[int, int]:
    """(ranks', everyone else's) CPU ticks (user + system) so far, over every process in /proc; a rank is a
    process whose command line holds `rank_marker`. A process that ends inside the window takes its ticks
    with it (short-lived helpers are missed), which the steady window of a training run makes rare."""
    ranks = others = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                command = f.read()
        except OSError:  # gone meanwhile
            continue
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        if rank_marker.encode() in command and b"cluster.torchrun" not in command:  # not torchrun's agent
            ranks += ticks
        else:
            others += ticks
    return ranks, others


class CpuWindow:
    """CPU use between two training steps: a /proc snapshot when the run first logs a step past the
    warm-up, and another when it first logs one past 90% of its steps."""

    def __init__(self, rank_marker: str, steps: int) -> None:
        self.marker = rank_marker
        self.marks = [WARMUP_FRACTION * steps, 0.9 * steps]
        self.snapshots: list[tuple[float, int, int]] = []

    def observe(self, metrics: Path) -> None:
        if len(self.snapshots) == len(self.marks):
            return
        try:
            last = metrics.read_text().rstrip().rsplit("\n", 1)[-1]
            step = json.loads(last).get("step", 0) if '"loss"' in last else 0
        except (FileNotFoundError, ValueError):
            return
        if step >= self.marks[len(self.snapshots)]:
            self.snapshots.append((time.monotonic(), *cpu_ticks(self.marker)))

    def percent(self) -> tuple[float, float]:
        """(ranks', others') CPU in % of one core over the window."""
        if len(self.snapshots) < 2:
            return float("nan"), float("nan")
        (t0, r0, o0), (t1, r1, o1) = self.snapshots
        per_s = os.sysconf("SC_CLK_TCK") * (t1 - t0) / 100
        return (r1 - r0) / per_s, (o1 - o0) / per_s


def dashboard_answers(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=3):
            return True
    except OSError:
        return False


def other_ray_jobs(address: str) -> list[str]:
    """Jobs not finished on the cluster: they hold its CPUs, so ours would wait or share the cores."""
    with urllib.request.urlopen(f"{address}/api/jobs/", timeout=5) as response:
        jobs = json.load(response)
    return [j.get("submission_id") or j["job_id"] for j in jobs if j["status"] in ("PENDING", "RUNNING")]


def has_first_step(metrics: Path) -> bool:
    try:
        return '"loss"' in metrics.read_text()
    except FileNotFoundError:
        return False


def log_tail(log_path: Path, lines: int = 15) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def run_timed(commands: list[list[str]], run_dir: Path, env: dict[str, str], log_path: Path, timeout_s: float, cpu: CpuWindow) -> float:
    """Run `commands` one after the other, each to exit 0; return the seconds from the first one's start
    until step 1's record appeared in the run dir's metrics.jsonl. `cpu` watches the steps meanwhile."""
    metrics = run_dir / "metrics.jsonl"
    start = time.perf_counter()
    first_step_s = None
    with open(log_path, "w") as log:
        for argv in commands:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                if first_step_s is None and has_first_step(metrics):
                    first_step_s = time.perf_counter() - start
                if first_step_s is not None:
                    cpu.observe(metrics)
                if time.perf_counter() - start > timeout_s:
                    proc.terminate()
                    proc.wait()
                    raise RuntimeError(f"`ftl {argv[1]}` still running after {timeout_s:.0f} s:\n{log_tail(log_path)}")
                time.sleep(POLL_S)
            if first_step_s is None and has_first_step(metrics):  # written during the last poll interval
                first_step_s = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"`ftl {argv[1]}` exited {proc.returncode}:\n{log_tail(log_path)}")
    result = read_outcome(run_dir)
    if first_step_s is None or result is None or result.outcome is not Outcome.DONE:
        raise RuntimeError(f"the run did not finish training (outcome {result}):\n{log_tail(log_path)}")
    return first_step_s


def steady(run_dir: Path, steps: int, first_step_s: float, cpu: CpuWindow) -> Measured:
    logged = [r for r in read_metrics(run_dir) if "loss" in r]
    after_warmup = [r for r in logged if r["step"] >= WARMUP_FRACTION * steps]
    warm, last = after_warmup[0], after_warmup[-1]
    windows = [  # (first step, last step, seconds per step) of each logged window after warm-up
        (a["step"] + 1, b["step"], (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]))
        for a, b in zip(after_warmup, after_warmup[1:])
    ]
    median_s = statistics.median(w[2] for w in windows)
    lo, hi, slowest_s = max(windows, key=lambda w: w[2])
    rank_cpu, other_cpu = cpu.percent()
    return Measured(
        first_step_s=first_step_s,
        steps_per_s=(last["step"] - warm["step"]) / (last["elapsed_s"] - warm["elapsed_s"]),
        slowest_window=f"steps {lo}-{hi} at {1000 * slowest_s:.0f} ms/step ({slowest_s / median_s:.1f}x the median {1000 * median_s:.0f})",
        rank_cpu_pct=rank_cpu,
        other_cpu_pct=other_cpu,
    )


def run_torchrun(run_dir: Path, overrides: list[str], timeout_s: float, cpu: CpuWindow) -> float:
    argv = [FTL, "run", "configs/quickstart.yaml", f"output_dir={run_dir}", "--no-resume", *overrides]
    return run_timed([argv], run_dir, dict(os.environ), run_dir.parent / f"{run_dir.name}.log", timeout_s, cpu)


def run_ray(run_dir: Path, overrides: list[str], address: str, timeout_s: float, cpu: CpuWindow) -> float:
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    submit = [FTL, "submit", "configs/quickstart.yaml", "--to", "ray", f"output_dir={run_dir}", "--no-resume", *overrides]
    follow = [FTL, "logs", "-f", str(run_dir)]  # returns when the Ray job has ended
    try:
        return run_timed([submit, follow], run_dir, env, run_dir.parent / f"{run_dir.name}.log", timeout_s, cpu)
    except BaseException:
        if (run_dir / "ray-ledger.jsonl").is_file():  # submitted: do not leave the job on the cluster
            subprocess.run([FTL, "cancel", str(run_dir)], cwd=REPO, env=env, capture_output=True)
        raise


def start_local_ray() -> str:
    out = subprocess.run(["bash", "tests/ray/start-local-ray.sh"], cwd=REPO, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="train.max_steps of each run")
    parser.add_argument("--log-every", type=int, default=5, help="train.log_every: the granularity of the rate")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each backend; the median is kept")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint.every (0: only the final save)")
    parser.add_argument("--timeout-s", type=float, default=1200, help="per run, launch to end")
    args = parser.parse_args()
    overrides = [f"train.max_steps={args.steps}", f"train.log_every={args.log_every}", f"checkpoint.every={args.checkpoint_every}"]

    started_ray = not dashboard_answers(RAY_ADDRESS)
    address = start_local_ray() if started_ray else RAY_ADDRESS
    print(f"Ray at {address} ({'started here' if started_ray else 'already running'}); overrides: {' '.join(overrides)}", flush=True)
    results: dict[str, list[Measured]] = {"torchrun": [], "ray": []}
    try:
        with tempfile.TemporaryDirectory(prefix="ftl-bench-ray-") as tmp:
            for r in range(args.repeats):
                for backend in results:
                    run_dir = Path(tmp) / f"{backend}-{r}"
                    if backend == "ray" and (busy := other_ray_jobs(address)):
                        print(f"note: other Ray jobs not finished before this run: {', '.join(busy)}", flush=True)
                    load_before = os.getloadavg()[0]
                    cpu = CpuWindow(RANK_MARKERS[backend], args.steps)
                    if backend == "torchrun":
                        first_s = run_torchrun(run_dir, overrides, args.timeout_s, cpu)
                    else:
                        first_s = run_ray(run_dir, overrides, address, args.timeout_s, cpu)
                    m = steady(run_dir, args.steps, first_s, cpu)
                    results[backend].append(m)
                    print(
                        f"run {r + 1} {backend:8s} first step {m.first_step_s:6.2f} s, steady {m.steps_per_s:6.2f} steps/s; "
                        f"slowest {m.slowest_window}; CPU % of a core: ranks {m.rank_cpu_pct:.0f}, other processes "
                        f"{m.other_cpu_pct:.0f}; load avg {load_before:.2f} -> {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
    finally:
        if started_ray:
            subprocess.run(["bash", "tests/ray/stop-local-ray.sh"], cwd=REPO, capture_output=True)

    def median_of(ms: list[Measured], field: str) -> float:
        values = [v for m in ms if not math.isnan(v := getattr(m, field))]  # a CPU window a run never reached: NaN
        return statistics.median(values) if values else float("nan")

    median = {
        backend: tuple(median_of(ms, field) for field in ("first_step_s", "steps_per_s", "rank_cpu_pct", "other_cpu_pct"))
        for backend, ms in results.items()
    }
    print(f"{'backend':9s} {'first step s':>12s} {'steady steps/s':>15s} {'ranks CPU %':>12s} {'others CPU %':>13s}")
    for backend, (first_s, rate, rank_cpu, other_cpu) in median.items():
        print(f"{backend:9s} {first_s:12.2f} {rate:15.2f} {rank_cpu:12.0f} {other_cpu:13.0f}")
    ratio = median["ray"][1] / median["torchrun"][1]
    print(f"goal: Ray's steady steps/s >= 0.95 x torchrun's: {'met' if ratio >= 0.95 else 'not met'} ({ratio:.3f})")
    print(
        f"RESULT ray_vs_torchrun_steps_ratio={ratio:.3f} ray_first_step_s={median['ray'][0]:.2f} "
        f"torchrun_first_step_s={median['torchrun'][0]:.2f} ray_other_cpu_pct={median['ray'][3]:.1f} "
        f"torchrun_other_cpu_pct={median['torchrun'][3]:.1f}"
    )


if __name__ == "__main__":
    main()
