"""A minimal hand-written torchrun DDP loop: the baseline FTL's per-step overhead is measured against.
Same model config, data, batch and optimizer as configs/quickstart.yaml; no logging, no checkpoints.
Usage: torchrun --nproc-per-node 2 bench/hand_ddp.py STEPS OUT.json"""

import json
from pathlib import Path
import sys
import time

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    steps, out = int(sys.argv[1]), sys.argv[2]
    job = yaml.safe_load(open("configs/quickstart.yaml"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = dict(job["model"]["config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=job["train"]["lr"], betas=(0.9, 0.95))

    # Byte tokens (+3 like ByT5's offset) with an EOS of 1 after each text, packed into seq_len blocks.
    seq = job["train"]["seq_len"]
    flat = []
    for line in open(Path("configs") / job["data"]["train"]):  # relative to the spec's folder, as ftl reads it
        flat += [b + 3 for b in json.loads(line)["text"].encode()] + [1]
    blocks = torch.tensor(flat[: len(flat) // seq * seq]).view(-1, seq)
    mb = job["train"]["micro_batch_size"]
    gen = torch.Generator().manual_seed(rank)

    for step in range(1, steps + 1):
        batch = blocks[torch.randint(0, len(blocks), (mb,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        if step == 1:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    if rank == 0:
        json.dump({"steps_per_s": (steps - 1) / elapsed, "last_loss": loss.item()}, open(out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
