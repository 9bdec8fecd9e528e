"""Stage ``export``: the champion as GGUF files that llama.cpp and Ollama load, and as ONNX models that
ONNX Runtime runs, each read back and scored.

Why GGUF, and why llama.cpp's own converter: a user who serves a small model on a CPU picks llama.cpp
(or Ollama, which wraps it), and it reads GGUF.  The converter that llama.cpp ships
(``convert_hf_to_gguf.py``) knows every architecture's tensor layout, its tokenizer types and its
metadata keys; a hand-written writer would have to track all of that.  It is not on the package index
as a wheel, but the source distribution of ``llama-cpp-python`` vendors it with the ``gguf`` package it
was released with: ``lmforge fetch-converter`` (make runs it) downloads that sdist with
``pip download --no-deps --no-binary``, checks it against the sha256 pinned here and extracts the
converter only (nothing is built).  ``lmforge.gguf_convert`` runs it in its own process, forked from
the stage's (``models.forking``).

For each precision of ``export.onnx``, ONNX Runtime GenAI's model builder writes an ONNX model
(``models.onnx_genai``): what ``lmforge serve --engine onnx`` decodes with, ~8× faster than PyTorch
for one stream on a CPU.

Each file is read back (GGUF by ``transformers``, which dequantizes it; ONNX by ONNX Runtime) and
scored on the test blocks ``evaluate`` uses, beside the champion itself: the blocking check holds its
perplexity within ``export.max_perplexity_increase[kind]`` (``q8_0``, ``onnx_int8``...).  Files within
it are logged to an MLflow run and tagged, with their sha256, on the registry version ``register``
made of the champion (``gguf_<type>_sha256``, ``gguf_<type>_uri``, ``onnx_<precision>_sha256``...).

Outputs ``<artifacts>/export/``: ``gguf/<champion>.<TYPE>.gguf`` per type, ``onnx/<precision>/`` per
ONNX model, ``params.json`` and ``summary.json``.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge import gguf_convert
from lmforge.artifacts import fresh_dir, read_summary, write_params, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.fetch import check_hash, download_sdist, sha256_file
from lmforge.finetune import champion
from lmforge.params import REPO_ROOT, LmforgeError, Params
from lmforge.stages import Stage
from lmforge.tracking import tracked_run
from models import onnx_genai
from models.checksums import weights_sha256
from models.forking import run_module


EXPORT = Stage(
    "export", group="deploy",
    params=("export", "registry", "evaluate.batch_size", "evaluate.max_blocks"),
    reads=("register/summary.json", "select/summary.json", "packed"),
    files=("tools/llama.cpp",),
    outs=("gguf",),
    note="GGUF files of the champion, read back and scored (the registry version gets their sha256)",
)


CONVERTER_PACKAGE = "llama-cpp-python==0.3.36"
#: sha256 of llama_cpp_python-0.3.36.tar.gz, as PyPI publishes it.
CONVERTER_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: Where llama.cpp sits in that sdist, and what of it the converter needs.
CONVERTER_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
CONVERTER = f"llama.cpp's convert_hf_to_gguf.py from {CONVERTER_PACKAGE}"
STAMP = ".fetched"


def fetch_converter(dest: Path, progress: Callable[[str], object] = print) -> Path:
    """llama.cpp's converter in ``dest`` (``export.converter_dir``), fetched when it is missing or came
    from another sdist.  Extracted to a temporary folder and moved into place once complete."""
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text().strip() == CONVERTER_SDIST_SHA256:
        return dest
    progress(f"fetching {CONVERTER_PACKAGE}'s source (llama.cpp's GGUF converter, MIT; ~77 MB) from the package index")
    with tempfile.TemporaryDirectory(prefix="lmforge-converter-") as tmp:
        sdist = download_sdist(Path(tmp), CONVERTER_PACKAGE)
        check_hash(sdist, sha256_file(sdist), CONVERTER_SDIST_SHA256)
        staging = Path(tmp) / "converter"
        with tarfile.open(sdist) as tar:
            wanted = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(CONVERTER_PREFIX)
                      and m.name[len(CONVERTER_PREFIX):].startswith(CONVERTER_MEMBERS)]
            if not any(m.name == CONVERTER_PREFIX + "convert_hf_to_gguf.py" for m in wanted):
                raise LmforgeError(f"{sdist.name} holds no {CONVERTER_PREFIX}convert_hf_to_gguf.py: the pins in lmforge/export.py do not match")
            for member in wanted:
                member.name = member.name[len(CONVERTER_PREFIX):]
            tar.extractall(staging, members=wanted, filter="data")
        (staging / STAMP).write_text(CONVERTER_SDIST_SHA256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    progress(f"wrote llama.cpp's converter to {dest}")
    return dest


def convert(converter: Path, model_dir: Path, out: Path, kind: str) -> None:
    """Write ``model_dir`` (a Hugging Face directory) as a GGUF file of type ``kind`` (``lmforge.gguf_convert``)."""
    if not (converter / STAMP).is_file():
        raise LmforgeError(f"llama.cpp's converter is not in {converter}: run `lmforge fetch-converter` (make does)")
    result = run_module(gguf_convert.__name__, [str(converter), str(model_dir), str(out), kind], cwd=REPO_ROOT)
    if result.returncode != 0:
        out.unlink(missing_ok=True)
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise LmforgeError(f"llama.cpp's converter refused {model_dir}: {lines[-1] if lines else f'exit status {result.returncode}'}")


#: Config entries that name or place a model rather than define what it computes.
_NOT_THE_MODEL = {"_name_or_path", "_model_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version",
                  "quantization_config", "use_cache", "pad_token_id", "output_attentions", "output_hidden_states"}


def config_differences(source, read_back) -> dict[str, tuple[Any, Any]]:
    """What the GGUF file's model computes differently from the source: config entries both define and
    that differ (floats up to float32 rounding, which GGUF stores them in).  A Llama with a GELU MLP,
    for one, reads back with llama.cpp's SiLU: the converter writes no activation for that architecture."""
    a, b = source.to_dict(), read_back.to_dict()
    differ = {}
    for key in sorted((set(a) & set(b)) - _NOT_THE_MODEL):
        x, y = a[key], b[key]
        same = abs(x - y) <= 1e-6 * max(abs(x), abs(y)) if isinstance(x, float) and isinstance(y, (int, float)) else x == y
        if not same and x is not None and y is not None:
            differ[key] = (x, y)
    return differ


def run_export(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Export the champion to each GGUF type, read each file back, score it beside the champion, log and tag it."""
    from lmforge.compress import _scorer
    from models.generation import load
    from models.loading import load_gguf

    say = ctx.log
    name, source, parent = champion(params)
    registered = read_summary(params.stage_dir("register"))
    if registered.get("candidate") != name:
        raise LmforgeError(f"export: the champion is '{name}', but register last registered '{registered.get('candidate')}': re-run register")
    out = params.stage_dir("export")
    fresh_dir(out / "gguf")
    fresh_dir(out / "onnx")
    scores, _ = _scorer(params, source)
    reference, _, _ = load(source, device="cpu")
    base, reference_config = scores(reference).perplexity, reference.config
    del reference
    converter = params.path(params.export.converter_dir)
    files: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"champion": name, "converter": CONVERTER, "reference_perplexity": base, "files": files,
                               "registered_model": params.registry.name, "version": registered["candidate_version"]}

    def check(kind: str, path: Path, model, seconds: float) -> None:
        """Score what was read back beside the champion, and record it."""
        perplexity = scores(model).perplexity
        increase = perplexity / base - 1
        tolerance = params.export.max_perplexity_increase[kind]
        size, sha256 = ((sum(f.stat().st_size for f in path.rglob("*") if f.is_file()), weights_sha256(path)) if path.is_dir()
                        else (path.stat().st_size, sha256_file(path)))
        files[kind] = {"file": str(path.relative_to(out)), "bytes": size, "sha256": sha256, "perplexity": perplexity,
                       "perplexity_increase": increase, "max_perplexity_increase": tolerance, "within": increase <= tolerance,
                       "convert_seconds": seconds}
        say(f"export {kind}: {path.relative_to(out)} ({size / 1e6:.0f} MB), read back: perplexity {perplexity:.2f} "
            f"({increase:+.2%}; at most {tolerance:+.0%})")

    for kind in params.export.types:
        path = out / "gguf" / f"{name}.{kind.upper()}.gguf"
        started = time.perf_counter()
        try:
            convert(converter, source, path, kind)
        except LmforgeError as exc:
            summary["unsupported"] = str(exc)
            say(f"export: {exc}")
            break
        seconds = time.perf_counter() - started
        model = load_gguf(path)
        differ = config_differences(reference_config, model.config)
        if differ:
            path.unlink()
            summary["unsupported"] = ("the GGUF file reads back as another model (" + ", ".join(f"{k}: {a} → {b}" for k, (a, b) in differ.items())
                                      + "): llama.cpp's architecture cannot express this one")
            say(f"export: {summary['unsupported']}")
            break
        check(kind, path, model, seconds)
    for precision in params.export.onnx:
        path = out / "onnx" / precision
        started = time.perf_counter()
        try:
            onnx_genai.build(source, path, precision)
            check(f"onnx_{precision}", path, onnx_genai.OnnxCausalLM(path), time.perf_counter() - started)
        except Exception as exc:  # the builder or the runtime refuses this model (e.g. heads of fewer than 16 dimensions)
            shutil.rmtree(path, ignore_errors=True)
            summary["unsupported"] = f"ONNX {precision}: {str(exc).strip()}"
            say(f"export: {summary['unsupported']}")
            break
    summary["passed"] = bool(files) and "unsupported" not in summary and all(f["within"] for f in files.values())
    with tracked_run(params, "export", {"stage": "export", "champion": name, **ctx.tags()}, parent_run_id=parent) as (client, run_id):
        for kind, row in files.items():
            for key in ("bytes", "perplexity", "perplexity_increase", "convert_seconds"):
                client.log_metric(run_id, f"{kind}_{key}", row[key])
            if row["within"]:
                path = out / row["file"]
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), row["file"])
                else:
                    client.log_artifact(run_id, str(path), str(Path(row["file"]).parent))
                row["uri"] = f"runs:/{run_id}/{row['file']}"
                tag = kind if kind.startswith("onnx_") else f"gguf_{kind}"
                for key in ("sha256", "uri", "perplexity_increase"):
                    client.set_model_version_tag(params.registry.name, registered["candidate_version"], f"{tag}_{key}", str(row[key]))
    summary["mlflow_run_id"] = run_id
    write_params(out, params.export)
    write_summary(out, summary)
    return summary


def describe(summary: dict[str, Any]) -> str:
    """One line per stage summary: the files and how they read back."""
    if summary.get("unsupported"):
        return f"not exported: {summary['unsupported']}"
    return " · ".join(f"{k} {f['bytes'] / 1e6:.0f} MB, perplexity {f['perplexity_increase']:+.2%}" + ("" if f["within"] else " (beyond tolerance)")
                      for k, f in summary["files"].items()) + f" → models:/{summary['registered_model']}/{summary['version']}"

