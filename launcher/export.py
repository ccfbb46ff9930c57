"""`ftl export RUN_DIR --to OUT`: the run's latest checkpoint as a folder transformers/PEFT can load.

- full, freeze, gradual_unfreezing: the whole model (safetensors + config with id2label) and tokenizer;
- lora, qlora, prompt_tuning: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors);
  with `--merge` (LoRA only) the adapters are merged into the base and the whole model is written.
  A random-init base has no folder to refer to, so it is written to OUT/base and the adapter points there.

Runs in one process, no process group: DCP reads a sharded checkpoint of any world size into one
model, and DeepSpeed's ZeRO files are consolidated with DeepSpeed's own zero_to_fp32.
After writing, the export is loaded back and its logits compared with the model it came from.

What a user's tools expect of the folder: the config's (and generation config's) bos/eos/pad ids are the
tokenizer's, so `generate()` stops at the tokenizer's EOS; every file is readable as any file the user
creates (transformers writes safetensors through a 0600 temporary file); the tokenizer is the one the run
used, in files transformers 4.4x reads as well as 5.x: a tokenizer folder's own files, copied, or for
`data.tokenizer: bytes` a four-key ByT5 tokenizer_config.json (5.x's save writes keys 4.x cannot read).

`write_final` makes the same export of a finished run into RUN_DIR/final (`checkpoint.export_final`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from transformers import PreTrainedTokenizerBase

from launcher.checkpoint import find_resume_checkpoint
from launcher.data import build_tokenizer
from launcher.errors import FTLError
from launcher.modeling import auto_class, build_model, task_config
from launcher.quiet import quiet_libraries
from launcher.spec import JobSpec, MethodSpec, load_spec
from launcher.train_state import spec_fingerprint
from strategies.catalog import traits
from strategies.dcp_state import SafeFileSystemReader, state_dict_options

FINAL_DIR = "final"  # RUN_DIR/final: the finished run's model, as `ftl export` writes it


def export_run(run_dir: Path, out: Path, merge: bool = False) -> dict:
    """Write the export; returns what was written and the reload check's max logit difference."""
    spec_path = run_dir / "spec.yaml"
    if not spec_path.is_file():
        raise FTLError(f"{run_dir} is not an FTL run directory (no spec.yaml). Pass the `output_dir` of a run.")
    spec = load_spec(spec_path)
    ckpt = find_resume_checkpoint(run_dir, spec_fingerprint(spec), fallback=False)
    if ckpt is None:
        raise FTLError(f"The run {run_dir} has no complete checkpoint to export yet (checkpoints/latest is missing).")
    if merge and spec.method.name not in ("lora", "qlora"):
        raise FTLError(f"`--merge` merges LoRA adapters into the base; this run's method is {spec.method.name}.")
    if out.exists() and any(out.iterdir()):
        raise FTLError(f"The export folder {out} exists and is not empty; pass a new folder (nothing was written).")
    return export_checkpoint(spec, run_dir, ckpt.path, ckpt.manifest["strategy"], out, merge)


@quiet_libraries()  # DCP in one process, DeepSpeed's import and transformers' bars: nothing for the user to act on
def export_checkpoint(spec: JobSpec, run_dir: Path, ckpt_path: Path, strategy: str, out: Path, merge: bool = False) -> dict:
    """Write checkpoint `ckpt_path` of the run as a transformers/PEFT folder `out` (created; must be empty)."""
    label_names = read_label_names(run_dir)
    model = load_trained_model(spec, ckpt_path, strategy, label_names)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    kind = "model"
    base_dir = None
    if spec.method.is_peft:
        if merge:
            model = model.merge_and_unload()
        else:
            kind = "adapter"
            if spec.model.name_or_path is None or spec.model.init == "random":
                base_dir = out / "base"
                # The random base exactly as the run built it: same seed, same config, before the method.
                torch.manual_seed(spec.train.seed)
                base_config = task_config(spec, label_names, tokenizer.pad_token_id)
                base = auto_class(spec).from_config(base_config, dtype=torch.float32)
                align_special_tokens(base, tokenizer, spec.model.config is not None)
                base.save_pretrained(base_dir)
                model.peft_config["default"].base_model_name_or_path = str(base_dir)
            else:
                model.peft_config["default"].base_model_name_or_path = str(spec.model.name_or_path)
    if kind == "model":
        align_special_tokens(model, tokenizer, spec.model.config is not None)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    diff = check_reload(spec, model, out, kind, base_dir)
    check_tokenizer_reload(tokenizer, out)
    info = {"kind": kind, "method": spec.method.name, "checkpoint": str(ckpt_path), "max_logit_diff": diff}
    (out / "ftl_export.json").write_text(json.dumps(info, indent=2) + "\n")
    make_readable(out)
    return info


def align_special_tokens(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, inline_config: bool) -> None:
    """The config's and generation config's bos/eos/pad ids become the tokenizer's (an inline Llama config
    carries LlamaConfig's bos 1 / eos 2, while the byte tokenizer's `</s>` is 1 and it has no bos: generate()
    never stopped). An id list that already holds the tokenizer's (Llama 3's two EOS) is kept. A token the
    tokenizer lacks clears the id only in an inline config, whose ids are transformers' defaults; a model
    folder's own config keeps it. Weights do not change: a pad id only zeroes that row's gradient in training."""
    configs = [model.config, getattr(model, "generation_config", None)]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        wanted = getattr(tokenizer, name)
        if wanted is None and not inline_config:
            continue
        for config in configs:
            if config is None:
                continue
            current = getattr(config, name, None)
            if wanted not in (current if isinstance(current, list) else [current]):
                setattr(config, name, wanted)
    if getattr(model.config, "use_cache", None) is False:  # off for training (checkpointing); on for generate()
        model.config.use_cache = True
        if configs[1] is not None:
            configs[1].use_cache = True


# Files that make up a tokenizer folder, copied as they are (whatever version of transformers wrote them).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)
# `data.tokenizer: bytes` (ByT5Tokenizer(): 3 specials + 256 bytes + 125 extra ids = 384) in the keys both
# transformers 4.4x and 5.x read. 5.x's save_pretrained writes `extra_special_tokens` as a list (4.52 expects
# a dict: "Failed to load tokenizer" in LLaMA-Factory 0.9.3) and `"backend": "custom"`.
BYTES_TOKENIZER_CONFIG = {
    "tokenizer_class": "ByT5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 125,
}


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    from transformers import ByT5Tokenizer

    source = Path(tokenizer.name_or_path) if tokenizer.name_or_path else None
    if source is not None and source.is_dir():
        copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
        for name in copied:
            shutil.copyfile(source / name, out / name)
        if copied:
            return
    if type(tokenizer) is ByT5Tokenizer and len(tokenizer) == 384:
        (out / "tokenizer_config.json").write_text(json.dumps(BYTES_TOKENIZER_CONFIG, indent=2) + "\n")
        return
    tokenizer.save_pretrained(out)


def check_tokenizer_reload(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """The exported tokenizer, loaded as a user would, encodes a probe as the run's did and has its special ids."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    probe = "FTL export check: héllo, wörld! 123\n"
    same_ids = all(getattr(reloaded, n) == getattr(tokenizer, n) for n in ("bos_token_id", "eos_token_id", "pad_token_id"))
    if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"] or len(reloaded) != len(tokenizer) or not same_ids:
        raise FTLError(f"The tokenizer exported to {out} does not encode like the run's ({type(tokenizer).__name__}); please report this.")


def make_readable(out: Path) -> None:
    """Give every file and folder of the export the mode a new file of this user gets (0644 and 0755 under
    the usual umask 022): transformers writes model.safetensors through a temporary file, which is 0600."""
    umask = current_umask()
    for path in [out, *out.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def current_umask() -> int:
    """This process's umask, read without setting it (os.umask is process-wide: a probe would give files
    another thread creates meanwhile mode 0666); Linux's /proc, else the probe."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def write_final(run_dir: Path, say: Callable[[str], None] = print) -> Path | None:
    """After a run ends (done or early-stopped, or found already complete): its last checkpoint as a
    transformers/PEFT folder in RUN_DIR/final, unless `checkpoint.export_final` is off or the folder already
    holds that checkpoint. Runs in the launching process after the ranks have exited (the checkpoint is
    complete; no process group is needed to read a sharded one). A failure here does not fail the run
    that succeeded: it is said, with the `ftl export` command that redoes it."""
    from launcher.outcome import Outcome, read_outcome

    result = read_outcome(run_dir)
    if result is None or result.outcome not in (Outcome.DONE, Outcome.EARLY_STOPPED, Outcome.ALREADY_COMPLETE):
        return None
    final = run_dir / FINAL_DIR
    try:
        return _write_final(run_dir, final, say)
    except Exception as exc:
        shutil.rmtree(run_dir / f"{FINAL_DIR}.tmp", ignore_errors=True)
        say(f"warning: the final model was not written to {final} ({type(exc).__name__}: {exc}); "
            f"write it with `ftl export {run_dir} --to {final}`")
        return None


def _write_final(run_dir: Path, final: Path, say: Callable[[str], None]) -> Path | None:
    spec = load_spec(run_dir / "spec.yaml")
    if not spec.checkpoint.export_final:
        return None
    ckpt = find_resume_checkpoint(run_dir, spec_fingerprint(spec), fallback=False)
    if ckpt is None:
        return None
    try:
        if json.loads((final / "ftl_export.json").read_text())["checkpoint"] == str(ckpt.path):
            return final  # already written for this checkpoint (a rerun that found the run complete)
    except (OSError, ValueError, KeyError):
        pass
    plan = json.loads((run_dir / "plan.json").read_text())
    need = 2 * 4 * int(plan["request"]["shape"]["params_total"])  # built in fp32, then reloaded to check it
    have = available_memory_bytes()
    if spec.method.name in ("full", "freeze", "gradual_unfreezing") and have is not None and need > have:
        say(f"note: the final model is not written here: exporting it builds the whole model in fp32 twice (~{need / 2**30:.0f} GiB) "
            f"and this machine has {have / 2**30:.0f} GiB available; run `ftl export {run_dir} --to {final}` where the memory is, "
            "or set `checkpoint.export_final: false`")
        return None
    # Written beside `final` and renamed, so `final` is always one whole export.
    tmp = run_dir / f"{FINAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    info = export_checkpoint(spec, run_dir, ckpt.path, ckpt.manifest["strategy"], tmp)
    if info["kind"] == "adapter" and (tmp / "base").is_dir():  # the adapter's base moves with the folder
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(final / "base")
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    say(f"final {info['kind']} ({info['method']}) of checkpoint {ckpt.path.name} written to {final}")
    return final


def read_label_names(run_dir: Path) -> list[str] | None:
    labels = run_dir / "labels.json"
    if not labels.is_file():
        return None
    id2label = json.loads(labels.read_text())["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]


def load_trained_model(spec: JobSpec, ckpt_path: Path, strategy: str, label_names: list[str] | None) -> torch.nn.Module:
    """The model as trained: built like the train entry builds it (same seed, so a random base is the
    same), then the checkpoint's weights loaded into it. QLoRA's adapters load onto a dense base: the
    export does not need the 4-bit one."""
    if spec.method.name == "qlora":
        method = MethodSpec(name="lora", lora=spec.method.lora)
        spec = spec.model_copy(update={"method": method})
    torch.manual_seed(spec.train.seed)
    model = build_model(spec, label_names=label_names, pad_token_id=build_tokenizer(spec).pad_token_id)
    trainable_only = spec.method.is_peft
    if traits(strategy).checkpoint_format == "dcp":
        options = state_dict_options(trainable_only)
        state = {"model": get_model_state_dict(model, options=options)}
        dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt_path)), planner=dcp.default_planner.DefaultLoadPlanner(allow_partial_load=True))
        set_model_state_dict(model, state["model"], options=options)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from strategies.deepspeed import weights_only_loads

        with weights_only_loads(ckpt_path):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_path), tag="deepspeed", exclude_frozen_parameters=trainable_only)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or (missing and not trainable_only):
            raise FTLError(f"The DeepSpeed checkpoint {ckpt_path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    return model


@torch.no_grad()
def check_reload(spec: JobSpec, model: torch.nn.Module, out: Path, kind: str, base_dir: Path | None) -> float:
    """Load the export with transformers (and PEFT) and return the largest logit difference on a probe."""
    cls = auto_class(spec)
    if kind == "adapter":
        from peft import PeftModel

        base = cls.from_pretrained(base_dir or spec.model.name_or_path, local_files_only=True, dtype=torch.float32, **_label_kwargs(model))
        reloaded = PeftModel.from_pretrained(base, out)
    else:
        reloaded = cls.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    reloaded.eval()
    probe = torch.arange(1, 17).remainder(model.get_input_embeddings().num_embeddings - 1).add(1).unsqueeze(0)
    mask = torch.ones_like(probe)
    diff = (model(input_ids=probe, attention_mask=mask).logits - reloaded(input_ids=probe, attention_mask=mask).logits).abs().max().item()
    if diff > 1e-4:
        raise FTLError(f"The export in {out} does not reproduce the trained model (max logit difference {diff:.2e}); please report this.")
    return diff


def _label_kwargs(model: torch.nn.Module) -> dict:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    if getattr(config, "num_labels", None) and getattr(config, "id2label", None):
        return {"num_labels": config.num_labels, "id2label": config.id2label, "label2id": config.label2id, "pad_token_id": config.pad_token_id}
    return {}
