"""Data-stage throughput and memory: ingest → clean → split on a large corpus, at two sizes.

Builds corpora by repeating and perturbing real documents (tinyshakespeare from ../shared/data and
the demo corpus under data/raw when present): every document is a random run of real lines with a
few words swapped, a share of them exact or near copies so that deduplication has work to do.  Then it
runs the three stages with near-dedup on, at a small and a large size, and prints MB/s and peak RSS
(this process plus its worker processes) for both, side by side, with their ratios: memory that stays
flat in corpus size shows as an RSS ratio near 1.

    .venv/bin/python benchmarks/data_throughput.py [--mb 200] [--small-mb 50] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def source_lines() -> list[str]:
    if not SHAKESPEARE.exists():
        sys.exit(f"{SHAKESPEARE} not found: this benchmark needs ../shared/data (see its README)")
    lines = [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()]
    raw = REPO / "data" / "raw"
    for path in sorted(raw.rglob("*.txt")) + sorted(raw.rglob("*.md")) + sorted(raw.rglob("*.rst")):
        lines += [line for line in path.read_text(errors="replace").splitlines() if len(line.split()) > 3]
    return lines


def build_corpus(target: Path, megabytes: int, seed: int = 0) -> int:
    """JSONL shards of ~10 MB: 85% fresh documents, 10% near copies, 5% exact copies."""
    rng = random.Random(seed)
    lines = source_lines()
    vocab = sorted({w for line in lines[:5000] for w in line.split()})
    target.mkdir(parents=True)
    written, shard, recent = 0, 0, []
    budget = megabytes * 1_000_000
    while written < budget:
        with open(target / f"shard{shard:04d}.jsonl", "w") as fh:
            size = 0
            while size < 10_000_000 and written + size < budget:
                roll = rng.random()
                if roll < 0.05 and recent:
                    text = rng.choice(recent)
                elif roll < 0.15 and recent:
                    words = rng.choice(recent).split(" ")
                    for _ in range(max(1, len(words) // 50)):
                        words[rng.randrange(len(words))] = rng.choice(vocab)
                    text = " ".join(words)
                else:
                    start = rng.randrange(len(lines) - 80)
                    words = "\n".join(lines[start : start + rng.randint(20, 80)]).split(" ")
                    for _ in range(max(1, len(words) // 20)):
                        words[rng.randrange(len(words))] = rng.choice(vocab)
                    text = " ".join(words)
                    recent = (recent + [text])[-200:]
                line = json.dumps({"text": text}) + "\n"
                fh.write(line)
                size += len(line.encode())
        written += size
        shard += 1
    return written


class PeakRss:
    """Samples the resident memory of this process and its children every 50 ms.

    ``private`` excludes shared file-backed pages: Arrow datasets are memory-mapped, so pages of the
    files being read count in RSS although the kernel can drop them at any time.
    """

    def __init__(self) -> None:
        self.peak_main = self.peak_total = self.peak_private = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                infos = [me.memory_info()] + [c.memory_info() for c in me.children(recursive=True)]
            except psutil.Error:
                continue
            self.peak_main = max(self.peak_main, infos[0].rss)
            self.peak_total = max(self.peak_total, sum(i.rss for i in infos))
            self.peak_private = max(self.peak_private, sum(i.rss - i.shared for i in infos))
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_stages(corpus: Path, work: Path) -> dict:
    from lmforge.clean import run_clean
    from lmforge.ingest import run_ingest
    from lmforge.params import Params, SourceParams, with_overrides
    from lmforge.split import run_split

    params = Params()
    params.paths.artifacts = str(work / "artifacts")
    params.ingest.sources = [SourceParams(name="bench", path=str(corpus))]
    params.clean = with_overrides(params.clean, {"validation": {"min_rows": 1}})
    timings = {}
    with PeakRss() as rss:
        for name, stage in (("ingest", run_ingest), ("clean", run_clean), ("split", run_split)):
            start = time.perf_counter()
            summary = stage(params)
            timings[name] = time.perf_counter() - start
            timings[f"{name}_summary"] = summary
    timings["peak_rss_main_mb"] = rss.peak_main / 1e6
    timings["peak_rss_total_mb"] = rss.peak_total / 1e6
    timings["peak_private_mb"] = rss.peak_private / 1e6
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the large corpus (MB of JSONL)")
    parser.add_argument("--small-mb", type=int, default=50, help="size of the small corpus")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    results = {}
    try:
        for label, mb in (("small", args.small_mb), ("large", args.mb)):
            corpus = work / f"corpus-{mb}mb"
            size = build_corpus(corpus, mb)
            r = run_stages(corpus, work / f"run-{mb}mb")
            total = r["ingest"] + r["clean"] + r["split"]
            results[label] = {**r, "mb": size / 1e6, "seconds": total, "mb_per_s": size / 1e6 / total}
            c = r["clean_summary"]
            print(
                f"{label:>5}: {size / 1e6:7.1f} MB in {total:6.1f} s = {size / 1e6 / total:5.2f} MB/s "
                f"(ingest {r['ingest']:.1f} s, clean {r['clean']:.1f} s, split {r['split']:.1f} s); "
                f"peak RSS main {r['peak_rss_main_mb']:.0f} MB, with workers {r['peak_rss_total_mb']:.0f} MB "
                f"(private {r['peak_private_mb']:.0f} MB); "
                f"kept {c['kept']} of {c['documents_in']} ({c['by_reason']})",
                flush=True,
            )
            shutil.rmtree(corpus)
        small, large = results["small"], results["large"]
        print(
            f"ratio large/small: size {large['mb'] / small['mb']:.2f}x, throughput {large['mb_per_s'] / small['mb_per_s']:.2f}x, "
            f"peak RSS main {large['peak_rss_main_mb'] / small['peak_rss_main_mb']:.2f}x, "
            f"with workers {large['peak_rss_total_mb'] / small['peak_rss_total_mb']:.2f}x, "
            f"private {large['peak_private_mb'] / small['peak_private_mb']:.2f}x"
        )
        print(f"goal: >= 5 MB/s end to end -> {'met' if large['mb_per_s'] >= 5 else 'NOT met'} ({large['mb_per_s']:.2f} MB/s); "
              f"peak RSS < 2 GB -> {'met' if large['peak_rss_total_mb'] < 2000 else 'NOT met'}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
