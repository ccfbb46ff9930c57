"""The one training loop, for every strategy, method and host (torchrun, Slurm, Ray): build, restore,
step, run -> a `Result`. Readable top to bottom; no callbacks. Logging, evaluation, checkpointing and
stopping each decide their own cadence (`schedule.should_log`, `schedule.should_evaluate`,
`checkpointer.should_save`, the stop source polled every step).

The trainer runs the plan it is given (launcher/job.py) on the runtime it is given (launcher/runtime.py);
it creates no process group and installs no signal handler: the entries do that (launcher/entries.py).
"""

from __future__ import annotations

import json
import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from launcher.augment import resolve as resolve_augment
from launcher.continual import EvalSets, phase_sources
from launcher.checkpoint import Checkpoint, Checkpointer, clean_stale_tmp, find_resume_checkpoint
from launcher.data import TrainStream, build_tokenizer, check_vocab, collator, few_shot_rows, label_names_of, load_examples, loss_by_source, open_sources
from launcher.errors import FTLError
from launcher.evaluation import EarlyStopping, evaluate
from launcher.job import RankJob, strategy_config
from launcher.methods import (
    all_trainable,
    check_supported,
    first_step_gradient_problem,
    head_names,
    hf_model,
    init_prompt_from_text,
    unfreeze_top_blocks,
    unfrozen_blocks_at,
)
from launcher.metrics import MetricsLog, memory_record
from launcher.model_info import transformer_blocks
from launcher.modeling import build_model, build_optimizer, build_scheduler, four_bit_compute_dtype, pretrained_weights, store_frozen_in
from launcher.outcome import Outcome, Result
from launcher.planner import Plan
from launcher.runtime import RankRuntime
from launcher.schedule import Schedule
from launcher.stop import StopSource
from launcher.train_state import TrainerState, capture_rng, restore_rng, spec_fingerprint
from launcher.weights import FourBit, ModelWeights
from strategies.catalog import traits
from strategies.registry import check_pinned_memory, get_strategy


class Trainer:
    def __init__(
        self,
        job: RankJob,
        plan: Plan,
        runtime: RankRuntime,
        stop: StopSource,
        before_publish: Callable[[Path], None] | None = None,
        after_publish: Callable[[Path, int], None] | None = None,
    ) -> None:
        """`plan`: the job's plan, or the one re-made for the world the ranks found (launcher/entries.py).
        `before_publish` and `after_publish` go to the Checkpointer (a host may time or delay publishing,
        or register each finished checkpoint with its scheduler: Ray)."""
        self.job, self.spec, self.plan = job, job.spec, plan
        self.rt, self.env, self.stop = runtime, runtime.env, stop
        self.schedule = Schedule.from_spec(self.spec)
        self.before_publish, self.after_publish = before_publish, after_publish
        self.state = TrainerState()

    # -- build ---------------------------------------------------------------------------------
    def build(self) -> None:
        spec, plan, env, device = self.spec, self.plan, self.env, self.rt.device
        check_supported(spec.method.name, plan.strategy, device.type)
        check_pinned_memory(plan.strategy, device.type)
        run_dir = self.job.run_dir
        self.spec_hash = spec_fingerprint(spec)
        if env.is_main:
            clean_stale_tmp(run_dir)
        self.resume = find_resume_checkpoint(run_dir, self.spec_hash, fallback=spec.checkpoint.on_corrupt == "previous")
        check_resumable(self.resume, plan.strategy, env.world_size)
        self.start_step = self.resume.step if self.resume else 0
        self.log = MetricsLog(run_dir, spec.train.max_steps, start_step=self.start_step, enabled=env.is_main)

        tokenizer = build_tokenizer(spec)
        self.sources_by_name = self.open_data(tokenizer)
        self.strategy = get_strategy(plan.strategy)(strategy_config(spec, plan), self.rt.ctx)
        seed_everything(spec.train.seed)  # same seed on every rank: identical init
        # Strategies that shard (FSDP2) get the model on the meta device, method applied, and materialise it
        # shard by shard (launcher/weights.py); ZeRO-3 builds it partitioned (zero.Init): no rank holds the
        # whole model, whatever the method or task. Except a random base that checkpoints will not hold (PEFT
        # saves adapters only): it must come back from the seed alone, in the export too, so it is drawn
        # whole as a plain build draws it. Only small test and demo models put adapters on random weights.
        whole = pretrained_weights(spec) is None and spec.method.is_peft
        meta = self.strategy.meta_init and not whole
        partitioned = self.strategy.partitions_at_build and not whole
        with self.strategy.building() if partitioned else nullcontext():
            model = build_model(
                spec, meta=meta, label_names=self.label_names, pad_token_id=tokenizer.pad_token_id, device=device,
                four_bit=meta and spec.method.name == "qlora", strategy=plan.strategy,
            )
        check_vocab(tokenizer, model.get_input_embeddings().num_embeddings)
        self.collate = collator(spec, tokenizer, self.label_names)
        self.enter_phase(self.schedule.phase_index(self.start_step + 1))
        prompt_ids = ()
        if spec.method.name == "prompt_tuning" and spec.method.prompt_tuning.init == "text":
            prompt_ids = tuple(tokenizer(spec.method.prompt_tuning.init_text, add_special_tokens=False)["input_ids"])
            if not meta:
                init_prompt_from_text(model, list(prompt_ids))
        heads = head_names(model, spec.task.num_labels)
        self.blocks = transformer_blocks(model)
        self.gradual = spec.method.name == "gradual_unfreezing"
        self.unfrozen = 0
        if self.gradual:
            self.unfrozen = unfreeze_top_blocks(self.blocks, unfrozen_blocks_at(spec.method, self.start_step + 1, len(self.blocks)))
        elif traits(plan.strategy).library == "torch":  # DeepSpeed converts the whole model itself
            store_frozen_in(model, self.rt.ctx.compute_dtype)
        new_head = spec.task.name == "classification"

        def make_optimizer(wrapped: torch.nn.Module) -> torch.optim.Optimizer:
            # Gradual unfreezing: every block is in the optimizer from the start (a frozen one gets no
            # gradient, hence no update and no Adam state), so unfreezing needs no new param groups.
            with all_trainable(self.blocks if self.gradual else []):
                return build_optimizer(wrapped, spec.train, device.type, heads, new_head)

        # 4-bit weights are placed on the device as they load; ZeRO-3's partitions where they were built.
        if not meta and spec.method.name != "qlora" and not partitioned:
            model = model.to(device)
        self.model = model
        weights = None
        if meta:
            weights = ModelWeights(
                pretrained_weights(spec), spec.train.seed, env.rank, device,
                new_modules=tuple(head_names(hf_model(model), spec.task.num_labels)) if new_head else (),
                four_bit=FourBit(spec.method.qlora.quant_type, spec.method.qlora.double_quant, four_bit_compute_dtype(spec, device.type))
                if spec.method.name == "qlora" else None,
                prompt_token_ids=prompt_ids,
            )
        self.strategy.setup(model, self.blocks, make_optimizer, weights)
        self.scheduler = build_scheduler(self.strategy.optimizer, spec.train, self.schedule.phases)
        seed_everything(spec.train.seed + env.rank)  # dropout differs per rank, reproducibly
        self.validation = None
        if spec.data.validation is not None:
            self.validation, _ = load_examples(spec, tokenizer, spec.data.validation, self.label_names, env.local_rank == 0, self.rt.any_true)
        self.evals = EvalSets(
            spec, {e.name: load_examples(spec, tokenizer, e.path, self.label_names, env.local_rank == 0, self.rt.any_true, e.format)[0]
                   for e in spec.data.eval_sets},
            lambda examples: evaluate(spec, self.strategy.model, examples, self.rt.ctx, self.rt.control),
        )
        self.checkpointer = Checkpointer(
            run_dir, self.strategy, env, spec.checkpoint.keep, self.spec_hash, spec.checkpoint.async_save,
            control=self.rt.control, every=spec.checkpoint.every, before_publish=self.before_publish,
            after_publish=self.after_publish,
        )

    def restore(self) -> None:
        """Continue from the checkpoint found at build time, if any: model, optimizer, trainer state."""
        if self.resume is None:
            return
        self.strategy.load(self.resume.path)
        saved = TrainerState.from_dict(self.resume.trainer_state(self.env.rank))
        saved_world = self.resume.manifest["world_size"]
        spec_base_lrs = list(self.scheduler.base_lrs)  # the state dict holds the saved run's peak LRs
        self.scheduler.load_state_dict(saved.scheduler)
        self.follow_spec_schedule(saved, spec_base_lrs)
        if saved.phase == self.phase:  # else the checkpoint ended its phase: the next one starts afresh
            self.stream.load_state_dict(saved.data)  # global counters: the same on any world size
        self.evals.load_state_dict(saved.evals)
        if saved_world == self.env.world_size:
            restore_rng(saved.rng)
        self.state = TrainerState(step=saved.step, phase=self.phase)
        self.log.log({"step": saved.step, "event": "resumed", "detail": f"resumed from {self.resume.path}"})

    def follow_spec_schedule(self, saved: TrainerState, spec_base_lrs: list[float]) -> None:
        """After a resume the LR follows this spec's schedule at every step, as a fresh run of it would: a changed
        `train.max_steps` (or lr, warmup, min_lr_ratio) re-stretches it from the checkpoint on. The scheduler just
        loaded holds the saved schedule's peaks and next LR; recompute them from this spec and say what changed."""
        sched = self.scheduler
        saved_lrs = list(sched.get_last_lr())
        sched.base_lrs = spec_base_lrs
        sched.last_epoch -= 1
        sched.step()  # this spec's LR for the next step, into the optimizer's groups and get_last_lr()
        if all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved_lrs, sched.get_last_lr())):
            return
        now = schedule_settings(self.spec)
        changed = ", ".join(f"{'data' if k == 'phases' else 'train'}.{k} {saved.lr_schedule[k]} -> {v}" for k, v in now.items() if saved.lr_schedule.get(k, v) != v)
        detail = (
            f"the LR schedule changed since the checkpoint ({changed or 'the checkpoint does not record its settings'}): from step {saved.step + 1} the LR "
            f"follows this spec's schedule over {self.spec.train.max_steps} steps, lr {saved_lrs[0]:.4g} (saved schedule) -> "
            f"{sched.get_last_lr()[0]:.4g}"
        )
        self.log.log({"step": saved.step, "event": "lr_schedule", "lr_saved": saved_lrs[0], "lr": sched.get_last_lr()[0], "detail": detail})

    def losses_by_source(self) -> dict[str, float]:
        """`loss/<source>`: each source's mean loss over the micro-batches since the last log line (mixtures)."""
        if len(self.sources) < 2:
            return {}
        sums = self.rt.sum(self.source_losses.cpu())
        self.source_losses.zero_()
        return {f"loss/{s.name}": sums[i, 0].item() / sums[i, 1].item() for i, s in enumerate(self.sources) if sums[i, 1] > 0}

    def open_data(self, tokenizer) -> list:
        """The phase's sources, tokenized once (one rank per node builds a missing cache entry), few-shot
        subsets drawn, the class names read; rank 0 logs what each source holds."""
        spec, env = self.spec, self.env
        unique = list({s.label: s for phase in self.schedule.phases for s in phase.sources}.values())
        sources = open_sources(spec, tokenizer, unique, builder=env.local_rank == 0, agree=self.rt.any_true)
        self.label_names = label_names_of(spec, sources) if spec.task.name == "classification" else None
        chosen = {}
        if spec.data.few_shot:
            for i, source in enumerate(sources):
                rows = few_shot_rows(spec, source, spec.data.few_shot, spec.train.seed + i)
                source.rows, chosen[source.name] = source.rows.select(rows, keep_in_memory=True), rows  # nothing written into the cache
        for source in sources:
            stats = source.stats
            self.log.log({"step": self.start_step, "event": "data", "source": source.name, "examples": len(source),
                          "tokenized": source.built, **{k: stats[k] for k in ("rows", "bad_rows", "supervised_tokens", "tokenize_s")},
                          "detail": f"{source.name}: {len(source)} examples from {stats['rows']} rows ({stats['bad_rows']} bad, skipped)"
                          + (f", tokenized in {stats['tokenize_s']} s" if source.built else ", from the cache")})
        if env.is_main and chosen:
            (self.job.run_dir / "few_shot.json").write_text(json.dumps({"k": spec.data.few_shot, "seed": spec.train.seed, "rows": chosen}, indent=2))
        return {s.name: s for s in sources}

    def enter_phase(self, index: int) -> None:
        """Train on phase `index`'s mixture (with its replay) from the start of its stream."""
        spec, env = self.spec, self.env
        self.phase = index
        self.sources = phase_sources(self.schedule.phases[index], self.sources_by_name, spec.train.seed)
        augment = resolve_augment(spec.data.augment) if spec.data.augment else None
        self.stream = TrainStream(self.sources, self.collate, spec.train.micro_batch_size, env.rank, env.world_size, spec.train.seed + index,
                                  augment, spec.data.augment_p)
        self.source_losses = torch.zeros(len(self.sources), 2, device=self.rt.device)  # summed since the last log line
        if len(self.schedule.phases) > 1:
            phase = self.schedule.phases[index]
            self.log.log({"step": phase.first_step - 1, "event": "phase", "phase": index, "detail": f"phase {phase.name}: steps "
                          f"{phase.first_step}..{phase.last_step} on {', '.join(f'{s.name} ({s.weight:.0%})' for s in self.sources)}"})

    def phase_end(self, step: int) -> dict:
        """Evaluate every eval set (a row of R), and write the forgetting report so far."""
        measured = self.evals.measure()
        self.evals.rows.append(measured)
        self.log.log({"step": step, "event": "phase_end", "phase": self.phase, **self.evals.flat(measured)})
        if self.evals.sets:
            table = self.evals.write(self.job.run_dir, self.schedule) if self.env.is_main else ""
            self.log.message(f"FTL: after phase {self.schedule.phases[self.phase].name}:\n{table}")
        return measured

    # -- step ------------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[torch.Tensor, float, float]:
        """One optimizer step over `grad_accum` micro-batches: (summed loss on the device, grad norm, lr)."""
        spec, strategy, device = self.spec, self.strategy, self.rt.device
        if self.gradual and (due := unfrozen_blocks_at(spec.method, step, len(self.blocks))) > self.unfrozen:
            self.unfrozen = unfreeze_top_blocks(self.blocks, due)
            strategy.trainable_changed()
            self.log_stage(step)
        loss_sum = torch.zeros((), device=device)
        for micro in range(spec.train.grad_accum):
            batch = {name: t.to(device, non_blocking=True) for name, t in self.stream.next_batch().items()}
            with strategy.accumulate(sync=micro == spec.train.grad_accum - 1):
                with self.rt.ctx.autocast():
                    outputs = strategy.model(**batch)
                    loss = outputs.loss / spec.train.grad_accum
                if len(self.sources) > 1:
                    self.source_losses += loss_by_source(outputs.logits, batch["labels"], self.stream.last_sources, len(self.sources))
                del outputs
                strategy.backward(loss)
            loss_sum += loss.detach()
        if step == self.start_step + 1:
            self.check_gradients()
        grad_norm = strategy.step(spec.train.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return loss_sum, grad_norm, lr

    # -- run ---------------------------------------------------------------------------------------
    def run(self) -> Result:
        self.build()
        self.restore()
        spec, plan, env, log = self.spec, self.plan, self.env, self.log
        log.message(
            f"FTL: {plan.strategy} on {env.world_size} x {self.rt.device.type} ({plan.request.precision}), method "
            f"{spec.method.name}, {plan.request.shape.params_total:,} params, {plan.request.params_trainable:,} trainable, "
            f"{len(self.stream)} training examples of {spec.train.seq_len} tokens"
        )
        if plan is not self.job.plan:
            log.log({"step": self.start_step, "event": "replanned", "detail": plan.reason, "world_size": env.world_size})
        if self.gradual:
            self.log_stage(self.start_step + 1)
        if env.is_main and self.label_names is not None:
            (self.job.run_dir / "labels.json").write_text(json.dumps({"id2label": dict(enumerate(self.label_names))}, indent=2))

        first, last = self.start_step + 1, self.schedule.last_step
        tokens_per_step = spec.train.micro_batch_size * spec.train.seq_len * spec.train.grad_accum * env.world_size
        window_start, window_steps = log.elapsed_s(), 0
        watch = EarlyStopping(spec.train.early_stopping_metric, spec.train.early_stopping_patience)
        if self.evals.sets and not self.evals.baseline:  # before training: the watch's and FWT's reference
            self.evals.baseline = self.evals.measure()
            log.log({"step": self.start_step, "event": "baseline", **self.evals.flat(self.evals.baseline)})
        for step in range(first, last + 1):
            if (phase := self.schedule.phase_index(step)) != self.phase:
                self.enter_phase(phase)
            loss_sum, grad_norm, lr = self.train_step(step)
            self.state.step, self.state.phase = step, self.schedule.phase_index(step)
            self.checkpointer.poll()
            window_steps += 1
            if self.schedule.should_log(step, first, last):
                mean_loss = self.rt.sum(loss_sum).item() / env.world_size
                if not math.isfinite(mean_loss):
                    raise FTLError(
                        f"The loss is {mean_loss} at step {step}: training diverged. Lower `train.lr`, keep "
                        "`train.max_grad_norm` set, or check the data; the last checkpoint is untouched."
                    )
                now = log.elapsed_s()
                tokens_per_s = tokens_per_step * window_steps / max(now - window_start, 1e-9)
                log.log({"step": step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, **self.losses_by_source()})
                window_start, window_steps = now, 0
            if self.validation is not None and self.schedule.should_evaluate(step, last):
                metrics = evaluate(spec, self.strategy.model, self.validation, self.rt.ctx, self.rt.control)
                log.log({"step": step, **metrics})
                if watch.should_stop(metrics):
                    log.log({"step": step, "event": "early_stop", "detail": watch.describe()})
                    last = step
                    break
            measured = self.phase_end(step) if self.schedule.is_phase_end(step) else None  # before the watch can stop the run
            if self.evals.sets and self.schedule.should_evaluate(step, last):
                if measured is None:
                    measured = self.evals.measure()
                    log.log({"step": step, **self.evals.flat(measured)})
                alarms = self.evals.watch(measured)
                for line in alarms:
                    log.log({"step": step, "event": "alarm", "detail": f"general-capability watch: {line}"})
                if self.evals.should_stop(alarms):
                    path = self.save(step)
                    log.log({"step": step, "event": "early_stop", "detail": f"the watch stopped the run (stop_on_regression); checkpoint {path}"})
                    return self.finish(Result(Outcome.EARLY_STOPPED, step, str(path), "; ".join(alarms)))
            if measured is not None and self.schedule.is_phase_end(step) and step != last:
                self.save(step)
                continue
            # After evaluation, so a request that came during it waits no longer than the step after it; not
            # at the last step, whose save ends the run anyway.
            if step != last and self.rt.any_true(self.stop.requested() is not None):  # every rank stops at the same step
                why = self.rt.first_text(self.stop.requested()) or "a rank was asked to stop"  # the same on every rank
                path = self.save(step)  # completes a background save in flight first
                log.log({"step": step, "event": "preempted", "detail": f"{why}; checkpoint saved, rerun to resume"})
                return self.finish(Result(Outcome.PREEMPTED, step, str(path), why))
            if step != last and (why := self.stop.save_requested()) is not None:  # the same answer on every rank
                path = self.save(step)
                log.log({"step": step, "event": "checkpoint_requested", "detail": f"{why}; checkpoint {path} saved, training goes on"})
                continue
            if self.checkpointer.should_save(step, last):
                self.save(step, wait=False)

        self.checkpointer.finish()
        log.log({"step": last, "event": "memory", **memory_record(self.strategy, self.rt.device)})
        if last < spec.train.max_steps and not watch.stopped:  # `train.stop_at`: a planned pause
            path = self.save(last) if self.start_step < last else None
            log.message(f"FTL: stopped at step {last} of {spec.train.max_steps} (train.stop_at); rerun to continue")
            return self.finish(Result(Outcome.PAUSED, last, str(path) if path else None))
        if self.start_step >= last:
            log.message(f"FTL: already complete at step {last}; nothing to do (raise train.max_steps to go on)")
            return self.finish(Result(Outcome.ALREADY_COMPLETE, last))
        if self.validation is not None and not watch.stopped:
            log.log({"step": last, **evaluate(spec, self.strategy.model, self.validation, self.rt.ctx, self.rt.control)})
        if self.evals.sets and not watch.stopped and not self.schedule.is_phase_end(last):
            log.log({"step": last, **self.evals.flat(self.evals.measure())})
        path = self.save(last)
        log.message(f"FTL: done; checkpoint {path}")
        return self.finish(Result(Outcome.EARLY_STOPPED if watch.stopped else Outcome.DONE, last, str(path)))

    def save(self, step: int, wait: bool = True) -> Path:
        self.state.data = self.stream.state_dict()
        self.state.scheduler = self.scheduler.state_dict()
        self.state.lr_schedule = schedule_settings(self.spec)
        self.state.rng = capture_rng()
        self.state.evals = self.evals.state_dict()
        return self.checkpointer.save(step, self.state.to_dict(), wait=wait)

    def finish(self, result: Result) -> Result:
        self.log.close()
        return result

    def close(self) -> None:
        """Drop the model, optimizer and wrappers (before the runtime destroys the process groups)."""
        for name in ("strategy", "model", "scheduler", "checkpointer"):
            self.__dict__.pop(name, None)

    # -- checks and messages -------------------------------------------------------------------------
    def check_gradients(self) -> None:
        """After the first backward: every trainable parameter must have a gradient. A silent failure
        otherwise (see launcher.methods.first_step_gradient_problem); all ranks stop together."""
        grads_visible = traits(self.plan.strategy).grads_in_param
        problem = first_step_gradient_problem(self.model, check_missing=grads_visible)
        if self.rt.any_true(bool(problem)):
            raise FTLError(
                f"Training would do nothing useful: after the first step {problem or 'another rank found parameters without a gradient'}. "
                "FTL stops rather than train silently wrong. For QLoRA on CPU do not run an eval-mode forward before "
                "training (FTL's own validation keeps 4-bit layers in train mode); otherwise check `method` settings."
            )

    def log_stage(self, step: int) -> None:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = len(self.blocks)
        which = f"blocks {total - self.unfrozen}..{total - 1} + head" if self.unfrozen else "head only"
        self.log.log({"step": step, "event": "unfreeze", "detail": f"from step {step}: {which} ({trainable:,} trainable params)", "blocks_unfrozen": self.unfrozen})


def schedule_settings(spec) -> dict:
    """The `train` settings the LR schedule is built from (saved with each checkpoint)."""
    settings = {k: getattr(spec.train, k) for k in ("max_steps", "warmup_steps", "lr", "min_lr_ratio")}
    if spec.data.phases and any(p.lr is not None or p.warmup_steps is not None for p in spec.data.phases):
        settings["phases"] = [[p.steps, p.lr, p.warmup_steps] for p in spec.data.phases]  # their own LR cycles
    return settings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_resumable(resume: Checkpoint | None, strategy: str, world_size: int) -> None:
    if resume is None:
        return
    saved = resume.manifest["strategy"]
    if traits(saved).checkpoint_format != traits(strategy).checkpoint_format:
        raise FTLError(
            f"The checkpoint {resume.path} was written by {saved} and this run uses {strategy}; DeepSpeed and "
            "DCP (ddp/fsdp2) checkpoints do not convert into each other. Force `strategy={saved}` to resume."
        )
    if traits(saved).checkpoint_format == "deepspeed" and resume.manifest["world_size"] != world_size:
        raise FTLError(
            f"The checkpoint {resume.path} was written by {saved} on {resume.manifest['world_size']} ranks; FTL resumes "
            f"DeepSpeed checkpoints on the same world size only (this run has {world_size}). Use ddp/fsdp2 to reshard."
        )
