"""The per-rank entry that torchrun starts: `python -m launcher.train --spec RUN_DIR/spec.yaml`.

One loop for every strategy, readable top to bottom: build, wrap, step, log, save.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from launcher.checkpoint import save_checkpoint
from launcher.data import BlockStream, build_tokenizer, check_vocab, load_blocks
from launcher.errors import FTLError
from launcher.metrics import MetricsLog
from launcher.model_info import model_shape
from launcher.modeling import build_model, build_optimizer, build_scheduler, pretrained_weights
from launcher.planner import plan as make_plan
from launcher.planner import request_from_spec
from launcher.rank_env import RankEnv
from launcher.spec import JobSpec, load_spec
from strategies import get_strategy
from strategies.base import RankContext

# A collective that waits longer than this means a peer died: fail instead of hanging forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FTLError("`hardware.device` is cuda but this machine has no CUDA device; use `hardware.device=auto`.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(spec: JobSpec) -> None:
    env = RankEnv.from_env()
    device = resolve_device(spec.hardware.device, env.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    plan = make_plan(request_from_spec(spec, model_shape(spec.model), device.type))
    compute_dtype = torch.bfloat16 if plan.request.precision == "bf16" else torch.float32
    ctx = RankContext(env=env, device=device, compute_dtype=compute_dtype)
    run_dir = spec.output_dir
    log = MetricsLog(run_dir, spec.train.max_steps, enabled=env.is_main)

    tokenizer = build_tokenizer(spec)
    strategy = get_strategy(plan.strategy)(plan, ctx, spec.train)
    seed_everything(spec.train.seed)  # same seed on every rank: identical init
    model = build_model(spec, meta=strategy.meta_init)
    check_vocab(tokenizer, model.get_input_embeddings().num_embeddings)
    blocks = load_blocks(spec, tokenizer, spec.data.train)
    stream = BlockStream(blocks, spec.train.micro_batch_size, env.rank, env.world_size, spec.train.seed)

    if not strategy.meta_init:
        model = model.to(device)
    strategy.setup(model, lambda m: build_optimizer(m, spec.train, device.type), pretrained_weights(spec))
    scheduler = build_scheduler(strategy.optimizer, spec.train)
    seed_everything(spec.train.seed + env.rank)  # dropout differs per rank, reproducibly
    log.message(
        f"FTL: {plan.strategy} on {env.world_size} x {device.type} ({plan.request.precision}), "
        f"{plan.request.shape.params_total:,} params, {len(blocks)} sequences of {spec.train.seq_len} tokens"
    )

    tokens_per_step = spec.train.micro_batch_size * spec.train.seq_len * spec.train.grad_accum * env.world_size
    window_start, window_steps = log.elapsed_s(), 0
    for step in range(1, spec.train.max_steps + 1):
        loss_sum = torch.zeros((), device=device)
        for micro in range(spec.train.grad_accum):
            batch = stream.next_batch().to(device, non_blocking=True)
            with strategy.accumulate(sync=micro == spec.train.grad_accum - 1):
                with ctx.autocast():
                    loss = strategy.model(input_ids=batch, labels=batch).loss / spec.train.grad_accum
                strategy.backward(loss)
            loss_sum += loss.detach()
        grad_norm = strategy.step(spec.train.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        window_steps += 1

        if step % spec.train.log_every == 0 or step == 1 or step == spec.train.max_steps:
            dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
            mean_loss = loss_sum.item() / env.world_size
            now = log.elapsed_s()
            log.log(
                {
                    "step": step,
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_step * window_steps / max(now - window_start, 1e-9),
                }
            )
            window_start, window_steps = now, 0
        if spec.checkpoint.every and step % spec.checkpoint.every == 0 and step != spec.train.max_steps:
            save_checkpoint(run_dir, step, strategy, env, {"step": step, "data": stream.state_dict()}, spec.checkpoint.keep)

    if spec.data.validation is not None:
        log.log({"step": spec.train.max_steps, "val_loss": evaluate(spec, strategy, tokenizer, env, ctx)})
    final = save_checkpoint(
        run_dir, spec.train.max_steps, strategy, env, {"step": spec.train.max_steps, "data": stream.state_dict()}, spec.checkpoint.keep
    )
    log.message(f"FTL: done; checkpoint {final}")
    log.close()
    dist.destroy_process_group()


@torch.no_grad()
def evaluate(spec: JobSpec, strategy, tokenizer, env: RankEnv, ctx: RankContext, max_batches: int = 16) -> float:
    """Mean loss over this rank's slice of the validation blocks, averaged across ranks."""
    blocks = load_blocks(spec, tokenizer, spec.data.validation)[env.rank :: env.world_size]
    strategy.model.eval()
    total = torch.zeros(2, device=ctx.device)
    for batch in blocks.split(spec.train.micro_batch_size)[:max_batches]:
        batch = batch.to(ctx.device)
        with ctx.autocast():
            total[0] += strategy.model(input_ids=batch, labels=batch).loss.float() * len(batch)
        total[1] += len(batch)
    strategy.model.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher.train", description="FTL per-rank training entry (started by torchrun).")
    parser.add_argument("--spec", required=True, help="the resolved spec.yaml in the run dir")
    args = parser.parse_args(argv)
    try:
        train(load_spec(args.spec))
    except FTLError as exc:
        print(f"error (rank {os.environ.get('RANK', 0)}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
