"""`ftl`: plan and run fine-tuning jobs. Every user mistake is printed as one paragraph, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from launcher.errors import FTLError
from launcher.manage import add_commands as add_cluster_commands
from launcher.quiet import hide_library_warnings
from launcher.rank_env import VERBOSE_ENV

# Each command imports what it uses (the spec's pydantic models, the planner, torch and transformers for a plan,
# torch's tracers for --measure): `ftl --help` and `ftl --version` answer at once.
if TYPE_CHECKING:
    from launcher.measure import MeasuredMemory
    from launcher.planner import Plan
    from launcher.spec import JobSpec

console = Console(highlight=False, soft_wrap=True)  # no hard wraps: logs and paths stay greppable


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (`ftl plan job.yaml --gpus 8 train.lr=1e-4`); argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.verbose:  # for this process and the ranks it starts (launcher/rank_env.py)
        os.environ[VERBOSE_ENV] = "1"
    hide_library_warnings()
    try:
        return args.func(args)
    except FTLError as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}")
        return 2
    except KeyboardInterrupt:
        return 130


class _PrintVersion(argparse.Action):
    """`ftl --version`: the installed package's version, read only when asked (the metadata lookup costs
    more than the rest of `ftl --help`)."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> None:
        from importlib.metadata import version

        print(f"ftl {version('ftl')}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftl", description="FTL, the fine-tuning launcher.")
    parser.add_argument("--version", action=_PrintVersion, nargs=0, help="print ftl's version and exit")
    parser.add_argument(
        "--verbose", action="store_true",
        help="show the third-party warnings and notices FTL hides (launcher/quiet.py), here and in the ranks",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("job", type=Path, help="the job spec (YAML)")
        cmd.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override spec fields, e.g. train.lr=1e-4")
        cmd.add_argument("--gpus", type=int, metavar="N", help="GPUs (on CPU: processes) per node; = hardware.gpus_per_node=N")
        cmd.add_argument("--nodes", type=int, metavar="M", help="machines; = hardware.nodes=M")
        cmd.add_argument("--gpu-mem", metavar="SIZE", help="memory of one GPU, e.g. 80GB; = hardware.gpu_mem=SIZE")
        return cmd

    p = job_command("plan", "Count parameters, choose the strategy, show per-rank memory and the command.")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument(
        "--measure", action="store_true",
        help="trace one real training step of the plan under FakeTensorMode (no weights allocated) and print measured beside predicted",
    )
    p.set_defaults(func=cmd_plan)

    r = job_command("run", "Run the job on this machine with torchrun.")
    r.add_argument("--dry-run", action="store_true", help="print the plan and command, write and run nothing")
    r.add_argument("--no-resume", action="store_true", help="start fresh instead of resuming from the run dir's latest checkpoint (the earlier run moves to previous-<time>/)")
    r.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous for a multi-node run (run the same command on each node)")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("export", help="Write a run's latest checkpoint as a transformers/PEFT folder.")
    e.add_argument("run_dir", type=Path, help="the run's output_dir")
    e.add_argument("--to", type=Path, required=True, metavar="OUT", help="the folder to write (new or empty)")
    e.add_argument("--merge", action="store_true", help="LoRA/QLoRA: merge the adapters into the base and write the whole model")
    e.set_defaults(func=cmd_export)

    add_cluster_commands(sub, job_command)

    s = sub.add_parser("spec", help="List the job spec's fields: path, type, default and meaning.")
    s.add_argument("--schema", action="store_true", help="print the JSON schema instead (every field's meaning included)")
    s.set_defaults(func=cmd_spec)
    return parser


def load_job(args: argparse.Namespace) -> JobSpec:
    from launcher.spec import read_spec

    overrides = list(args.overrides)
    for flag, key in (("gpus", "hardware.gpus_per_node"), ("nodes", "hardware.nodes"), ("gpu_mem", "hardware.gpu_mem")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    loaded = read_spec(args.job, overrides)
    for notice in loaded.notices:  # on stderr: `ftl plan --json` keeps stdout one JSON object
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold]note:[/] {escape(notice)}")
    return loaded.spec


def resolve_device(spec: JobSpec) -> str:
    """The device the job will run on; `auto` looks at this machine (the only I/O the plan depends on)."""
    if spec.hardware.device != "auto":
        return spec.hardware.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_job_plan(spec: JobSpec) -> Plan:
    """The plan, made once, here, for the hardware in the spec; ranks run exactly it (launcher/job.py). A
    forced strategy the method cannot run with is refused here, before anything is written."""
    from launcher.methods import check_supported
    from launcher.model_info import model_shape
    from launcher.modeling import count_trainable
    from launcher.planner import plan, request_from_spec

    device = resolve_device(spec)
    job_plan = plan(request_from_spec(spec, model_shape(spec.model), device, count_trainable(spec)))
    if spec.strategy != "auto":
        check_supported(spec.method.name, spec.strategy, device)
    return job_plan


def job_command(spec: JobSpec, job_plan: Plan, rdzv_endpoint: str | None = None) -> list[str]:
    from cluster.local import torchrun_argv

    return torchrun_argv(
        spec.output_dir,
        nproc_per_node=spec.hardware.gpus_per_node,
        nnodes=spec.hardware.nodes,
        rdzv_endpoint=rdzv_endpoint,
        run_id=spec.output_dir.name,
        shutdown_timeout_s=job_plan.save_grace_s,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.job import deepspeed_json
    from launcher.report import gib

    spec = load_job(args)
    job_plan = make_job_plan(spec)
    if not args.json:
        check_before_ranks(spec, job_plan, data=False)  # data files are checked by `ftl run` (it tokenizes them)
    command = job_command(spec, job_plan)
    ds_config = deepspeed_json(spec, job_plan)
    measured = measure_plan(spec, job_plan) if args.measure else None
    if args.json:
        extra = {"deepspeed_config": ds_config} if ds_config else {}
        if measured is not None:
            extra["measured_peak_bytes"] = measured.peak
            extra["measured_trainable_state_bytes"] = measured.trainable_state
        print(json.dumps({**job_plan.to_dict(), "command": command, **extra}, indent=2))
    else:
        print_plan(job_plan, command, ds_config)
        if measured is not None:
            predicted = job_plan.per_rank.total - job_plan.per_rank.overhead
            how = "a real step" if spec.method.name == "qlora" else "one traced step"
            console.print(
                f"[bold]measured[/] {how} of {job_plan.strategy} with method {spec.method.name} at world size "
                f"{job_plan.request.world_size}: peak {gib(measured.peak)} of tensors vs predicted {gib(predicted)} "
                f"(ratio {predicted / measured.peak:.3f}; the fixed overhead is not a tensor and is left out of both); "
                f"trainable parameters + optimizer states {gib(measured.trainable_state)}"
            )
    return 0 if job_plan.fits else 2


def measure_plan(spec: JobSpec, job_plan: Plan) -> MeasuredMemory:
    """Peak tensor bytes of one rank, from the plan's step (its strategy, method and model, built by the
    code `ftl run` uses) traced under FakeTensorMode; QLoRA's 4-bit kernels have no fake-tensor rules, so
    its step runs for real, in this process."""
    import torch

    from launcher.measure import CAUSAL_ONLY, MEASURABLE, StepSetup, measure_step
    from launcher.model_info import build_config
    from launcher.modeling import build_model

    strategy = "fsdp2" if job_plan.strategy == "zero3" else job_plan.strategy
    if strategy not in MEASURABLE:
        raise FTLError(
            f"`--measure` traces ddp and fsdp2 steps (zero3 as fsdp2); the plan chose {job_plan.strategy}, which runs "
            "inside DeepSpeed and cannot be traced with fake tensors. Force `strategy=fsdp2` to measure the sharded "
            "equivalent."
        )
    quantized = spec.method.name == "qlora"
    if quantized and strategy != "ddp":
        raise FTLError(
            f"`--measure` runs QLoRA's step for real (bitsandbytes' 4-bit kernels cannot be traced with fake tensors), "
            f"in one process, which measures a DDP rank only; the plan chose {job_plan.strategy}. Force `strategy=ddp` "
            "to measure the step, or plan without --measure."
        )
    from launcher.report import gib, short_count

    r = job_plan.request
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if quantized and 4 * r.shape.params_total > host_bytes // 2:
        raise FTLError(
            f"`--measure` runs QLoRA's step for real, which first builds the {short_count(r.shape.params_total)}-parameter model "
            f"in this machine's memory ({gib(4 * r.shape.params_total)} in fp32, this machine has {gib(host_bytes)}). "
            "Measure a smaller model of the same family, or plan without --measure."
        )

    def build() -> torch.nn.Module:
        # pad_token_id: a decoder classifier pools at the last non-pad token and needs one; any id traces the same.
        return build_model(
            spec, meta=not quantized, device=torch.device("cpu"), strategy=job_plan.strategy, attn_implementation=CAUSAL_ONLY,
            pad_token_id=0,
        )

    setup = StepSetup(
        config=build_config(spec.model),
        strategy=strategy,
        # A DDP rank's memory does not depend on the world size: the real QLoRA step runs as one rank.
        world_size=1 if quantized else r.world_size,
        micro_batch_size=r.micro_batch_size,
        seq_len=r.seq_len,
        precision=r.precision,
        activation_checkpointing=r.activation_checkpointing,
        quantized=quantized,
        fake=not quantized,
        num_labels=r.num_labels,
        lora_dropout=r.lora_dropout,
        build=build,
    )
    return measure_step(setup)


def print_plan(job_plan: Plan, command: list[str], ds_config: dict | None = None) -> None:
    from launcher.report import print_plan as render_plan

    render_plan(console, job_plan, command, ds_config)


def cmd_run(args: argparse.Namespace) -> int:
    from cluster.local import job_env, run_local
    from launcher.job import deepspeed_json, prepare_run_dir

    spec = load_job(args)
    device = resolve_device(spec)
    _check_devices(spec, device)
    job_plan = preflight(spec, args.rdzv_endpoint)
    command = job_command(spec, job_plan, args.rdzv_endpoint)
    if args.dry_run:
        print_plan(job_plan, command, deepspeed_json(spec, job_plan))
        return 0
    prepare_run_dir(spec, job_plan, fresh=args.no_resume, say=console.print)
    console.print(f"[bold]FTL[/] {job_plan.strategy} x {spec.hardware.nodes * spec.hardware.gpus_per_node} ranks -> {spec.output_dir}")
    console.print("[dim]" + escape(" ".join(command)) + "[/]")
    code = exit_code_of(run_local(command, env=job_env(device, dict(os.environ), spec.hardware.gpus_per_node)), spec.output_dir)
    if code == 0:
        write_final_model(spec)
    return code


def write_final_model(spec: JobSpec) -> None:
    """A finished run's model as a transformers/PEFT folder in RUN_DIR/final (launcher/export.py), written
    here, after torchrun has exited: the last checkpoint is complete and one process reads it whatever the
    strategy. On several nodes each runs `ftl run` and none knows it holds rank 0: `ftl export` instead."""
    if not spec.checkpoint.export_final:
        return
    if spec.hardware.nodes > 1:
        console.print(f"[dim]the final model of a multi-node `ftl run` is not exported by each node: run "
                      f"`ftl export {escape(str(spec.output_dir))} --to {escape(str(spec.output_dir / 'final'))}` once[/]")
        return
    from launcher.export import write_final

    write_final(spec.output_dir, say=lambda line: console.print(escape(line)))


def preflight(spec: JobSpec, rdzv_endpoint: str | None = None) -> Plan:
    """Every check `ftl run` makes before it writes anything or starts a rank (bar the GPUs being present,
    which only the machine that runs the job can tell): the plan, the method x strategy table, the fit,
    the strategy's library."""
    from strategies.registry import check_available

    job_plan = make_job_plan(spec)
    if not job_plan.fits and spec.strategy == "auto":
        print_plan(job_plan, job_command(spec, job_plan, rdzv_endpoint))
        raise FTLError(f"The job does not fit: {job_plan.reason} See `what would fit` above.")
    for warning in job_plan.warnings:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if spec.hardware.nodes > 1 and not rdzv_endpoint:
        raise FTLError(
            f"`hardware.nodes` is {spec.hardware.nodes}: `ftl run` runs one machine. Run the same command on each "
            "node with `--rdzv-endpoint HOST:PORT` (HOST is the first node), or use `ftl submit --to slurm`."
        )
    check_available(job_plan.strategy)
    check_before_ranks(spec, job_plan)
    return job_plan


def check_before_ranks(spec: JobSpec, job_plan: Plan, data: bool = True) -> None:
    """launcher/preflight.py: the run dir, the model's positions and (with `data`) every data file, checked
    here so a mistake is one paragraph before any rank starts."""
    from launcher.preflight import run_checks

    for warning in run_checks(spec, job_plan.request.world_size, lambda line: console.print(f"[dim]{escape(line)}[/]"), data=data):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")


def exit_code_of(torchrun_code: int, run_dir: Path) -> int:
    """`ftl run`'s exit code (launcher.outcome.launcher_exit_code), with what happened said once."""
    from launcher.outcome import EXIT_PREEMPTED, EXIT_USER_ERROR, launcher_exit_code, read_outcome

    result = read_outcome(run_dir)
    code = launcher_exit_code(torchrun_code, result)
    if code == EXIT_PREEMPTED:
        console.print(f"[bold yellow]pre-empted[/] ({escape(result.detail)}): checkpoint {result.checkpoint}; rerun to resume (exit {EXIT_PREEMPTED})")
    elif code == EXIT_USER_ERROR and result is not None:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(result.detail)}")
    return code


def _check_devices(spec: JobSpec, device: str) -> None:
    if device != "cuda":
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise FTLError(
            "`hardware.device` is cuda but this machine has no CUDA device. Run the job where its GPUs are, or run "
            "it here on the CPU with `hardware.device=cpu`."
        )
    if have < spec.hardware.gpus_per_node:
        raise FTLError(
            f"`hardware.gpus_per_node` is {spec.hardware.gpus_per_node} but this machine has {have} CUDA device(s). "
            f"Pass --gpus {have} or `hardware.device=cpu`."
        )


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.export import export_run

    info = export_run(args.run_dir.resolve(), args.to.resolve(), merge=args.merge)
    console.print(
        f"exported {info['kind']} ({info['method']}) from {info['checkpoint']} to {args.to}; reloaded with "
        f"transformers{'/peft' if info['kind'] == 'adapter' else ''}: max logit difference {info['max_logit_diff']:.1e}"
    )
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from launcher.spec import JobSpec

    if args.schema:
        print(json.dumps(JobSpec.model_json_schema(), indent=2))
        return 0
    from launcher.report import print_spec_fields

    console.print(
        "The job spec's fields, by section (`ftl spec --schema`: the JSON schema). Set any field in the YAML or "
        "on the command line as `path=value`, e.g. `train.lr=1e-4`.", soft_wrap=False,
    )
    print_spec_fields(console, JobSpec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
