"""FTL, the fine-tuning launcher: job spec, planner, CLI and the per-rank training entry."""

import logging

# bitsandbytes on CPUs with AVX512-BF16 tries to fetch an optional kernel from the Hugging Face hub at
# import and warns on every process when it cannot. FTL never uses a hub (the fallback kernel is used),
# so that warning is noise in every rank's log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
