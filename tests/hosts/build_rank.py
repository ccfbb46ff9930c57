"""For tests: the train entry's build (`Trainer.build`) on the plan in the run dir, then the whole model
as rank 0 sees it after gathering every shard: parameters by name, and for each 4-bit layer its weight
dequantised with the constants the rank holds. Usage: torchrun ... -m tests.hosts.build_rank RUN_DIR OUT"""

import gc
import sys
from pathlib import Path

from safetensors.torch import save_file


def main() -> None:
    import bitsandbytes.functional as bnbf
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from launcher.job import RankJob
    from launcher.rank_env import RankEnv
    from launcher.runtime import RankRuntime, resolve_device
    from launcher.stop import PolledStop
    from launcher.trainer import Trainer

    run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    job, env = RankJob.read(run_dir), RankEnv.from_env()
    device = resolve_device(job.plan.request.device, env.local_rank, str(run_dir / "plan.json"))
    runtime = RankRuntime.start(env, device, job.plan.request.precision, 120)
    trainer = Trainer(job, job.plan, runtime, PolledStop(lambda: False))
    trainer.build()
    model = trainer.model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank == 0:  # the full state is gathered onto rank 0 only
        tensors = {name: t.detach().clone().contiguous() for name, t in state.items()}
        for name, module in model.named_modules():
            if type(module).__name__ == "Linear4bit":
                packed = tensors[f"{name}.weight"]
                tensors[f"{name}.dequantized"] = bnbf.dequantize_4bit(packed, module.quant_state).contiguous()
        save_file(tensors, str(out))
    # As launcher.entries.run_rank does: the model and its FSDP state go before the groups they use.
    del model, state
    trainer.close()
    gc.collect()
    runtime.close()


if __name__ == "__main__":
    main()
