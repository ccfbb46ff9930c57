"""The per-rank entry that torchrun starts: `python -m launcher.train --spec RUN_DIR/spec.yaml`.

One loop for every strategy, readable top to bottom: build, wrap, step, log, save.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import gc
import json
import math
import os
import random
import signal
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from launcher.checkpoint import DCP_STRATEGIES, Checkpoint, Checkpointer, clean_stale_tmp, find_resume_checkpoint
from launcher.data import BlockStream, build_tokenizer, check_vocab, load_examples
from launcher.errors import FTLError
from launcher.evaluation import EarlyStopping, evaluate
from launcher.methods import (
    all_trainable,
    first_step_gradient_problem,
    head_names,
    init_prompt_from_text,
    unfreeze_top_blocks,
    unfrozen_blocks_at,
)
from launcher.metrics import MetricsLog, memory_record
from launcher.model_info import model_shape, transformer_blocks
from launcher.modeling import build_model, build_optimizer, build_scheduler, count_trainable, pretrained_weights
from launcher.planner import plan as make_plan
from launcher.planner import request_from_spec
from launcher.rank_env import RankEnv
from launcher.spec import JobSpec, load_spec
from launcher.train_state import capture_rng, restore_rng, spec_fingerprint
from strategies import check_pinned_memory, get_strategy
from strategies.base import RankContext


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
    timeout = datetime.timedelta(seconds=spec.train.collective_timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    plan = make_plan(request_from_spec(spec, model_shape(spec.model), device.type, count_trainable(spec)))
    check_pinned_memory(plan.strategy, device.type)
    compute_dtype = torch.bfloat16 if plan.request.precision == "bf16" else torch.float32
    ctx = RankContext(env=env, device=device, compute_dtype=compute_dtype)
    run_dir = spec.output_dir
    spec_hash = spec_fingerprint(spec)
    if env.is_main:
        clean_stale_tmp(run_dir)
    resume = find_resume_checkpoint(run_dir, spec_hash, fallback=spec.checkpoint.on_corrupt == "previous")
    check_resumable(resume, plan.strategy, env.world_size)
    start_step = resume.step if resume else 0
    log = MetricsLog(run_dir, spec.train.max_steps, start_step=start_step, enabled=env.is_main)

    tokenizer = build_tokenizer(spec)
    train_examples, label_names = load_examples(spec, tokenizer, spec.data.train)
    stream = BlockStream(train_examples, spec.train.micro_batch_size, env.rank, env.world_size, spec.train.seed)
    strategy = get_strategy(plan.strategy)(plan, ctx, spec.train)
    seed_everything(spec.train.seed)  # same seed on every rank: identical init
    # PEFT wrappers and new task heads are built on the real model; plain causal-LM models under FSDP2
    # are built on the meta device and materialised shard by shard.
    meta = strategy.meta_init and spec.task.name == "causal_lm" and not spec.method.is_peft
    model = build_model(spec, meta=meta, label_names=label_names, pad_token_id=tokenizer.pad_token_id, device=device)
    check_vocab(tokenizer, model.get_input_embeddings().num_embeddings)
    if spec.method.name == "prompt_tuning" and spec.method.prompt_tuning.init == "text":
        init_prompt_from_text(model, tokenizer(spec.method.prompt_tuning.init_text, add_special_tokens=False)["input_ids"])
    heads = head_names(model, spec.task.num_labels)
    blocks = transformer_blocks(model)
    gradual = spec.method.name == "gradual_unfreezing"
    unfrozen = unfreeze_top_blocks(blocks, unfrozen_blocks_at(spec.method, start_step + 1, len(blocks))) if gradual else 0
    new_head = spec.task.name == "classification"

    def make_optimizer(wrapped: torch.nn.Module) -> torch.optim.Optimizer:
        # Gradual unfreezing: every block is in the optimizer from the start (a frozen one gets no
        # gradient, hence no update and no Adam state), so unfreezing needs no new param groups.
        with all_trainable(blocks if gradual else []):
            return build_optimizer(wrapped, spec.train, device.type, heads, new_head)

    if not meta and spec.method.name != "qlora":  # 4-bit weights are placed on the device as they load
        model = model.to(device)
    strategy.setup(model, make_optimizer, pretrained_weights(spec))
    scheduler = build_scheduler(strategy.optimizer, spec.train)
    seed_everything(spec.train.seed + env.rank)  # dropout differs per rank, reproducibly
    if resume:
        strategy.load(resume.path)
        state = resume.trainer_state(env.rank)
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(rescale_position(state["data"], resume.manifest["world_size"], env.world_size))
        if resume.manifest["world_size"] == env.world_size:
            restore_rng(state["rng"])
        log.message(f"FTL: resumed from {resume.path} (step {start_step})")
    log.message(
        f"FTL: {plan.strategy} on {env.world_size} x {device.type} ({plan.request.precision}), method {spec.method.name}, "
        f"{plan.request.shape.params_total:,} params, {plan.request.params_trainable:,} trainable, "
        f"{len(stream)} training examples of {spec.train.seq_len} tokens"
    )
    if gradual:
        log_stage(log, start_step + 1, unfrozen, len(blocks), model)
    validation = None
    if spec.data.validation is not None:
        validation, _ = load_examples(spec, tokenizer, spec.data.validation, label_names)
    if env.is_main and label_names is not None:
        (run_dir / "labels.json").write_text(json.dumps({"id2label": dict(enumerate(label_names))}, indent=2))

    checkpointer = Checkpointer(run_dir, strategy, env, spec.checkpoint.keep, spec_hash, spec.checkpoint.async_save)

    def save(step: int, wait: bool = True) -> Path:
        state = {"step": step, "data": stream.state_dict(), "rng": capture_rng(), "scheduler": scheduler.state_dict()}
        return checkpointer.save(step, state, wait=wait)

    stop_requested = install_stop_signals()
    last = min(spec.train.max_steps, spec.train.stop_at or spec.train.max_steps)
    tokens_per_step = spec.train.micro_batch_size * spec.train.seq_len * spec.train.grad_accum * env.world_size
    window_start, window_steps = log.elapsed_s(), 0
    watch = EarlyStopping(spec.train.early_stopping_metric, spec.train.early_stopping_patience)
    for step in range(start_step + 1, last + 1):
        if gradual and (due := unfrozen_blocks_at(spec.method, step, len(blocks))) > unfrozen:
            unfrozen = unfreeze_top_blocks(blocks, due)
            strategy.trainable_changed()
            log_stage(log, step, unfrozen, len(blocks), model)
        loss_sum = torch.zeros((), device=device)
        for micro in range(spec.train.grad_accum):
            batch = {name: t.to(device, non_blocking=True) for name, t in stream.next_batch().items()}
            with strategy.accumulate(sync=micro == spec.train.grad_accum - 1):
                with ctx.autocast():
                    loss = strategy.model(**batch).loss / spec.train.grad_accum
                strategy.backward(loss)
            loss_sum += loss.detach()
        if step == start_step + 1:
            check_gradients(model, plan.strategy)
        grad_norm = strategy.step(spec.train.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        checkpointer.poll()
        window_steps += 1

        if step % spec.train.log_every == 0 or step == start_step + 1 or step == last:
            dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
            mean_loss = loss_sum.item() / env.world_size
            if not math.isfinite(mean_loss):
                raise FTLError(
                    f"The loss is {mean_loss} at step {step}: training diverged. Lower `train.lr`, keep "
                    "`train.max_grad_norm` set, or check the data; the last checkpoint is untouched."
                )
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
        if stop_requested():
            save(step)  # completes a background save in flight first
            log.log({"step": step, "event": "preempted", "detail": "signal received; checkpoint saved, rerun to resume"})
            log.close()
            return
        if validation is not None and spec.train.eval_every and step % spec.train.eval_every == 0 and step != last:
            metrics = evaluate(spec, strategy.model, validation, env, ctx)
            log.log({"step": step, **metrics})
            if watch.should_stop(metrics):
                log.log({"step": step, "event": "early_stop", "detail": watch.describe()})
                last = step
                break
        if spec.checkpoint.every and step % spec.checkpoint.every == 0 and step != last:
            save(step, wait=False)

    checkpointer.finish()
    log.log({"step": last, "event": "memory", **memory_record(strategy, device)})
    if last < spec.train.max_steps and not watch.stopped:  # `train.stop_at`: a planned pause
        if start_step < last:
            save(last)
        log.message(f"FTL: stopped at step {last} of {spec.train.max_steps} (train.stop_at); rerun to continue")
    else:
        if validation is not None and not watch.stopped:
            log.log({"step": last, **evaluate(spec, strategy.model, validation, env, ctx)})
        if start_step < last:
            log.message(f"FTL: done; checkpoint {save(last)}")
        else:
            log.message(f"FTL: already complete at step {last}; nothing to do (raise train.max_steps to go on)")
    log.close()


def check_resumable(resume: Checkpoint | None, strategy: str, world_size: int) -> None:
    if resume is None:
        return
    saved = resume.manifest["strategy"]
    dcp = set(DCP_STRATEGIES)
    if (saved in dcp) != (strategy in dcp):
        raise FTLError(
            f"The checkpoint {resume.path} was written by {saved} and this run uses {strategy}; DeepSpeed and "
            "DCP (ddp/fsdp2) checkpoints do not convert into each other. Force `strategy={saved}` to resume."
        )
    if saved not in dcp and resume.manifest["world_size"] != world_size:
        raise FTLError(
            f"The checkpoint {resume.path} was written by {saved} on {resume.manifest['world_size']} ranks; FTL resumes "
            f"DeepSpeed checkpoints on the same world size only (this run has {world_size}). Use ddp/fsdp2 to reshard."
        )


def rescale_position(data: dict, saved_world: int, world: int) -> dict:
    """Each rank's position in its slice of the epoch. On another world size the slices differ: keep the
    number of sequences consumed in the epoch (exact order is not preserved, nothing is skipped twice)."""
    if saved_world == world:
        return data
    return {"epoch": data["epoch"], "index": data["index"] * saved_world // world}


def install_stop_signals() -> Callable[[], bool]:
    """SIGTERM (scheduler, Ctrl-C via torchrun) and SIGUSR2 (Slurm's pre-emption warning) ask for a
    checkpoint at the next step boundary. Every rank agrees through one all-reduce per step."""
    received = torch.zeros(1)

    def handler(signum: int, _frame: object) -> None:
        received.fill_(1)

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, handler)

    def stop_requested() -> bool:
        flag = received.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return stop_requested


def log_stage(log: MetricsLog, step: int, unfrozen: int, total: int, model: torch.nn.Module) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    which = f"blocks {total - unfrozen}..{total - 1} + head" if unfrozen else "head only"
    log.log({"step": step, "event": "unfreeze", "detail": f"from step {step}: {which} ({trainable:,} trainable params)", "blocks_unfrozen": unfrozen})


def check_gradients(model: torch.nn.Module, strategy: str) -> None:
    """After the first backward: every trainable parameter must have a gradient. A silent failure
    otherwise (see launcher.methods.first_step_gradient_problem); all ranks stop together."""
    problem = first_step_gradient_problem(model, check_missing=not strategy.startswith("zero"))
    flag = torch.tensor([1.0 if problem else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise FTLError(
            f"Training would do nothing useful: after the first step {problem or 'another rank found parameters without a gradient'}. "
            "FTL stops rather than train silently wrong. For QLoRA on CPU do not run an eval-mode forward before "
            "training (FTL's own validation keeps 4-bit layers in train mode); otherwise check `method` settings."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher.train", description="FTL per-rank training entry (started by torchrun).")
    parser.add_argument("--spec", required=True, help="the resolved spec.yaml in the run dir")
    args = parser.parse_args(argv)
    # `kill -USR1 <rank pid>` prints every thread's stack: the first thing to look at in a hung job.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        train(load_spec(args.spec))
    except FTLError as exc:
        print(f"error (rank {os.environ.get('RANK', 0)}): {exc}", file=sys.stderr)
        return 2
    finally:
        # Tear down only after train()'s objects are gone: a DDP reducer freed after the gloo group was
        # destroyed joins the group's threads in its destructor and can hang forever (seen here).
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
