"""The run dir as the host <-> rank contract: the host (`ftl run`, a batch script, a Ray driver) writes
the resolved spec and the plan; every rank reads both and runs exactly that plan. Nothing flows back
but checkpoints, metrics and outcome.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import FTLError
from launcher.outcome import clear_outcome
from launcher.planner import Plan
from launcher.spec import JobSpec, load_spec
from strategies.catalog import PEFT_METHODS
from strategies.config import StrategyConfig

SPEC_FILE = "spec.yaml"
PLAN_FILE = "plan.json"
DEEPSPEED_FILE = "deepspeed.json"


@dataclass(frozen=True)
class RankJob:
    """What a rank runs: the spec and the plan the host made, read from the run dir."""

    run_dir: Path
    spec: JobSpec
    plan: Plan

    @classmethod
    def read(cls, run_dir: Path) -> "RankJob":
        run_dir = Path(run_dir).resolve()
        spec_file, plan_file = run_dir / SPEC_FILE, run_dir / PLAN_FILE
        for path in (spec_file, plan_file):
            if not path.is_file():
                raise FTLError(
                    f"{path} is missing: ranks run the spec and plan that the host wrote into the run dir. Start ranks "
                    "with `ftl run JOB.yaml`, which writes both, not by hand."
                )
        try:
            plan = Plan.from_dict(json.loads(plan_file.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise FTLError(f"{plan_file} is not a plan this FTL wrote ({exc!r}); re-plan with `ftl run JOB.yaml`.") from None
        return cls(run_dir, load_spec(spec_file), plan)


def strategy_config(spec: JobSpec, plan: Plan) -> StrategyConfig:
    """What the strategy of `plan` needs to know about the job (strategies/ never reads the spec)."""
    train = spec.train
    return StrategyConfig(
        name=plan.strategy,
        device=plan.request.device,
        precision=plan.request.precision,
        world_size=plan.request.world_size,
        shard_group=plan.shard_group,
        trainable_only=plan.request.method in PEFT_METHODS,
        micro_batch_size=train.micro_batch_size,
        grad_accum=train.grad_accum,
        max_grad_norm=train.max_grad_norm,
    )


def prepare_run_dir(spec: JobSpec, plan: Plan, fresh: bool, say=print) -> None:
    """Write the resolved spec and the plan for the ranks. A run dir with a checkpoint is resumed (after
    checking the checkpoint fits this spec); with `fresh`, or when an earlier run left no checkpoint, its
    files are set aside in previous-<time>/, never deleted."""
    from launcher.checkpoint import find_resume_checkpoint
    from launcher.train_state import spec_fingerprint

    run_dir = spec.output_dir
    resume = None
    if not fresh:
        resume = find_resume_checkpoint(run_dir, spec_fingerprint(spec), fallback=spec.checkpoint.on_corrupt == "previous")
    if resume is not None:
        say(f"resuming from {resume.path} (step {resume.step}); pass --no-resume to start over")
    else:
        earlier = [run_dir / name for name in ("checkpoints", "metrics.jsonl") if (run_dir / name).exists()]
        if earlier:
            aside = run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
            aside.mkdir(parents=True)
            for path in earlier:
                path.rename(aside / path.name)
            say(f"earlier run moved to {aside}")
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_outcome(run_dir)
    (run_dir / SPEC_FILE).write_text(spec.to_yaml())
    (run_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    ds_config = deepspeed_json(spec, plan)
    if ds_config:
        (run_dir / DEEPSPEED_FILE).write_text(json.dumps(ds_config, indent=2) + "\n")


def deepspeed_json(spec: JobSpec, plan: Plan) -> dict | None:
    from strategies.catalog import traits
    from strategies.deepspeed_config import deepspeed_config

    if traits(plan.strategy).library != "deepspeed":
        return None
    return deepspeed_config(strategy_config(spec, plan))
