"""HF `Trainer` on the quickstart model and data, for the step-overhead comparison.
Usage: torchrun --nproc-per-node 2 bench/hf_trainer.py STEPS OUT.json"""

import json
from pathlib import Path
import sys
import time

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.start = time.perf_counter()
        self.end, self.steps = time.perf_counter(), state.global_step


def main() -> None:
    steps, out = int(sys.argv[1]), sys.argv[2]
    job = yaml.safe_load(open("configs/quickstart.yaml"))
    torch.manual_seed(0)
    cfg = dict(job["model"]["config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    seq = job["train"]["seq_len"]
    flat = []
    for line in open(Path("configs") / job["data"]["train"]):  # relative to the spec's folder, as ftl reads it
        flat += [b + 3 for b in json.loads(line)["text"].encode()] + [1]
    blocks = torch.tensor(flat[: len(flat) // seq * seq]).view(-1, seq)
    args = TrainingArguments(
        output_dir="/tmp/ftl-bench-trainer",
        max_steps=steps,
        per_device_train_batch_size=job["train"]["micro_batch_size"],
        learning_rate=job["train"]["lr"],
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        ddp_backend="gloo" if not torch.cuda.is_available() else None,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,  # a fair baseline: FTL does not search for unused params either
    )
    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(blocks), callbacks=[clock])
    trainer.train()
    if trainer.is_world_process_zero():
        world = trainer.args.world_size
        json.dump({"steps_per_s": (clock.steps - 1) / (clock.end - clock.start), "world_size": world}, open(out, "w"))


if __name__ == "__main__":
    main()
