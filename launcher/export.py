"""`ftl export RUN_DIR --to OUT`: the run's latest checkpoint as a folder transformers/PEFT can load.

- full, freeze, gradual_unfreezing: the whole model (safetensors + config with id2label) and tokenizer;
- lora, qlora, prompt_tuning: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors);
  with `--merge` (LoRA only) the adapters are merged into the base and the whole model is written.
  A random-init base has no folder to refer to, so it is written to OUT/base and the adapter points there.

Runs in one process, no process group: DCP reads a sharded checkpoint of any world size into one
model, and DeepSpeed's ZeRO files are consolidated with DeepSpeed's own zero_to_fp32.
After writing, the export is loaded back and its logits compared with the model it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from launcher.checkpoint import find_resume_checkpoint
from launcher.data import build_tokenizer
from launcher.errors import FTLError
from launcher.modeling import auto_class, build_model, task_config
from launcher.spec import JobSpec, MethodSpec, load_spec
from launcher.train_state import spec_fingerprint
from strategies.catalog import traits
from strategies.dcp_state import SafeFileSystemReader, state_dict_options


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

    label_names = read_label_names(run_dir)
    model = load_trained_model(spec, ckpt.path, ckpt.manifest["strategy"], label_names)
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
                auto_class(spec).from_config(base_config, dtype=torch.float32).save_pretrained(base_dir)
                model.peft_config["default"].base_model_name_or_path = str(base_dir)
            else:
                model.peft_config["default"].base_model_name_or_path = str(spec.model.name_or_path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    diff = check_reload(spec, model, out, kind, base_dir)
    info = {"kind": kind, "method": spec.method.name, "checkpoint": str(ckpt.path), "max_logit_diff": diff}
    (out / "ftl_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


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
