"""Spec-level user mistakes and the paragraph each gets (exit 2, no traceback), as a table to read as
documentation of the errors and to drive the table-driven mistakes test.

Each entry: `name`; `argv`, the `ftl` arguments after `ftl`, where `{quickstart}`, `{multitask}` and `{minilm}`
stand for configs/quickstart.yaml, configs/multitask.yaml and configs/minilm-classify.yaml; `expect`, a regex
the error paragraph must match (it names the field, and the fix where there is one). None of these writes
anything: the spec is refused before a run dir is touched.
"""

MISTAKES = [
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
