"""Data pipeline benchmark, in one run:

(a) tokenize-and-cache throughput on a generated jsonl corpus (`--mb`, default 200 MB): FTL's cache build
    (launcher/token_cache.py, `data.num_proc` 2) against a plain `datasets.map(tokenizer, batched=True,
    num_proc=2)` of the same file and tokenizer; `tokenize_vs_datasets` = FTL's MB/s / datasets' MB/s.
(b) the memory of a process serving 200 micro-batches from that corpus's cache (its anonymous RSS: the
    cache is memory-mapped, and the file pages it reads are page cache) against one 10x smaller (goal:
    flat); `rss_ratio_10x` = big / small; and the peak anonymous RSS ratio for the
    process that builds the cache (`build_rss_ratio_10x`: packing streams, so it grows far less than 10x).
(c) the sampler + collate time of one quickstart micro-batch (mixture draw, memory-mapped rows, padding)
    against the quickstart's measured step time (`ftl run`, 2 CPU ranks); goal < 1%: `overhead_pct`.

    python bench/data.py [--mb 200]
Last line: RESULT tokenize_vs_datasets=.. rss_ratio_10x=.. overhead_pct=.. build_rss_ratio_10x=..
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORDS = "the of and to in is was for on that with as by at from his her an were are which this be or had it not but".split()


def corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    rng = random.Random(seed)
    target = int(megabytes * 2**20)
    with path.open("w") as f:
        written = 0
        while written < target:
            line = json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(20, 200)))}) + "\n"
            f.write(line)
            written += len(line)
    return path


def spec_for(data: Path, cache: Path):
    from launcher.spec import load_spec

    return load_spec(REPO / "configs/quickstart.yaml", [f"data.train={data}", f"data.cache_dir={cache}", "data.num_proc=2", "hardware.device=cpu"])


def ftl_tokenize(data: Path, cache: Path) -> tuple[float, int]:
    """(seconds, peak RSS bytes of the building process): FTL's cache build in a fresh process."""
    code = BUILD.format(repo=str(REPO), data=str(data), cache=str(cache), anon=ANON)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    seconds, peak = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(peak)


def datasets_tokenize_s(data: Path, work: Path) -> float:
    import datasets
    from transformers import ByT5Tokenizer

    datasets.disable_progress_bars()
    tokenizer = ByT5Tokenizer()
    started = time.monotonic()
    table = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf"))
    table.map(lambda b: tokenizer(b["text"]), batched=True, num_proc=2, remove_columns=["text"])
    return time.monotonic() - started


# Memory is read from /proc/self/status of fresh processes: ru_maxrss survives exec on Linux, so a child
# started from a big parent reports the parent's peak (this bench first read 17 GB for both corpora so).
# A serving rank's own memory: RssAnon. Its RSS also counts the cache's memory-mapped pages it has read
# (with the kernel's readahead, most of a small entry): clean page cache, dropped under pressure, shared
# by the ranks of a node; it is not memory the rank holds.
ANON = "int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024"

SERVE = """
import sys
sys.path.insert(0, {repo!r})
from bench.data import spec_for
from launcher.data import TrainStream, build_tokenizer, collator, open_sources
spec = spec_for(__import__("pathlib").Path({data!r}), __import__("pathlib").Path({cache!r}))
tok = build_tokenizer(spec)
sources = open_sources(spec, tok, spec.data.sources)
stream = TrainStream(sources, collator(spec, tok, None), 8, 0, 2, 0)
for _ in range(200):
    stream.next_batch()
print({anon})
"""

# The builder's peak *anonymous* RSS, sampled every 20 ms: reading the memory-mapped tokenized table while
# packing puts its file pages in RSS (VmHWM), page cache that is not the builder's memory.
BUILD = """
import sys, threading, time
sys.path.insert(0, {repo!r})
from bench.data import spec_for
from launcher.data import build_tokenizer, open_sources
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], {anon})
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
spec = spec_for(__import__("pathlib").Path({data!r}), __import__("pathlib").Path({cache!r}))
started = time.monotonic()
(source,) = open_sources(spec, build_tokenizer(spec), spec.data.sources)
assert source.built
print(time.monotonic() - started, peak[0])
"""


def serve_peak_rss(data: Path, cache: Path) -> int:
    code = SERVE.format(repo=str(REPO), data=str(data), cache=str(cache), anon=ANON)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.strip().splitlines()[-1])


def next_batch_s(data: Path, cache: Path, batches: int = 300) -> float:
    from launcher.data import TrainStream, build_tokenizer, collator, open_sources

    spec = spec_for(data, cache)
    tok = build_tokenizer(spec)
    stream = TrainStream(open_sources(spec, tok, spec.data.sources), collator(spec, tok, None), 8, 0, 2, 0)
    stream.next_batch()
    started = time.perf_counter()
    for _ in range(batches):
        stream.next_batch()
    return (time.perf_counter() - started) / batches


def quickstart_step_s(work: Path) -> float:
    out = work / "quickstart"
    subprocess.run([str(REPO / ".venv/bin/ftl"), "run", "configs/quickstart.yaml", f"output_dir={out}", "train.max_steps=80",
                    "train.log_every=10", "checkpoint.every=0", "hardware.device=cpu", "--no-resume"],
                   cwd=REPO, check=True, capture_output=True)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 20)
    tokens_per_step = 8 * 128 * 2
    return tokens_per_step / rates[len(rates) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=200, help="size of the generated corpus (the small one is a tenth)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftl-bench-data-") as tmp:
        work = Path(tmp)
        big, small = corpus(work / "big.jsonl", args.mb), corpus(work / "small.jsonl", args.mb / 10, seed=1)
        mb = big.stat().st_size / 2**20
        ftl_s, build_big = ftl_tokenize(big, work / "cache")
        hf_s = datasets_tokenize_s(big, work)
        print(f"(a) tokenize {mb:.0f} MB: FTL cache build {ftl_s:.1f} s ({mb / ftl_s:.1f} MB/s), datasets.map {hf_s:.1f} s ({mb / hf_s:.1f} MB/s)")
        _, build_small = ftl_tokenize(small, work / "cache")
        rss_big, rss_small = serve_peak_rss(big, work / "cache"), serve_peak_rss(small, work / "cache")
        print(f"(b) anonymous RSS after serving 200 micro-batches: {rss_big / 2**20:.0f} MiB ({mb:.0f} MB corpus) vs {rss_small / 2**20:.0f} MiB ({mb / 10:.0f} MB); "
              f"peak anonymous RSS of the process building the cache: {build_big / 2**20:.0f} MiB vs {build_small / 2**20:.0f} MiB")
        batch_s = next_batch_s(REPO / "configs/data/quickstart.jsonl", work / "cache")
        step_s = quickstart_step_s(work)
        print(f"(c) sampler + collate {batch_s * 1e3:.3f} ms per micro-batch; quickstart step {step_s * 1e3:.1f} ms (2 CPU ranks)")
        print(f"RESULT tokenize_vs_datasets={hf_s / ftl_s:.3f} rss_ratio_10x={rss_big / rss_small:.3f} overhead_pct={100 * batch_s / step_s:.3f} "
              f"build_rss_ratio_10x={build_big / build_small:.3f}")


if __name__ == "__main__":
    main()
