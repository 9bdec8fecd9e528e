"""Data-stage throughput and memory: ingest → clean → split on a large corpus, at two sizes.

Builds corpora by repeating and perturbing real documents (tinyshakespeare from ../shared/data and
the demo corpus under data/raw when present): every document is a random run of real lines with a
few words swapped, a share of them exact or near copies so that deduplication has work to do.  Then it
runs the three stages with near-dedup on, at a small and a large size, and prints MB/s and peak RSS
(this process plus its worker processes) for both, side by side, with their ratios: memory that stays
flat in corpus size shows as an RSS ratio near 1.

With ``--engine ray`` it runs each corpus through the local engine and through the Ray Data engine
(``cluster.data_engine: ray``, a Ray started here with ``--workers`` CPUs), side by side in one run:
documents/s and MB/s of each, the ratio ray/local (the cluster's overhead on one machine), whether
the outputs are identical, and a projection to more workers from the measured per-worker throughput,
Ray's fixed cost per run (from the two sizes).  No step over the data is serial: the tasks write the
datasets' shards, the decisions and the quarantine parts, and copy the parts into the quarantine;
the driver writes manifests.

    .venv/bin/python benchmarks/data_throughput.py [--mb 200] [--small-mb 50] [--workdir DIR]
    .venv/bin/python benchmarks/data_throughput.py --engine ray [--mb 50] [--small-mb 10] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
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


def bench_params(corpus: Path, work: Path, engine: str):
    from lmforge.params import Params, SourceParams, with_overrides

    params = Params()
    params.cluster.data_engine = engine
    params.paths.artifacts = str(work / "artifacts")
    params.ingest.sources = [SourceParams(name="bench", path=str(corpus))]
    params.clean = with_overrides(params.clean, {"validation": {"min_rows": 1}})
    return params


def run_stages(corpus: Path, work: Path, engine: str = "local") -> dict:
    from lmforge.clean import run_clean
    from lmforge.ingest import run_ingest
    from lmforge.split import run_split

    params = bench_params(corpus, work, engine)
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


def outputs(work: Path) -> dict:
    """What must be identical between the engines: quarantines, summaries, clean's rows, the split datasets."""
    import datasets

    artifacts = work / "artifacts"
    out = {}
    for stage in ("ingest", "clean", "split"):
        out[f"{stage}/summary"] = (artifacts / stage / "summary.json").read_bytes()
    for stage in ("ingest", "clean"):
        out[f"{stage}/quarantine"] = (artifacts / stage / "quarantine.jsonl").read_bytes()
    out["clean/dataset"] = datasets.load_from_disk(str(artifacts / "clean" / "dataset")).data.table  # the rows, over its shards
    for name in ("train", "val", "test"):
        out[f"split/{name}"] = datasets.load_from_disk(str(artifacts / "split" / name)).data.table
    return out


def same(a: dict, b: dict) -> list[str]:
    """Keys whose values differ."""
    return [k for k in a if not (a[k].equals(b[k]) if hasattr(a[k], "equals") else a[k] == b[k])]


def compare_engines(args, work: Path) -> None:
    """Local and Ray side by side on two corpus sizes, then a projection to more workers.

    Two sizes separate Ray's fixed cost per run (start-up, each shuffle's worker processes) from its
    cost per MB, which is what more workers divide."""
    import ray
    from ray.data import DataContext

    results: dict[tuple[str, str], dict] = {}
    differ: list[str] = []
    for label, mb in (("small", args.small_mb), ("large", args.mb)):
        corpus = work / f"corpus-{mb}mb"
        size = build_corpus(corpus, mb) / 1e6
        for engine in ("local", "ray"):
            if engine == "ray":  # a Ray of our own on this machine (never one already running); run_* reuse it
                ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
                DataContext.get_current().enable_progress_bars = False
            try:
                r = run_stages(corpus, work / f"{engine}-{mb}mb", engine)
            finally:
                if engine == "ray":
                    ray.shutdown()
            docs = r["ingest_summary"]["documents"]
            data = r["ingest"] + r["clean"]  # the stages the engine changes; split is the same code in both
            results[engine, label] = {**r, "mb": size, "docs": docs, "data_s": data}
            c = r["clean_summary"]
            print(
                f"{engine:>5} {label:>5}: {size:6.1f} MB, {docs:6d} documents: ingest {r['ingest']:6.1f} s, clean {r['clean']:6.1f} s "
                f"= {docs / data:6.0f} docs/s, {size / data:5.2f} MB/s (split {r['split']:.1f} s, same code); "
                f"peak RSS with workers {r['peak_rss_total_mb']:.0f} MB; kept {c['kept']} of {c['documents_in']}",
                flush=True,
            )
        differ += [f"{label}: {k}" for k in same(outputs(work / f"local-{mb}mb"), outputs(work / f"ray-{mb}mb"))]
        shutil.rmtree(corpus)
    local, on_ray = results["local", "large"], results["ray", "large"]
    print(
        f"ratio ray/local at {on_ray['mb']:.0f} MB ({args.workers} Ray workers vs {local_procs()} local processes): "
        f"throughput {local['data_s'] / on_ray['data_s']:.2f}x (documents/s and MB/s alike), "
        f"ingest {local['ingest'] / on_ray['ingest']:.2f}x, clean {local['clean'] / on_ray['clean']:.2f}x; "
        f"outputs {'identical at both sizes' if not differ else 'DIFFER: ' + ', '.join(differ)}"
    )
    # Ray's time = fixed + per MB, and the tasks do all the work per MB: more workers divide it
    small = results["ray", "small"]
    per_mb = (on_ray["data_s"] - small["data_s"]) / (on_ray["mb"] - small["mb"])
    fixed = max(on_ray["data_s"] - per_mb * on_ray["mb"], 0.0)
    per_worker = 1 / (max(per_mb, 1e-9) * args.workers)
    per_process = local["mb"] / local["data_s"] / local_procs()
    print(f"ray, measured here: {fixed:.0f} s fixed per run, then {1 / per_mb:.2f} MB/s: {per_worker:.2f} MB/s per worker, "
          f"{per_worker / per_process:.2f}x the local engine's {per_process:.2f} MB/s per process")
    for n in (2, 8, 32, 128, 512):
        rate = n * per_worker
        one_tb, ten_tb = ((fixed + mb / rate) / 3600 for mb in (1e6, 10e6))
        print(f"  {n:4d} workers -> ~{rate:6.1f} MB/s: 1 TB in ~{one_tb:,.1f} h, 10 TB in ~{ten_tb:,.0f} h ({ten_tb / 24:,.1f} days)")
    print("  linear: no step over the data runs on the driver; the shared storage's bandwidth and the shuffles' "
          "network traffic bound it first on a real cluster (not measurable on one machine)")
    compare_packing(args, work, on_ray["mb"])


def compare_packing(args, work: Path, mb: float) -> None:
    """``packed`` on both engines from the large corpus's split, with one tokenizer trained on it: the
    Ray engine's tasks write their own parts of the token files and copy them into place, so no
    serial step over the text or the tokens."""
    import ray
    from ray.data import DataContext

    from lmforge.vocabulary import run_pack, run_tokenizer

    local = bench_params(work, work / f"local-{args.mb}mb", "local")
    on_ray = bench_params(work, work / f"ray-{args.mb}mb", "ray")
    run_tokenizer(local)
    shutil.rmtree(on_ray.stage_dir("tokenizer"), ignore_errors=True)
    shutil.copytree(local.stage_dir("tokenizer"), on_ray.stage_dir("tokenizer"))
    seconds = {}
    for engine, params in (("local", local), ("ray", on_ray)):
        if engine == "ray":
            ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            DataContext.get_current().enable_progress_bars = False
        try:
            start = time.perf_counter()
            summary = run_pack(params)
            seconds[engine] = time.perf_counter() - start
        finally:
            if engine == "ray":
                ray.shutdown()
    files = [f.relative_to(local.stage_dir("packed")) for f in sorted(local.stage_dir("packed").rglob("*.bin"))]
    identical = all((local.stage_dir("packed") / f).read_bytes() == (on_ray.stage_dir("packed") / f).read_bytes() for f in files)
    print(
        f"packed ({summary['train_tokens'] + summary['val_tokens'] + summary['test_tokens']:,} tokens from {mb:.0f} MB): "
        f"local {seconds['local']:.1f} s, ray {seconds['ray']:.1f} s, ratio ray/local {seconds['local'] / seconds['ray']:.2f}x; "
        f"token files {'identical' if identical else 'DIFFER'}"
    )


def local_procs() -> int:
    from lmforge.artifacts import env_num_proc
    from lmforge.params import IngestParams

    return env_num_proc(IngestParams().num_proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: two corpus sizes on the local engine; ray: local vs Ray Data on one corpus")
    parser.add_argument("--mb", type=int, default=None, help="size of the large corpus in MB of JSONL (default 200; 50 with --engine ray)")
    parser.add_argument("--small-mb", type=int, default=None, help="size of the small corpus (default 50; 10 with --engine ray)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="--engine ray: CPUs of the Ray started here")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    args = parser.parse_args()
    args.mb = args.mb or (50 if args.engine == "ray" else 200)
    args.small_mb = args.small_mb or (10 if args.engine == "ray" else 50)
    import datasets

    datasets.disable_progress_bars()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    results = {}
    try:
        if args.engine == "ray":
            compare_engines(args, work)
            return
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
