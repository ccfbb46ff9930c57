"""User mistakes and the paragraph each gets from `ftl` (exit 2, no traceback, nothing written in the run
dir): a table to read as documentation of FTL's errors, and the input of tests/test_mistakes.py.

Each entry: `name`; `argv`, the arguments after `ftl`, where `{quickstart}`, `{multitask}` and `{minilm}`
stand for configs/quickstart.yaml, configs/multitask.yaml and configs/minilm-classify.yaml, `{data}` for a
folder of the files `write_fixtures` makes, `{tmp}` for the case's own scratch folder; `expect`, a regex
the error paragraph (whitespace collapsed) must match: it names the field or file, and the fix where there
is one. Every case gets `output_dir` in its scratch folder unless it names one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REPO

QUICKSTART_ROWS = (REPO / "configs/data/quickstart.jsonl").read_text().splitlines()


def write_fixtures(folder: Path) -> None:
    """The broken files the data and model cases point at."""
    rows = QUICKSTART_ROWS[:60]
    (folder.parent / "quickstart.jsonl").write_text("\n".join(QUICKSTART_ROWS) + "\n")
    (folder / "bad-line.jsonl").write_text("\n".join(rows[:49] + ['{"text": "an unterminated string'] + rows[49:]) + "\n")
    (folder / "empty.jsonl").write_text("")
    (folder / "body.jsonl").write_text("\n".join(r.replace('"text"', '"body"') for r in rows) + "\n")
    (folder / "two-rows.jsonl").write_text("\n".join(['{"text": "a b c"}', '{"text": "d e f"}']) + "\n")
    (folder / "missing-field.jsonl").write_text("\n".join(rows[:10] + ['{"title": "no text here"}'] + rows[10:]) + "\n")
    (folder / "a-file").write_text("not a folder\n")
    (folder / "list.jsonl").write_text("\n".join(rows[:5] + ["[1, 2, 3]"]) + "\n")
    no_hidden = folder / "no-hidden-size"
    no_hidden.mkdir()
    (no_hidden / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 384}))
    completion_only = [json.dumps({"prompt": "x" * 300, "completion": "y"}) for _ in range(20)]
    (folder / "too-long-prompts.jsonl").write_text("\n".join(completion_only) + "\n")


MISTAKES = [
    # --- data files: found by the pre-flight of `ftl run`, before torchrun starts ------------------------
    {"name": "a JSON Lines line that does not parse", "argv": ["run", "{quickstart}", "data.train={data}/bad-line.jsonl"],
     "expect": r"Cannot read data file \S+bad-line\.jsonl: line 50: .*valid jsonl"},
    {"name": "an empty data file", "argv": ["run", "{quickstart}", "data.train={data}/empty.jsonl"],
     "expect": r"Data file \S+empty\.jsonl is empty"},
    {"name": "the text column under another name", "argv": ["run", "{quickstart}", "data.train={data}/body.jsonl"],
     "expect": r"body\.jsonl: Cannot tell the data format from the columns \['body'\].*`text` needs 'text'.*field names"},
    {"name": "a row that is not an object", "argv": ["run", "{quickstart}", "data.train={data}/list.jsonl"],
     "expect": r"list\.jsonl: line 6: a JSON list, not an object"},
    {"name": "a bad row with on_bad_rows fail", "argv": ["run", "{quickstart}", "data.train={data}/missing-field.jsonl", "data.on_bad_rows=fail", "data.format=text"],
     "expect": r"missing-field\.jsonl.*(line|row) 11"},
    {"name": "fewer examples than one micro-batch on every rank", "argv": ["run", "{quickstart}", "data.train={data}/two-rows.jsonl", "data.validation=null"],
     "expect": r"hold 1 examples after tokenizing and packing.*one micro-batch on every rank takes 16.*train\.micro_batch_size"},
    {"name": "nothing left to supervise", "argv": ["run", "{quickstart}", "data.train={data}/too-long-prompts.jsonl", "data.validation=null", "data.format=completion"],
     "expect": r"supervises zero tokens.*train\.seq_len"},
    {"name": "a validation file that is not there", "argv": ["run", "{quickstart}", "data.validation={data}/nowhere.jsonl"],
     "expect": r"`data\.validation`: file \S*nowhere\.jsonl' does not exist"},
    {"name": "an empty validation file", "argv": ["run", "{quickstart}", "data.validation={data}/empty.jsonl"],
     "expect": r"Data file \S+empty\.jsonl is empty"},
    {"name": "a tokenizer that is not a folder", "argv": ["run", "{quickstart}", "data.tokenizer={data}/a-file"],
     "expect": r"`data\.tokenizer` is \S+a-file', which is neither `bytes` nor a local tokenizer folder"},
    {"name": "a vocabulary smaller than the tokenizer", "argv": ["run", "{quickstart}", "model.config.vocab_size=200"],
     "expect": r"tokenizer has \d+ tokens but the model's vocab_size is 200.*`model\.config\.vocab_size`"},
    {"name": "few-shot k above a class's examples", "argv": ["run", "{minilm}", "data.few_shot=100000"],
     "expect": r"`data\.few_shot` is 100000 but class '\w+' of \S+ has \d+ examples"},
    # --- the run dir ---------------------------------------------------------------------------------
    {"name": "output_dir that is a file", "argv": ["plan", "{quickstart}", "output_dir={data}/a-file"],
     "expect": r"`output_dir` \S+a-file is a file, not a folder"},
    {"name": "output_dir under a file", "argv": ["run", "{quickstart}", "output_dir={data}/a-file/run"],
     "expect": r"`output_dir` \S+a-file/run cannot be created: \S+a-file is a file"},
    # --- the model -----------------------------------------------------------------------------------
    {"name": "seq_len past learned positions", "argv": ["plan", "{quickstart}", "model.config.model_type=gpt2", "model.config.bos_token_id=1", "model.config.eos_token_id=1", "train.seq_len=1024"],
     "expect": r"`train\.seq_len` is 1024 but gpt2 has learned positions for 512 tokens.*at most 512"},
    {"name": "a negative number of heads", "argv": ["plan", "{quickstart}", "model.config.num_attention_heads=-5"],
     "expect": r"`model\.config\.num_attention_heads` is -5; it must be a positive whole number"},
    {"name": "a size that is not a number", "argv": ["plan", "{quickstart}", "model.config.hidden_size=abc"],
     "expect": r"`model\.config\.hidden_size` is 'abc'; it must be a positive whole number"},
    {"name": "heads that do not divide the width", "argv": ["plan", "{quickstart}", "model.config.num_attention_heads=3", "model.config.num_key_value_heads=1"],
     "expect": r"model\.config.*hidden size \(128\) is not a multiple of the number of attention heads \(3\)"},
    {"name": "KV heads that do not divide the heads", "argv": ["plan", "{quickstart}", "model.config.num_key_value_heads=3"],
     "expect": r"`model\.config\.num_key_value_heads` \(3\) does not divide num_attention_heads \(4\)"},
    {"name": "an inline config without its size", "argv": ["plan", "{quickstart}", "model.config.num_hidden_layers=null"],
     "expect": r"model\.config.*num_hidden_layers"},
    {"name": "a config.json without hidden_size", "argv": ["plan", "{quickstart}", "model.name_or_path={data}/no-hidden-size", "model.init=random"],
     "expect": r"no-hidden-size/config\.json does not give hidden_size: transformers would fill in its `llama` defaults"},
    {"name": "an encoder-decoder model", "argv": ["plan", "{quickstart}", "model.config.model_type=t5"],
     "expect": r"`t5` is an encoder-decoder model, which FTL does not train"},
    {"name": "an unknown model type", "argv": ["plan", "{quickstart}", "model.config.model_type=llama9"],
     "expect": r"model\.config.*llama9"},
    # --- hardware and strategy -----------------------------------------------------------------------
    {"name": "a CUDA job on a machine without CUDA", "argv": ["run", "{quickstart}", "hardware.device=cuda"],
     "expect": r"`hardware\.device` is cuda but this machine has no CUDA device.*hardware\.device=cpu"},
    {"name": "several nodes without a rendezvous", "argv": ["run", "{quickstart}", "hardware.nodes=2"],
     "expect": r"`hardware\.nodes` is 2: `ftl run` runs one machine.*--rdzv-endpoint"},
    {"name": "a strategy FTL does not have", "argv": ["plan", "{quickstart}", "strategy=zero4"],
     "expect": r"`strategy`.*zero4"},
    {"name": "zero ranks", "argv": ["plan", "{quickstart}", "--gpus", "0"],
     "expect": r"`hardware\.gpus_per_node`"},
    # --- continual phases and mixtures ---------------------------------------------------------------
    {"name": "phases that do not add up to max_steps", "argv": ["plan", "{quickstart}", "data.train=null", "data.validation=null",
                                                              "data.phases=[{{name: a, mixture: [{{path: {data}/../quickstart.jsonl}}], steps: 10}}]"],
     "expect": r"`data\.phases` steps add up to 10 = 10, but `train\.max_steps` is 300"},
    {"name": "a phase warmup longer than its phase", "argv": ["plan", "{quickstart}", "data.train=null", "data.validation=null", "train.max_steps=20", "train.warmup_steps=2",
                                                             "data.phases=[{{name: a, mixture: [{{path: {data}/../quickstart.jsonl}}], steps: 20, lr: 0.001, warmup_steps: 20}}]"],
     "expect": r"phase 'a' has its own LR cycle, but its warmup \(20 steps, data\.phases\.0\.warmup_steps\) does not fit"},
    {"name": "two mixture sources with one name", "argv": ["plan", "{multitask}", "data.mixture.1.name=prose"],
     "expect": r"`data\.mixture` names its sources .*give each a distinct `name`"},
    {"name": "an override index past the list", "argv": ["plan", "{multitask}", "data.mixture.7.weight=1"],
     "expect": r"data\.mixture\.7"},
    # --- the spec itself: sizes, names other tools use, warmup, paths, methods, overrides ---------------
    # Sizes need a unit: a bare number was read as bytes.
    {"name": "gpu-mem flag without a unit", "argv": ["plan", "{quickstart}", "--gpu-mem", "80"],
     "expect": r"`hardware\.gpu_mem`: 80 has no unit.*`80GB`.*`80GiB`.*`--gpu-mem 80GB`"},
    {"name": "gpu_mem override without a unit", "argv": ["run", "{quickstart}", "hardware.gpu_mem=24"],
     "expect": r"`hardware\.gpu_mem`: 24 has no unit.*`24GB`"},
    {"name": "cpu_mem without a unit", "argv": ["plan", "{quickstart}", "hardware.cpu_mem=512"],
     "expect": r"`hardware\.cpu_mem`: 512 has no unit.*`512GB`"},
    # Other tools' names: answered by meaning, not by spelling.
    {"name": "learning_rate for lr", "argv": ["plan", "{quickstart}", "train.learning_rate=1e-4"],
     "expect": r"`train\.learning_rate` is not a known key in `train`.*Did you mean `train\.lr`\?"},
    {"name": "epochs for max_steps", "argv": ["plan", "{quickstart}", "train.num_train_epochs=3"],
     "expect": r"Did you mean `train\.max_steps`\?.*steps = epochs × rows / \(micro_batch_size × grad_accum × ranks\), here 3 × rows / \(8 × 1 × 2\)"},
    {"name": "batch_size for micro_batch_size", "argv": ["plan", "{quickstart}", "train.per_device_train_batch_size=4"],
     "expect": r"`train\.per_device_train_batch_size` is not a known key.*Did you mean `train\.micro_batch_size`\?"},
    {"name": "gradient_accumulation_steps for grad_accum", "argv": ["plan", "{quickstart}", "train.gradient_accumulation_steps=4"],
     "expect": r"Did you mean `train\.grad_accum`\?"},
    {"name": "max_seq_length for seq_len", "argv": ["plan", "{quickstart}", "train.max_seq_length=256"],
     "expect": r"`train\.max_seq_length` is not a known key.*Did you mean `train\.seq_len`\?"},
    {"name": "lr_scheduler (a fixed schedule)", "argv": ["plan", "{quickstart}", "train.lr_scheduler=linear"],
     "expect": r"Did you mean `train\.warmup_steps`\?.*schedule is fixed"},
    {"name": "model_name_or_path for name_or_path", "argv": ["plan", "{minilm}", "model.model_name_or_path=x"],
     "expect": r"`model\.model_name_or_path` is not a known key.*Did you mean `model\.name_or_path`\?"},
    {"name": "lora_r for method.lora.r", "argv": ["plan", "{quickstart}", "method.name=lora", "method.lora_r=8"],
     "expect": r"`method\.lora_r` is not a known key.*Did you mean `method\.lora\.r`\?"},
    {"name": "a train field at the top level", "argv": ["plan", "{quickstart}", "weight_decay=0.1"],
     "expect": r"`weight_decay` is not a known key in the top level.*Did you mean `train\.weight_decay`\?"},
    {"name": "a setting FTL does not have", "argv": ["run", "{quickstart}", "resume_from_checkpoint=true"],
     "expect": r"`resume_from_checkpoint` is not a known key.*FTL has no `resume_from_checkpoint`.*--no-resume"},
    # Warmup: one from the spec is clamped to fit a short run; one given on the command line is taken as meant.
    {"name": "warmup given longer than the run", "argv": ["plan", "{quickstart}", "train.max_steps=20", "train.warmup_steps=30"],
     "expect": r"`train\.warmup_steps` \(30\) must be smaller than `train\.max_steps` \(20\)"},
    # Paths on the command line start at the current directory; in a spec file, at its folder.
    {"name": "data file on the command line that is not there", "argv": ["plan", "{quickstart}", "data.train=no/such.jsonl"],
     "expect": r"`data\.train`: file 'no/such\.jsonl' does not exist \(a relative path on the command line starts at the current directory"},
    {"name": "model folder that is not there", "argv": ["plan", "{quickstart}", "model.name_or_path=no/such/model"],
     "expect": r"`model\.name_or_path` is 'no/such/model', which is not a folder holding config\.json"},
    # Methods: the required key is named; a schedule longer than the run is refused.
    {"name": "gradual unfreezing without every_steps", "argv": ["plan", "{quickstart}", "method.name=gradual_unfreezing"],
     "expect": r"needs `method\.gradual_unfreezing\.every_steps`"},
    {"name": "gradual unfreezing longer than the run", "argv": ["plan", "{quickstart}", "method.name=gradual_unfreezing", "method.gradual_unfreezing.every_steps=100"],
     "expect": r"`method\.gradual_unfreezing`: unfreezing 4 blocks every 100 steps takes 400 steps, but `train\.max_steps` is 300"},
    {"name": "freezing more blocks than the model has", "argv": ["plan", "{quickstart}", "method.name=freeze", "method.freeze.blocks=9"],
     "expect": r"`method\.freeze\.blocks` is 9 but the model has 4 blocks"},
    {"name": "a method section for another method", "argv": ["plan", "{quickstart}", "method.lora.r=8"],
     "expect": r"`method\.lora` is given but `method\.name` is 'full'.*set `method\.name: lora`"},
    # Overrides.
    {"name": "a sub-key of a value", "argv": ["plan", "{quickstart}", "train.lr.peak=1"],
     "expect": r"Override 'train\.lr\.peak=1': `lr` holds a value, not a section"},
    {"name": "an override without a value", "argv": ["plan", "{multitask}", "train.lr"],
     "expect": r"Override 'train\.lr' is not of the form `key\.sub=value`"},
]
