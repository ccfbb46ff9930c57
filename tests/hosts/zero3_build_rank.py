"""For tests: the model a ZeRO-3 plan's strategy builds (`building()`, as the train entry builds it), before
`deepspeed.initialize` sees it: per parameter, the elements this rank holds and the parameter's whole
size, written as JSON. Usage: torchrun ... -m tests.hosts.zero3_build_rank RUN_DIR OUT_PREFIX
(rank r writes OUT_PREFIX-r.json)."""

import json
import sys
from pathlib import Path


def main() -> None:
    from launcher.job import RankJob, strategy_config
    from launcher.modeling import build_model
    from launcher.rank_env import RankEnv
    from launcher.runtime import RankRuntime, resolve_device
    from strategies.registry import get_strategy

    run_dir, prefix = Path(sys.argv[1]), sys.argv[2]
    job, env = RankJob.read(run_dir), RankEnv.from_env()
    device = resolve_device(job.plan.request.device, env.local_rank, str(run_dir / "plan.json"))
    runtime = RankRuntime.start(env, device, job.plan.request.precision, 120)
    strategy = get_strategy(job.plan.strategy)(strategy_config(job.spec, job.plan), runtime.ctx)
    with strategy.building():
        model = build_model(job.spec, device=device, strategy=job.plan.strategy)
    sizes = {
        name: {"held": (p.ds_tensor if hasattr(p, "ds_tensor") else p).numel(), "whole": getattr(p, "ds_numel", p.numel())}
        for name, p in model.named_parameters()
    }
    Path(f"{prefix}-{env.rank}.json").write_text(json.dumps({"partitions_at_build": strategy.partitions_at_build, "sizes": sizes}))
    del model, strategy
    runtime.close()


if __name__ == "__main__":
    main()
