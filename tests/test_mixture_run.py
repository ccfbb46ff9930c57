"""`ftl run configs/multitask.yaml` on 2 CPU ranks: two sources of different formats mixed by weight,
tokenized once into the cache (a second start reads it), each source's loss logged and falling."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import metric_records, run_ftl


def test_multitask_mixture_trains_logs_each_source_and_reuses_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    common = [f"data.cache_dir={cache}", "hardware.device=cpu", "train.log_every=10", "checkpoint.every=0", "checkpoint.export_final=false"]
    first = run_ftl("run", "configs/multitask.yaml", f"output_dir={tmp_path / 'a'}", "train.max_steps=40", *common)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    records = metric_records(tmp_path / "a")
    data = {r["source"]: r for r in records if r.get("event") == "data"}
    # `ftl run` tokenized both before the ranks started (its pre-flight); the ranks read the cache.
    assert "data prose:" in first.stdout and "data arithmetic:" in first.stdout and first.stdout.count("(tokenized in") == 2, first.stdout[-3000:]
    assert set(data) == {"prose", "arithmetic"} and not any(r["tokenized"] for r in data.values())
    assert data["arithmetic"]["supervised_tokens"] < data["prose"]["supervised_tokens"]  # answers only
    logged = [r for r in records if "loss/prose" in r]
    assert len(logged) >= 5 and all("loss/arithmetic" in r for r in logged)
    for name in ("prose", "arithmetic"):
        assert logged[-1][f"loss/{name}"] < logged[0][f"loss/{name}"], (name, logged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the dev extra installs it

    scalars = EventAccumulator(str(tmp_path / "a" / "tensorboard")).Reload()
    prose = [(e.step, e.value) for e in scalars.Scalars("loss/prose")]
    assert prose == [(r["step"], pytest.approx(r["loss/prose"], rel=1e-5)) for r in logged]

    again = run_ftl("run", "configs/multitask.yaml", f"output_dir={tmp_path / 'b'}", "train.max_steps=2", "train.warmup_steps=0", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    events = [r for r in metric_records(tmp_path / "b") if r.get("event") == "data"]
    assert len(events) == 2 and not any(r["tokenized"] for r in events)
    assert all("from the cache" in r["detail"] for r in events) and again.stdout.count("(from the cache)") == 2 and "(tokenized in" not in again.stdout


def test_chat_job_that_would_supervise_nothing_stops_before_training(tmp_path: Path) -> None:
    # At 32 tokens no assistant turn starts inside the sequence (the system and user turns fill it).
    result = run_ftl("run", "configs/chat.yaml", f"output_dir={tmp_path / 'chat'}", f"data.cache_dir={tmp_path / 'cache'}",
                     "train.seq_len=32", "hardware.device=cpu")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "supervises zero tokens" in result.stderr and "chat.jsonl" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "chat").exists()  # found before the run dir was written
