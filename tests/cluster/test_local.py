"""The torchrun command FTL renders, and that `run_local` returns the job's exit code and forwards signals."""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.local import job_env, torchrun_argv
from tests.conftest import REPO

LD_SO = "/lib64/ld-linux-x86-64.so.2"


def test_single_node_command_is_standalone():
    argv = torchrun_argv(Path("/runs/x"), nproc_per_node=2, shutdown_timeout_s=300, python="python")
    assert argv == [
        "python", "-m", "cluster.torchrun", "--nproc-per-node", "2", "--standalone",
        "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR2,SIGHUP,SIGQUIT", "--shutdown-timeout", "300",
        "--max-restarts", "0", "-m", "launcher.train", "--run-dir", "/runs/x",
    ]


def test_multi_node_command_uses_c10d_rendezvous():
    argv = torchrun_argv(Path("run"), nproc_per_node=8, nnodes=4, rdzv_endpoint="node1:29500", run_id="job7", python="python")
    joined = " ".join(argv)
    assert "--standalone" not in argv
    assert "--nnodes 4 --rdzv-backend c10d --rdzv-endpoint node1:29500 --rdzv-id job7" in joined


def _launcher(child_code: str) -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        import sys
        from cluster.local import run_local
        sys.exit(run_local([sys.executable, "-c", {child_code!r}]))
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)


def test_exit_code_is_returned():
    proc = _launcher("import sys; sys.exit(3)")
    assert proc.wait(timeout=60) == 3


def test_sigterm_reaches_the_job():
    child = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\nprint('ready', flush=True)\ntime.sleep(60)"
    proc = _launcher(child)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert proc.wait(timeout=30) == 7
    assert time.monotonic() - start < 10


def test_cpu_ranks_get_the_copy_tunable_without_losing_the_users():
    assert job_env("cuda", {"PATH": "/bin"}) == {"PATH": "/bin"}  # one rank: all threads, as torchrun leaves it
    assert job_env("cuda", {"PATH": "/bin"}, 2) == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}  # what torchrun sets, without its banner
    assert job_env("cuda", {"OMP_NUM_THREADS": "4"}, 2)["OMP_NUM_THREADS"] == "4"
    env = job_env("cpu", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.cpu.x86_non_temporal_threshold=0x100000"
    assert env["DS_ACCELERATOR"] == "cpu"
    own = "glibc.cpu.x86_non_temporal_threshold=0x400000"
    assert job_env("cpu", {"GLIBC_TUNABLES": own})["GLIBC_TUNABLES"] == own


@pytest.mark.skipif(not Path(LD_SO).exists() or platform.machine() != "x86_64", reason="needs x86-64 glibc's loader")
def test_the_tunable_reaches_glibc():
    listed = subprocess.run([LD_SO, "--list-tunables"], env=job_env("cpu", {}), capture_output=True, text=True, check=True).stdout
    assert "glibc.cpu.x86_non_temporal_threshold: 0x100000 " in listed
