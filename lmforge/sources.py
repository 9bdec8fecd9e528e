"""Existing models as candidates: where a ``source`` of ``pretrain.candidates`` points, and how it
becomes a safe, local Hugging Face directory (stage ``base_models``).

A source is one of:

- a **GGUF file** (``*.gguf``, e.g. the SmolLM2-135M-Instruct of the demo): ``transformers`` reads it
  and dequantizes the weights, which takes a minute for 135 M parameters on 2 cores, so it is done
  once here and cached as safetensors: every later stage loads the directory in seconds;
- a **local Hugging Face directory** (``config.json``, weights, tokenizer files): linked as is;
- a **hub id** (``org/name``): downloaded into the Hugging Face cache where there is network, read
  from that cache with ``HF_HUB_OFFLINE=1`` (tests use a local copy laid out as the cache).

Safety of loading: weights come from safetensors or GGUF only.  Pickled weights (``.bin``, ``.pt``,
``.pth``, ``.ckpt``) can execute code when unpickled, so a source that has nothing else is refused
unless the candidate sets ``allow_pickle: true`` (it is then converted to safetensors once, here);
a model's own Python code runs only with ``trust_remote_code: true``.  The source, its sha256 and
its licence are recorded in ``source.json`` and become tags of every MLflow run that descends from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge.params import CandidateParams, LmforgeError, Params

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Files of a model directory that are neither weights nor needed to load it (README keeps the card).
_MODEL_FILES = re.compile(r"^(config\.json|generation_config\.json|.*\.safetensors|.*\.safetensors\.index\.json|"
                          r"tokenizer.*|special_tokens_map\.json|vocab\.(json|txt)|merges\.txt|.*\.model|chat_template\.(jinja|json)|README\.md)$")


@dataclass(frozen=True)
class Source:
    """A candidate's source, resolved: what kind it is, where, and under which settings it loads."""

    kind: str  # gguf | hf_dir | hub
    location: str  # an absolute path, or the hub id
    slug: str  # its directory name under <artifacts>/base_models (and the name of its tokenizer)
    written: str  # as params.yaml writes it (a path relative to the repository, or the hub id): what records keep
    revision: str | None = None
    sha256: str | None = None  # pinned by the user
    licence: str | None = None  # declared by the user
    allow_pickle: bool = False
    trust_remote_code: bool = False


def resolve_source(params: Params, candidate: CandidateParams) -> Source:
    """The ``Source`` a candidate names, or a one-line error saying what a source may be."""
    text = candidate.source or ""
    path = params.path(text)
    common = dict(written=text, revision=candidate.revision, sha256=candidate.sha256, licence=candidate.licence,
                  allow_pickle=candidate.allow_pickle, trust_remote_code=candidate.trust_remote_code)
    if text.endswith(".gguf"):
        if not path.is_file():
            hint = " (the demo's: make demo fetches it, or `lmforge fetch-pretrained`)" if "SmolLM2" in text else ""
            raise LmforgeError(f"candidate '{candidate.name}': GGUF file {path} not found{hint}")
        return Source("gguf", str(path), path.stem, **common)
    if path.is_dir():
        return Source("hf_dir", str(path), path.name, **common)
    if HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        slug = text.replace("/", "--") + (f"@{candidate.revision}" if candidate.revision else "")
        return Source("hub", text, slug, **common)
    raise LmforgeError(f"candidate '{candidate.name}': source '{text}' is not a .gguf file, a model directory or a hub id (org/name)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(directory: Path) -> str:
    """One hash of a model directory: the names and contents of the files that define the model."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and _MODEL_FILES.match(p.name) and p.name != "README.md"):
        h.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


def _hub_snapshot(source: Source) -> Path:
    """The hub model's files in the local Hugging Face cache, downloaded first where there is network."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]
    if source.allow_pickle:
        patterns += [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    try:
        return Path(snapshot_download(source.location, revision=source.revision, allow_patterns=patterns))
    except Exception as exc:  # offline and not cached, unknown id, no access: several exception types
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else str(exc).splitlines()[0]
        raise LmforgeError(f"hub model '{source.location}': {why}; download it where there is network, or name a local directory") from None


def _check_weights(directory: Path, source: Source) -> bool:
    """True if the directory's weights are safetensors; pickled weights only with ``allow_pickle``."""
    if any(directory.glob("*.safetensors")):
        return True
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise LmforgeError(f"{source.location}: no weights (*.safetensors) found")
    if not source.allow_pickle:
        raise LmforgeError(f"{source.location}: weights only as pickle ({', '.join(pickled)}), which can run code when loaded; "
                           "convert them to safetensors, or set allow_pickle: true on the candidate if you trust the source")
    return False


def _licence_of(directory: Path | None, gguf: Path | None) -> str | None:
    """The licence the model declares: ``license:`` in its model card, or GGUF's ``general.license``."""
    if gguf is not None:
        from gguf import GGUFReader

        field = GGUFReader(gguf).fields.get("general.license")
        return bytes(field.parts[field.data[0]]).decode().lower() if field is not None else None
    card = directory / "README.md" if directory else None
    if card and card.is_file():
        match = re.search(r"^license:\s*([\w.-]+)\s*$", card.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0], re.M)
        return match.group(1).lower() if match else None
    return None


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (no extra disk for big weights) where the file system allows, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _load_causal(location: str, source: Source, gguf_file: str | None = None, **model_kwargs):
    from transformers import AutoTokenizer

    from models.loading import gguf_options, gguf_parsed_once, load_model

    if gguf_file is not None:
        model_kwargs.update(gguf_options(gguf_file))
    try:
        with gguf_parsed_once():  # the config, the tokenizer and the weights read the same GGUF metadata
            model = load_model(location, "causal", trust_remote_code=source.trust_remote_code, **model_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=source.trust_remote_code, gguf_file=gguf_file)
    except (ValueError, OSError, KeyError) as exc:  # unsupported architecture, missing files, remote code refused
        raise LmforgeError(f"{source.location}: cannot be loaded as a causal language model: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def materialize(source: Source, out: Path, report=None) -> dict[str, Any]:
    """Make ``out`` a Hugging Face directory (safetensors, tokenizer, ``source.json``) for ``source``.

    A directory made earlier from the same file (same sha256) is kept: a GGUF is dequantized once.
    """
    say = report or (lambda _msg: None)
    gguf = Path(source.location) if source.kind == "gguf" else None
    directory = None if gguf else (Path(source.location) if source.kind == "hf_dir" else _hub_snapshot(source))
    digest = sha256_file(gguf) if gguf else sha256_dir(directory)
    if source.sha256 and source.sha256.lower() != digest:
        raise LmforgeError(f"{source.location}: sha256 {digest} differs from the pinned {source.sha256} (another file, or a damaged download)")
    record_file = out / "source.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("sha256") == digest and record.get("settings") == _settings(source):
            say(f"base model {source.slug}: up to date ({record['kind']}, sha256 {digest[:12]}…)")
            return record
    if out.exists():
        shutil.rmtree(out)
    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if gguf is not None:
        say(f"base model {source.slug}: dequantizing {gguf.name} (once; cached as safetensors)")
        model, tokenizer = _load_causal(str(gguf.parent), source, gguf_file=gguf.name)
        model.save_pretrained(str(work), safe_serialization=True)
        tokenizer.save_pretrained(str(work))
        config = model.config
    elif _check_weights(directory, source):
        for path in directory.iterdir():
            if path.is_file() and _MODEL_FILES.match(path.name):
                link_or_copy(path.resolve(), work / path.name)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(work), trust_remote_code=source.trust_remote_code)
        except (ValueError, OSError) as exc:  # unknown model type, or its own code without trust_remote_code
            raise LmforgeError(f"{source.location}: {str(exc).splitlines()[0]}") from None
    else:  # trusted pickle: converted here once, so that every later load is safetensors
        say(f"base model {source.slug}: converting pickled weights to safetensors (allow_pickle is set)")
        model, tokenizer = _load_causal(str(directory), source, use_safetensors=False)
        model.save_pretrained(str(work), safe_serialization=True)
        tokenizer.save_pretrained(str(work))
        config = model.config
    record = {
        "source": source.written, "kind": source.kind, "slug": source.slug, "revision": source.revision, "sha256": digest,
        "licence": source.licence or _licence_of(directory, gguf) or "unknown",
        "model_type": config.model_type, "architectures": getattr(config, "architectures", None),
        "context_window": getattr(config, "max_position_embeddings", None), "settings": _settings(source),
    }
    (work / "source.json").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(work, out)
    say(f"base model {source.slug}: ready ({record['model_type']}, licence {record['licence']})")
    return record


def _settings(source: Source) -> dict[str, Any]:
    """What decides the directory's contents, without the checkout's absolute path: the same record
    (and the same DVC hash) on every machine."""
    return {k: v for k, v in asdict(source).items() if k != "location"}


def source_tags(record: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of everything descending from a base model: where it came from, exactly."""
    return {"source": record["source"], "source_kind": record["kind"], "source_sha256": record["sha256"], "source_licence": record["licence"]}
