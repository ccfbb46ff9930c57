"""Choose the parallel strategy for a job. Pure: a frozen `PlanRequest` in, a frozen `Plan` out.

The choice is the least-communication strategy whose per-rank peak fits the device with headroom:
DDP -> ZeRO-1 -> ZeRO-2 -> FSDP2 (ZeRO-3 equivalent; HSDP within a node first on several nodes)
-> ZeRO-3 with CPU offload. If nothing fits, the plan says by how much and what would fit instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from launcher.memory import (
    NF4_CONSTANT_BYTES_PER_PARAM,
    NF4_DATA_BYTES_PER_PARAM,
    GiB,
    MemoryBreakdown,
    MemoryInputs,
    MomentBytes,
    per_rank_memory,
)
from launcher.model_info import ModelShape
from launcher.spec import JobSpec
from strategies.catalog import AUTO_ORDER, STRATEGIES, refusal

# Fraction of device memory a plan may use: the rest absorbs allocator fragmentation and spikes.
HEADROOM = 0.90
# How much each strategy shards model states; a bigger job must never get a smaller number.
SHARDING_LEVEL = {name: t.sharding_level for name, t in STRATEGIES.items()}
# Assumed per-rank write speed of a checkpoint (a shared filesystem under load, not a local NVMe): sizes
# the time a pre-empted job is given to save. Generous on purpose; a job that saves faster exits sooner.
CHECKPOINT_WRITE_BYTES_PER_S = 200 * 10**6
MIN_SAVE_GRACE_S = 120
NF4_BYTES_PER_PARAM = NF4_DATA_BYTES_PER_PARAM + NF4_CONSTANT_BYTES_PER_PARAM
SUGGESTED_LORA_RANK = 16


@dataclass(frozen=True)
class PlanRequest:
    shape: ModelShape
    params_trainable: int
    frozen_bytes_per_param: float
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: bool
    precision: str  # "bf16" | "fp32"
    device: str  # "cuda" | "cpu"
    nodes: int
    gpus_per_node: int
    gpu_mem_bytes: int
    cpu_mem_bytes: int
    strategy: str = "auto"
    method: str = "full"
    lora_rank: int = 0
    lora_dropout: float = 0.0
    num_labels: int = 0  # > 0: `task: classification` (the shape has its head, not the LM head)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def memory_inputs(self) -> MemoryInputs:
        return MemoryInputs(
            shape=self.shape,
            params_trainable=self.params_trainable,
            frozen_bytes_per_param=self.frozen_bytes_per_param,
            precision=self.precision,
            device=self.device,
            micro_batch_size=self.micro_batch_size,
            seq_len=self.seq_len,
            activation_checkpointing=self.activation_checkpointing,
            lora_rank=self.lora_rank,
            lora_dropout=self.lora_dropout,
            num_labels=self.num_labels,
            quantized=self.method == "qlora",
        )


@dataclass(frozen=True)
class Estimate:
    strategy: str
    shard_group: int  # ranks that share one copy of the model states
    memory: MemoryBreakdown
    fits: bool
    why_not: str = ""


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    strategy: str
    shard_group: int
    fits: bool
    reason: str
    per_rank: MemoryBreakdown
    rejected: tuple[tuple[str, str], ...]
    suggestions: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def budget_bytes(self) -> int:
        return int(self.request.gpu_mem_bytes * HEADROOM)

    @property
    def replicas(self) -> int:
        return self.request.world_size // self.shard_group

    @property
    def save_grace_s(self) -> int:
        """Seconds a stopping rank may need to write its checkpoint: its share of the model states at
        CHECKPOINT_WRITE_BYTES_PER_S, twice over (staging + writing), and never under MIN_SAVE_GRACE_S.
        torchrun's shutdown timeout and Slurm's pre-emption warning are sized from it."""
        m = self.per_rank
        states = m.params + m.optimizer + m.host  # what a checkpoint holds (gradients are not saved)
        return max(MIN_SAVE_GRACE_S, int(2 * states / CHECKPOINT_WRITE_BYTES_PER_S) + 30)

    def to_dict(self) -> dict:
        """The plan as JSON: the summary a user reads, and (`request`, `memory`) what `from_dict` rebuilds
        the identical Plan from on every rank."""
        r = self.request
        return {
            "params_total": r.shape.params_total,
            "params_trainable": r.params_trainable,
            "method": r.method,
            "strategy": self.strategy,
            "fits": self.fits,
            "reason": self.reason,
            "world_size": r.world_size,
            "nodes": r.nodes,
            "gpus_per_node": r.gpus_per_node,
            "shard_group": self.shard_group,
            "device": r.device,
            "precision": r.precision,
            "gpu_mem_bytes": r.gpu_mem_bytes,
            "budget_bytes": self.budget_bytes,
            "per_rank_bytes": self.per_rank.as_dict(),
            "rejected": [{"strategy": s, "reason": why} for s, why in self.rejected],
            "suggestions": list(self.suggestions),
            "warnings": list(self.warnings),
            "save_grace_s": self.save_grace_s,
            "request": asdict(r),
            "memory": asdict(self.per_rank),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        raw = dict(data["request"])
        shape = dict(raw.pop("shape"))
        shape["linear_names"] = tuple(shape.get("linear_names", ()))
        request = PlanRequest(shape=ModelShape(**shape), **raw)
        return cls(
            request=request,
            strategy=data["strategy"],
            shard_group=data["shard_group"],
            fits=data["fits"],
            reason=data["reason"],
            per_rank=_memory_from_dict(data["memory"]),
            rejected=tuple((r["strategy"], r["reason"]) for r in data["rejected"]),
            suggestions=tuple(data["suggestions"]),
            warnings=tuple(data["warnings"]),
        )


def _memory_from_dict(data: dict) -> MemoryBreakdown:
    memory = dict(data)
    memory["at_peak"] = MomentBytes(**memory.get("at_peak", {}))  # a plan.json written before at_peak: zeros
    return MemoryBreakdown(**memory)


def request_from_spec(spec: JobSpec, shape: ModelShape, device: str, params_trainable: int | None = None) -> PlanRequest:
    """The planner's view of a job. `device` is the resolved one ("cuda" or "cpu"): resolving `auto`
    means looking at the machine, which the caller does. `params_trainable` is counted by the caller on
    the meta-device model with the method applied (launcher.modeling.count_trainable); default: all.
    `shape` is the causal LM's (model_info.model_shape); a classification task swaps its head here."""
    precision = resolve_precision(spec.train.precision, device)
    method = spec.method
    num_labels = spec.task.num_labels if spec.task.name == "classification" else 0
    if num_labels:
        shape = shape.with_classification_head(num_labels)
    frozen_bytes = 2 if precision == "bf16" else 4
    if method.name == "qlora":
        frozen_bytes = qlora_frozen_bytes_per_param(shape, precision)
    return PlanRequest(
        shape=shape,
        params_trainable=shape.params_total if params_trainable is None else params_trainable,
        frozen_bytes_per_param=frozen_bytes,
        micro_batch_size=spec.train.micro_batch_size,
        seq_len=spec.train.seq_len,
        activation_checkpointing=spec.train.activation_checkpointing,
        precision=precision,
        device=device,
        nodes=spec.hardware.nodes,
        gpus_per_node=spec.hardware.gpus_per_node,
        gpu_mem_bytes=int(spec.hardware.gpu_mem),
        cpu_mem_bytes=int(spec.hardware.cpu_mem),
        strategy=spec.strategy,
        method=method.name,
        lora_rank=method.lora.r if method.lora is not None else 0,
        lora_dropout=method.lora.dropout if method.lora is not None else 0.0,
        num_labels=num_labels,
    )


def resolve_precision(precision: str, device: str) -> str:
    """`auto` is bf16 (mixed precision) on CUDA and fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def estimate(request: PlanRequest, strategy: str) -> Estimate:
    """Per-rank memory of `strategy` for this request, with the sharding group FTL would use."""
    inputs = request.memory_inputs
    groups = [request.world_size]
    if strategy == "fsdp2" and request.nodes > 1:
        groups.insert(0, request.gpus_per_node)  # HSDP: shard inside a node, replicate across nodes
    for group in groups:
        memory = per_rank_memory(strategy, inputs, group)
        why_not = _why_not(request, memory)
        if not why_not:
            return Estimate(strategy, group, memory, True)
    return Estimate(strategy, groups[-1], memory, False, why_not)


def plan(request: PlanRequest, suggest: bool = True) -> Plan:
    """The plan for `request`; when it does not fit (and `suggest`), with what would fit instead."""
    if request.strategy != "auto":
        return _forced(request, suggest)
    rejected: list[tuple[str, str]] = []
    # Only strategies the method runs with (strategies.catalog): the plan never chooses what the ranks refuse.
    order = tuple(s for s in AUTO_ORDER if not refusal(request.method, s, request.device))
    for strategy in AUTO_ORDER:
        if strategy not in order:
            rejected.append((strategy, refusal(request.method, strategy, request.device)))
            continue
        est = estimate(request, strategy)
        if est.fits:
            return Plan(
                request=request,
                strategy=strategy,
                shard_group=est.shard_group,
                fits=True,
                reason=_why_chosen(request, est, rejected),
                per_rank=est.memory,
                rejected=tuple(rejected),
            )
        rejected.append((strategy, est.why_not))
    if "fsdp2" not in order:  # the most sharded strategy this method runs with is the best it gets
        best = estimate(request, order[-1])
        return Plan(
            request=request,
            strategy=best.strategy,
            shard_group=best.shard_group,
            fits=False,
            reason=(
                f"Nothing fits: `method.name: {request.method}` runs with {', '.join(order)} only, and {best.strategy} "
                f"{best.why_not}. Use `method.name: freeze` or lora, which shard."
            ),
            per_rank=best.memory,
            rejected=tuple(rejected),
            suggestions=suggestions(request) if suggest else (),
        )
    best = estimate(request, "fsdp2")
    short = best.memory.total - int(request.gpu_mem_bytes * HEADROOM)
    return Plan(
        request=request,
        strategy="fsdp2",
        shard_group=best.shard_group,
        fits=False,
        reason=(
            f"Nothing fits: even fully sharded (fsdp2 over {request.world_size} ranks) one rank needs "
            f"{_gib(best.memory.total)}, {_gib(short)} over {int(HEADROOM * 100)}% of {_gib(request.gpu_mem_bytes)}, "
            f"and offloading to the CPU is rejected ({rejected[-1][1]})."
        ),
        per_rank=best.memory,
        rejected=tuple(rejected),
        suggestions=suggestions(request) if suggest else (),
    )


def _forced(request: PlanRequest, suggest: bool) -> Plan:
    refused = refusal(request.method, request.strategy, request.device)
    est = estimate(request, request.strategy)
    if refused:
        return Plan(
            request=request,
            strategy=request.strategy,
            shard_group=est.shard_group,
            fits=False,
            reason=f"`strategy: {request.strategy}` is refused for `method.name: {request.method}`: {refused}",
            per_rank=est.memory,
            rejected=((request.strategy, refused),),
        )
    warnings: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    if not est.fits:
        warnings = (
            f"Forced strategy {request.strategy} does not fit: {est.why_not}. The run will likely run out of memory.",
        )
        extra = suggestions(request) if suggest else ()
    auto = plan(replace(request, strategy="auto"), suggest=False)
    note = f" (auto would pick {auto.strategy})" if auto.fits and auto.strategy != request.strategy else ""
    return Plan(
        request=request,
        strategy=request.strategy,
        shard_group=est.shard_group,
        fits=est.fits,
        reason=f"forced by `strategy: {request.strategy}`{note}",
        per_rank=est.memory,
        rejected=(),
        suggestions=extra,
        warnings=warnings,
    )


def _why_not(request: PlanRequest, memory: MemoryBreakdown) -> str:
    budget = int(request.gpu_mem_bytes * HEADROOM)
    if memory.total > budget:
        return f"needs {_gib(memory.total)} per rank, over {int(HEADROOM * 100)}% of {_gib(request.gpu_mem_bytes)}"
    host_per_node = memory.host * request.gpus_per_node
    if host_per_node > request.cpu_mem_bytes * HEADROOM:
        return (
            f"offloaded states need {_gib(host_per_node)} of host memory per node, over "
            f"{int(HEADROOM * 100)}% of hardware.cpu_mem ({_gib(request.cpu_mem_bytes)})"
        )
    return ""


def _why_chosen(request: PlanRequest, est: Estimate, rejected: list[tuple[str, str]]) -> str:
    fits = f"{_gib(est.memory.total)} per rank fits in {int(HEADROOM * 100)}% of {_gib(request.gpu_mem_bytes)}"
    if est.strategy == "ddp":
        return f"model states fit on every rank unsharded ({fits}); DDP communicates least"
    first = "; ".join(f"{s} {why}" for s, why in rejected[-1:])
    if est.strategy == "fsdp2" and est.shard_group < request.world_size:
        return (
            f"HSDP: shard within each node ({est.shard_group} ranks), replicate across {request.nodes} nodes "
            f"({fits}); rejected before it: {first}"
        )
    return f"least communication that fits ({fits}); rejected before it: {first}"


def suggestions(request: PlanRequest) -> tuple[str, ...]:
    """What would make the job fit, each with its figures."""
    out: list[str] = []
    if not request.activation_checkpointing:
        out.append(_try(request, "train.activation_checkpointing=true", activation_checkpointing=True))
    if request.micro_batch_size > 1:
        out.append(_try(request, "train.micro_batch_size=1", micro_batch_size=1))
    if request.method == "full":
        lora = lora_params(request.shape, SUGGESTED_LORA_RANK)
        dense = 2 if request.precision == "bf16" else 4
        out.append(
            _try(
                request,
                f"method LoRA r={SUGGESTED_LORA_RANK} ({_count(lora)} trainable)",
                method="lora",
                params_trainable=lora,
                frozen_bytes_per_param=dense,
                lora_rank=SUGGESTED_LORA_RANK,
            )
        )
        out.append(
            _try(
                request,
                f"method QLoRA r={SUGGESTED_LORA_RANK} (4-bit NF4 base)",
                method="qlora",
                params_trainable=lora,
                lora_rank=SUGGESTED_LORA_RANK,
                frozen_bytes_per_param=qlora_frozen_bytes_per_param(request.shape, request.precision),
            )
        )
    sharded = _most_sharded(request)
    nodes = _nodes_needed(request, sharded)
    if SHARDING_LEVEL[sharded] == 0:
        out.append(f"more GPUs do not help: `method.name: {request.method}` runs with {sharded} only, which holds the whole model on every rank")
    elif nodes:
        out.append(f"more GPUs: {nodes} nodes x {request.gpus_per_node} GPUs ({nodes * request.gpus_per_node} in all) fit with {sharded}")
    else:
        out.append("more GPUs: even 1024 nodes do not fit unsharded activations; reduce seq_len or micro_batch_size")
    return tuple(out)


def _try(request: PlanRequest, label: str, **changes: object) -> str:
    alt = plan(replace(request, strategy="auto", **changes), suggest=False)
    if alt.fits:
        return f"{label}: fits with {alt.strategy}, {_gib(alt.per_rank.total)} per rank"
    return f"{label}: still {_gib(alt.per_rank.total)} per rank, does not fit alone"


def _most_sharded(request: PlanRequest) -> str:
    """fsdp2 when the method runs with it, else the most sharded strategy that it runs with."""
    order = [s for s in AUTO_ORDER if not refusal(request.method, s, request.device) and not STRATEGIES[s].offload]
    return "fsdp2" if "fsdp2" in order else max(order, key=lambda s: SHARDING_LEVEL[s])


def _nodes_needed(request: PlanRequest, strategy: str = "fsdp2") -> int:
    for nodes in (2**k for k in range(0, 11)):
        if nodes <= request.nodes:
            continue
        if estimate(replace(request, nodes=nodes), strategy).fits:
            return nodes
    return 0


def lora_params(shape: ModelShape, rank: int) -> int:
    """LoRA on every Linear of every block: r * (in + out) each."""
    return rank * shape.block_linear_dims * shape.num_layers


def qlora_frozen_bytes_per_param(shape: ModelShape, precision: str) -> float:
    """Average bytes per frozen parameter with block Linears in NF4 and the rest (embeddings, norms) dense."""
    quantised = shape.block_linear_params * shape.num_layers
    dense = shape.params_total - quantised
    dense_bytes = 2 if precision == "bf16" else 4
    return (quantised * NF4_BYTES_PER_PARAM + dense * dense_bytes) / shape.params_total


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{1 if n < 10 * size else 0}f}{unit}"
    return str(n)


def replan_for_world(job_plan: Plan, nodes: int, gpus_per_node: int) -> Plan:
    """The plan re-made for the world the ranks found (a resume on fewer or more ranks), keeping its
    strategy: the checkpoint it wrote must still load. The ranks log that they did this."""
    if (nodes, gpus_per_node) == (job_plan.request.nodes, job_plan.request.gpus_per_node):
        return job_plan
    again = plan(replace(job_plan.request, nodes=nodes, gpus_per_node=gpus_per_node, strategy=job_plan.strategy), suggest=False)
    return replace(again, reason=f"re-planned for {nodes} x {gpus_per_node} ranks (planned: {job_plan.request.nodes} x "
                   f"{job_plan.request.gpus_per_node}); {job_plan.strategy} kept so the checkpoint loads")
