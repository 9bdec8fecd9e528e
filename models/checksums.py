"""The hash of a model directory's files, by which lmforge knows a model it has seen: the registry's
``weights_sha256`` tag (a model registered once), the benchmark scores' cache, the ONNX builds' cache
(``models.onnx_genai.built``), the export's file hashes.  Here, with no other import, so that both the
loaders and the builders of models reach it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def weights_sha256(model_dir: Path) -> str:
    """A hash of every file of a model directory (names and bytes): the same model, the same hash."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
