"""The Ray Data engine (``cluster.data_engine: ray``): the local engine's ingest, clean and packed output,
byte for byte, computed on a real two-node Ray cluster; and its shuffle-side dedup pieces against the
local ones."""

import gzip
import json
import random
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
from conftest import prose, write_params

from lmforge.clean import run_clean
from lmforge.context import RunContext
from lmforge.dedup import cluster_representatives
from lmforge.ingest import run_ingest
from lmforge.params import LmforgeError, load_params
from lmforge.ray_data import _colliding_pairs, _first_of_each_text, clean_shards, clusters_from_pairs
from lmforge.split import SPLITS, run_split


def near_copy(text: str, changes: int = 1) -> str:
    words = text.split()
    for j in range(changes):
        words[(len(words) // 2 + 7 * j) % len(words)] = "changed"
    return " ".join(words)


def mixed_corpus(root: Path) -> tuple[Path, list[dict]]:
    """Several formats and files, two sources, planted exact and near duplicates (across files and
    within one), documents the filters reject, and inputs ingest quarantines."""
    raw = root / "raw"
    (raw / "sub").mkdir(parents=True)
    base, other = prose(1, 120), prose(2, 150)
    (raw / "a.txt").write_text(base)
    (raw / "b.txt").write_text(base)  # exact copy
    (raw / "c.md").write_text(f"<p>{base}</p>")  # the same text once the markup is gone
    (raw / "d.txt").write_text(near_copy(base))  # near copy: one word of 120
    (raw / "e.txt").write_text("short")  # too few words
    (raw / "f.txt").write_text("&lt;div&gt; x " + "#a " * 30)  # symbols
    lines = [json.dumps({"text": prose(20 + i, 90)}) for i in range(6)]
    lines += [json.dumps({"text": other}), "{oops", json.dumps({"text": near_copy(other)}), json.dumps({"text": prose(20, 90)})]
    (raw / "lines.jsonl").write_text("\n".join(lines) + "\n")
    gz = "\n".join(json.dumps({"text": near_copy(prose(30 + i, 100), 2)}) for i in range(3)) + "\n"
    (raw / "sub" / "more.jsonl.gz").write_bytes(gzip.compress(gz.encode()))
    (raw / "sub" / "page.html").write_text(f"<html><body><p>{prose(40, 80)}</p></body></html>")
    (raw / "binary.txt").write_bytes(bytes(range(256)))
    (raw / "table.docx").write_bytes(b"PK")
    for i in range(5):
        (raw / f"z{i}.txt").write_text(prose(10 + i, 120))
    saved = root / "saved"
    datasets.Dataset.from_dict({"content": [prose(50, 80), base, near_copy(prose(10, 120)), None]}).save_to_disk(str(saved))
    sources = [{"name": "raw"}, {"name": "disk", "type": "hf_disk", "path": str(saved), "text_field": "content"}]
    return raw, sources


@pytest.fixture(scope="module")
def quiet_ray_data():
    """Ray Data's progress bars off in the test process (the driver), back on afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    yield
    ctx.enable_progress_bars = before


@pytest.fixture(scope="module")
def ingested(ray_cluster, ray_driver, quiet_ray_data, tmp_path_factory) -> dict:
    """The mixed corpus ingested by each engine, once for the module."""
    root = tmp_path_factory.mktemp("ray_engines")
    raw, sources = mixed_corpus(root)
    runs = {}
    for engine in ("local", "ray"):
        messages: list[str] = []
        cluster = {"data_engine": engine, "address": ray_cluster}
        params = load_params(write_params(root / engine, raw, ingest={"sources": sources}, cluster=cluster))
        runs[engine] = {"summary": run_ingest(params, RunContext(log=messages.append)), "messages": messages, "raw": raw,
                        "sources": sources, "dir": params.stage_dir("ingest")}
    return runs


def stage_outputs(stage_dir: Path) -> dict:
    """What must be the same: the quarantine's bytes, the summary, and the dataset's rows in order (the
    Ray engine's tasks write it in several shards, the local engine in one file)."""
    return {
        "quarantine": (stage_dir / "quarantine.jsonl").read_bytes(),
        "summary": json.loads((stage_dir / "summary.json").read_text()),
        "dataset": datasets.load_from_disk(str(stage_dir / "dataset")).data.table,
    }


def shard_count(stage_dir: Path) -> int:
    return len(json.loads((stage_dir / "dataset" / "state.json").read_text())["_data_files"])


@pytest.mark.slow
def test_ray_ingest_reads_on_both_nodes_and_matches_local(ingested):
    local, ray = ingested["local"], ingested["ray"]
    assert ray["summary"] == local["summary"]
    assert ray["summary"]["by_reason"] == {"binary_content": 1, "malformed_json": 1, "missing_text_field": 1, "unsupported_format": 1}
    a, b = stage_outputs(local["dir"]), stage_outputs(ray["dir"])
    assert b["quarantine"] == a["quarantine"] and b["summary"] == a["summary"] and b["dataset"].equals(a["dataset"])
    assert shard_count(ray["dir"]) > 1 and shard_count(local["dir"]) == 1  # the tasks wrote their own shards
    assert any("ray: ingest read 17 items on 2 node(s)" in m for m in ray["messages"]), ray["messages"]


@pytest.mark.slow
@pytest.mark.parametrize("near", ["remove", "cluster"])
def test_ray_clean_and_split_match_local(ingested, ray_cluster, tmp_path: Path, near: str):
    results = {}
    for engine in ("local", "ray"):
        # each engine cleans its own ingest output, in an artifacts directory of its own
        params = load_params(write_params(
            tmp_path / engine, ingested[engine]["raw"], ingest={"sources": ingested[engine]["sources"]},
            clean={"dedup": {"near": near}}, cluster={"data_engine": engine, "address": ray_cluster},
        ))
        shutil.copytree(ingested[engine]["dir"], params.stage_dir("ingest"))
        messages: list[str] = []
        summary = run_clean(params, RunContext(log=messages.append))
        assert summary["documents_in"] == summary["kept"] + summary["quarantined"]
        run_split(params)
        results[engine] = {
            "clean": stage_outputs(params.stage_dir("clean")),
            "shards": shard_count(params.stage_dir("clean")),
            "split": {name: datasets.load_from_disk(str(params.stage_dir("split") / name)).data.table for name in SPLITS},
            "split_summary": json.loads((params.stage_dir("split") / "summary.json").read_text()),
            "messages": messages,
        }
    local, ray = results["local"], results["ray"]
    # the planted duplicates were found: the comparison below is not between two empty results
    summary = local["clean"]["summary"]
    assert summary["by_reason"]["exact_duplicate"] == 4 and summary["by_reason"]["too_few_words"] == 1
    if near == "remove":
        assert summary["by_reason"]["near_duplicate"] == 3
    else:
        assert "near_duplicate" not in summary["by_reason"] and summary["near_duplicate_clusters"] == 3
    assert ray["clean"]["quarantine"] == local["clean"]["quarantine"] and ray["clean"]["summary"] == local["clean"]["summary"]
    assert ray["clean"]["dataset"].equals(local["clean"]["dataset"])  # same columns, rows, order and values, over the shards in order
    assert ray["shards"] > 1 and local["shards"] == 1
    assert ray["split_summary"] == local["split_summary"]
    for name in SPLITS:
        assert ray["split"][name].equals(local["split"][name]), name
    assert any("ray: clean scored" in m and "on 2 node(s)" in m for m in ray["messages"]), ray["messages"]


@pytest.mark.slow
def test_ray_packed_matches_local_byte_for_byte(ingested, ray_cluster, tmp_path: Path):
    """Tokenizing in Ray tasks, each writing its own part of a split's token file, which tasks then copy
    into the file at their offsets: the local engine's token files, meta.json and summary, from the
    same split and tokenizer, and no part left behind."""
    from lmforge.vocabulary import run_pack, run_tokenizer

    runs = {}
    for engine in ("local", "ray"):
        params = load_params(write_params(
            tmp_path / engine, ingested["local"]["raw"], ingest={"sources": ingested["local"]["sources"]},
            cluster={"data_engine": engine, "address": ray_cluster},
        ))
        if engine == "local":
            shutil.copytree(ingested["local"]["dir"], params.stage_dir("ingest"))
            run_clean(params)
            run_split(params)
            run_tokenizer(params)
            built = params
        else:
            for stage in ("split", "tokenizer"):
                shutil.copytree(built.stage_dir(stage), params.stage_dir(stage))
        messages: list[str] = []
        summary = run_pack(params, RunContext(log=messages.append))
        packed = params.stage_dir("packed")
        files = {str(f.relative_to(packed)): f.read_bytes() for f in sorted(packed.rglob("*")) if f.is_file() and f.name != "params.json"}
        runs[engine] = {"summary": summary, "files": files, "messages": messages}
    local, ray = runs["local"], runs["ray"]
    assert local["summary"]["train_tokens"] > 1000 and local["summary"]["val_documents"] > 0  # something to compare
    assert set(ray["files"]) == set(local["files"]) == {"summary.json", "trained/meta.json", "trained/train.bin", "trained/val.bin", "trained/test.bin"}
    for name in local["files"]:
        assert ray["files"][name] == local["files"][name], name
    assert ray["summary"] == local["summary"]
    tokenized = [m for m in ray["messages"] if m.startswith("ray: packed train tokenized in")]
    assert tokenized and "on 2 node(s)" in tokenized[0] and " 1 tasks" not in tokenized[0], ray["messages"]
    assert "written in place by tasks" in tokenized[0]


@pytest.mark.slow
def test_ray_draws_the_local_tokenizer_sample_and_trains_the_same_vocabulary(ingested, ray_cluster, tmp_path: Path):
    """tokenizer.sample_documents: the tasks send their candidates for the seeded sample, the driver keeps
    the smallest keys; the vocabulary trained on it is the local engine's, byte for byte."""
    from lmforge.vocabulary import run_tokenizer

    runs = {}
    for engine in ("local", "ray"):
        params = load_params(write_params(
            tmp_path / engine, ingested["local"]["raw"], ingest={"sources": ingested["local"]["sources"]},
            tokenizer={"sample_documents": 6, "sample_seed": 3}, cluster={"data_engine": engine, "address": ray_cluster},
        ))
        if engine == "local":
            shutil.copytree(ingested["local"]["dir"], params.stage_dir("ingest"))
            run_clean(params)
            run_split(params)
            built = params
        else:
            shutil.copytree(built.stage_dir("split"), params.stage_dir("split"))
        messages: list[str] = []
        summary = run_tokenizer(params, RunContext(log=messages.append))
        runs[engine] = {"summary": {k: v for k, v in summary.items() if k != "training_seconds"}, "messages": messages,
                        "vocabulary": (params.stage_dir("tokenizer") / "hf" / "tokenizer.json").read_bytes()}
    local, ray = runs["local"], runs["ray"]
    assert local["summary"]["training_documents"] == 6 < json.loads((built.stage_dir("split") / "summary.json").read_text())["train"]
    assert ray["vocabulary"] == local["vocabulary"] and ray["summary"] == local["summary"]
    sampled = [m for m in ray["messages"] if m.startswith("ray: tokenizer sampled 6 of")]
    assert sampled and "on 2 node(s)" in sampled[0], ray["messages"]


def test_the_tokenizer_sample_is_seeded_and_does_not_depend_on_row_order():
    from lmforge.vocabulary import sample_keys

    ids = [f"doc{i}" for i in range(200)]
    keys = dict(zip(ids, sample_keys(ids, seed=0).tolist()))
    shuffled = random.Random(0).sample(ids, len(ids))
    assert dict(zip(shuffled, sample_keys(shuffled, seed=0).tolist())) == keys  # a key per id, wherever the row is read
    smallest = set(sorted(ids, key=keys.get)[:20])
    assert smallest != set(sorted(ids, key=dict(zip(ids, sample_keys(ids, seed=1).tolist())).get)[:20])  # another seed, another sample


@pytest.mark.slow
def test_a_killed_task_is_retried_and_nothing_is_lost_or_doubled(ingested, ray_cluster, tmp_path: Path):
    """The worker process of one scoring task dies mid-task, as on a lost node: Ray runs the task again,
    and the shards and quarantine the tasks write are the ones of a run where nothing died."""
    import os
    from dataclasses import asdict

    from lmforge.clean import _score_batch, _scored_features, features, route
    from lmforge.cluster import connected
    from lmforge.params import ClusterParams, DedupParams

    marker = str(tmp_path / "died")

    def dies_once(batch, **kwargs):  # a closure: Ray ships it by value to the workers
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # the first call anywhere, and only it
        except FileExistsError:
            return _score_batch(batch, **kwargs)
        os._exit(1)

    def clean(score, name: str) -> tuple:
        params = load_params(write_params(tmp_path / "params", ingested["local"]["raw"]))
        out = tmp_path / name
        out.mkdir()
        clean_shards(ingested["local"]["dir"] / "dataset", score, {"params_blob": asdict(params.clean)}, _scored_features().arrow_schema,
                     DedupParams(near="remove"), route, features(), out / "dataset", out / "quarantine.jsonl")
        return datasets.load_from_disk(str(out / "dataset")).data.table, (out / "quarantine.jsonl").read_bytes()

    with connected(ClusterParams(data_engine="ray", address=ray_cluster)):
        survived, quarantine = clean(dies_once, "survived")
        assert os.path.exists(marker)  # a worker did die
        assert (survived, quarantine) == clean(_score_batch, "undisturbed")
    assert survived.num_rows + quarantine.count(b"\n") == ingested["local"]["summary"]["documents"]
    assert len(set(survived["id"].to_pylist())) == survived.num_rows


def test_shuffled_band_collisions_give_the_local_clusters():
    """Band collisions found partition by partition (rows in any order, as a hash shuffle leaves them)
    and joined by connected components over the pairs alone: the local engine's clusters."""
    rng = np.random.default_rng(0)
    n, bands = 400, 4
    keys = rng.integers(0, 300, size=(n, bands)).astype(np.uint64)  # many collisions, chained clusters
    table = pa.table({
        "band": np.tile(np.arange(bands, dtype=np.int32), n),
        "hash": keys.ravel(),
        "row": np.repeat(np.arange(n, dtype=np.int64), bands),
    })
    partition = (table["hash"].to_numpy() * np.uint64(31) + table["band"].to_numpy().astype(np.uint64)) % np.uint64(3)
    pairs = []
    for p in range(3):
        part = table.filter(pa.array(partition == p))
        pairs.append(_colliding_pairs(part.take(rng.permutation(part.num_rows))))
    pairs = pa.concat_tables(pairs)
    members, leaders = clusters_from_pairs(pairs["row"].to_numpy(), pairs["first"].to_numpy())
    representative = np.arange(n)
    representative[members] = leaders
    assert representative.tolist() == cluster_representatives(keys).tolist()
    assert len(members) > 50  # the test has clusters to find


def test_the_first_copy_of_a_text_in_corpus_order_wins():
    rows = list(range(8))
    random.Random(1).shuffle(rows)
    texts = {0: "a", 1: "b", 2: "a", 3: "c", 4: "b", 5: "a", 6: "d", 7: "c"}
    block = pa.table({"row": rows, "id": [f"id{r}" for r in rows], "text_key": [texts[r] for r in rows], "part": [0] * 8})
    out = {r["row"]: r["first_id"] for r in _first_of_each_text(block).to_pylist()}
    assert out == {0: None, 1: None, 2: "id0", 3: None, 4: "id1", 5: "id0", 6: None, 7: "id3"}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_an_empty_corpus_and_an_empty_clean_dataset_are_clear_errors_on_both_engines(ray_cluster, ray_driver, quiet_ray_data, tmp_path: Path, engine: str):
    """Nothing to ingest, or nothing that survives cleaning: a clear error, never a crash inside
    ``datasets``; the records that say why are written before it.  (In a run, the blocking check
    clean/min_rows stops an empty clean dataset before split: tests/dagster_project/test_cli.py.)"""
    cluster = {"data_engine": engine, "address": ray_cluster}
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "empty.txt").write_bytes(b"")  # quarantined by ingest: no document left
    params = load_params(write_params(tmp_path / "none", raw, cluster=cluster))
    with pytest.raises(LmforgeError, match=r"ingest: no documents: 1 files read, 0 filtered out by ingest.sources, "
                                           r"1 quarantined \{'empty_file': 1\} \(see .*ingest/quarantine.jsonl\)"):
        run_ingest(params)
    assert json.loads((params.stage_dir("ingest") / "quarantine.jsonl").read_text())["reason"] == "empty_file"
    with pytest.raises(LmforgeError, match="clean: the ingest dataset has no documents"):
        run_clean(params)

    (raw / "short.txt").write_text("too short")  # ingested, then rejected by every filter setting
    params = load_params(write_params(tmp_path / "short", raw, cluster=cluster))
    assert run_ingest(params)["documents"] == 1
    assert run_clean(params)["by_reason"] == {"too_few_words": 1}
    with pytest.raises(LmforgeError, match="split: the clean dataset has no documents"):
        run_split(params)
