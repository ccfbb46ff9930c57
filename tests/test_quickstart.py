"""`ftl run` end to end: a real 2-process torchrun (gloo) fine-tune whose loss falls and whose
checkpoint reloads into a fresh model giving the same validation loss the run reported."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM

from launcher.data import build_tokenizer, load_examples
from launcher.model_info import build_config
from launcher.spec import load_spec
from tests.conftest import run_ftl


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_ftl(
        "run", "configs/quickstart.yaml", "train.max_steps=120", "train.log_every=10", "checkpoint.every=50",
        f"output_dir={out}", timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_loss_falls_by_a_clear_margin(quickstart_run):
    out, _ = quickstart_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] > 5.0  # ~ln(384): random init over the byte vocabulary
    assert losses[-1] < losses[0] - 3.0
    assert all({"step", "loss", "lr", "tokens_per_s", "elapsed_s"} <= r.keys() for r in records if "loss" in r)


def test_run_dir_holds_spec_plan_and_complete_checkpoints(quickstart_run):
    out, _ = quickstart_run
    plan = json.loads((out / "plan.json").read_text())
    assert plan["strategy"] == "ddp" and plan["world_size"] == 2
    assert load_spec(out / "spec.yaml").train.max_steps == 120  # the override is in the resolved spec
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-120"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-100", "step-120"]  # keep: 2
    manifest = json.loads((root / "step-120" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 120
    for name, size in manifest["files"].items():
        assert (root / "step-120" / name).stat().st_size == size


def test_checkpoint_reloads_and_reproduces_validation_loss(quickstart_run):
    out, _ = quickstart_run
    spec = load_spec(out / "spec.yaml")
    model = AutoModelForCausalLM.from_config(build_config(spec.model))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(out / "checkpoints" / "step-120"))
    model.load_state_dict(state["model"])
    model.eval()

    examples, _ = load_examples(spec, build_tokenizer(spec), spec.data.validation)  # the last block's padding is masked
    with torch.no_grad():
        # The run evaluated rank r on blocks[r::2], up to 16 micro-batches each.
        split = {name: [t[r::2].split(spec.train.micro_batch_size)[:16] for r in range(2)] for name, t in examples.items()}
        batches = [{name: split[name][r][i] for name in examples} for r in range(2) for i in range(len(split["input_ids"][r]))]
        total = sum(model(**b).loss * len(b["input_ids"]) for b in batches)
        count = sum(len(b["input_ids"]) for b in batches)
    reported = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in l][-1]
    assert abs(float(total / count) - reported["val_loss"]) < 1e-4


def test_rerun_resumes_and_finds_the_run_complete(quickstart_run):
    out, _ = quickstart_run
    again = run_ftl("run", "configs/quickstart.yaml", "train.max_steps=120", "checkpoint.every=50", f"output_dir={out}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already complete at step 120" in again.stdout
    assert (out / "checkpoints" / "step-120").is_dir()


def test_each_rank_leaves_its_output_in_the_run_dir(quickstart_run):
    """RUN_DIR/logs/rank-N.log: what each rank wrote, still there when the terminal is gone; each start
    of the rank opens its part with a header (a rerun appends)."""
    out, result = quickstart_run
    logs = {path.name: path.read_text() for path in (out / "logs").iterdir()}
    assert sorted(logs) == ["rank-0.log", "rank-1.log"]
    for rank in (0, 1):
        assert logs[f"rank-{rank}.log"].startswith(f"FTL rank {rank} of 2 on "), logs[f"rank-{rank}.log"][:200]
    last = next(line for line in result.stdout.splitlines() if line.startswith("step=120  loss="))
    assert last in logs["rank-0.log"].splitlines()  # the same line the terminal showed


def _expected_mode(directory: bool = False) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def test_finished_run_leaves_a_model_that_loads_and_generate_stops_at_eos(quickstart_run):
    """RUN_DIR/final is what `ftl export` writes: transformers loads it at once, its special ids are the
    tokenizer's (generate() stops at the byte tokenizer's `</s>`, id 1, not LlamaConfig's default 2), every
    file is readable as any file the user makes (0644 under umask 022), and the tokenizer files use only
    keys transformers 4.4x reads too (5.x's own save writes a list where 4.52 wants a dict)."""
    from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

    out, result = quickstart_run
    final = out / "final"
    assert f"written to {final}" in result.stdout
    assert sorted(p.name for p in final.iterdir()) == [
        "config.json", "ftl_export.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
    ]
    assert stat.S_IMODE(final.stat().st_mode) == _expected_mode(directory=True)
    for path in final.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == _expected_mode(), path
    assert json.loads((final / "ftl_export.json").read_text())["checkpoint"].endswith("step-120")
    assert set(json.loads((final / "tokenizer_config.json").read_text())) == {
        "tokenizer_class", "eos_token", "pad_token", "unk_token", "extra_ids",
    }

    tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True).eval()
    assert tokenizer("abc")["input_ids"] == build_tokenizer(load_spec(out / "spec.yaml"))("abc")["input_ids"]
    eos = tokenizer.eos_token_id
    assert eos == 1 and model.config.eos_token_id == model.generation_config.eos_token_id == eos
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id == 0
    assert model.config.bos_token_id is None and tokenizer.bos_token_id is None

    class EosAfter(LogitsProcessor):
        """Makes the model emit EOS as its `n`-th new token: generate() must stop right there."""

        def __init__(self, start: int, n: int) -> None:
            self.start, self.n = start, n

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[1] - self.start == self.n - 1:
                scores = torch.full_like(scores, float("-inf"))
                scores[:, eos] = 0.0
            return scores

    prompt = tokenizer("The quick brown", return_tensors="pt", add_special_tokens=False)
    start = prompt["input_ids"].shape[1]
    with torch.no_grad():
        forced = model.generate(**prompt, max_new_tokens=200, do_sample=False, logits_processor=LogitsProcessorList([EosAfter(start, 4)]))
        free = model.generate(**prompt, max_new_tokens=200, do_sample=False)
    assert forced.shape[1] == start + 4 and forced[0, -1].item() == eos
    new = free[0, start:].tolist()
    assert eos not in new[:-1]  # where the model emits EOS by itself, generation ends there too


def test_ftl_export_writes_the_same_folder_and_export_final_can_be_turned_off(quickstart_run, tmp_path):
    from launcher.export import export_run, write_final

    out, _ = quickstart_run
    export_run(out, tmp_path / "export")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (tmp_path / "export" / name).read_text() == (out / "final" / name).read_text()
    assert stat.S_IMODE((tmp_path / "export" / "model.safetensors").stat().st_mode) == _expected_mode()

    off = tmp_path / "off"
    off.mkdir()
    (off / "outcome.json").write_text((out / "outcome.json").read_text())
    (off / "spec.yaml").write_text((out / "spec.yaml").read_text().replace("export_final: true", "export_final: false"))
    assert "export_final: false" in (off / "spec.yaml").read_text()
    assert write_final(off) is None and not (off / "final").exists()
