"""The documentation: the README is a front page that links to existing pages, and the site builds
strictly (a broken link or anchor fails), with the configuration and CLI references generated from
the code and committed, and a test that fails when they drift."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dagster_project import reference as generated
from lmforge.params import LmforgeError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 15_000


def _mkdocs(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2.0 is not a build warning
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=config_dir, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    result = _mkdocs(ROOT, out)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def _page(site: Path, name: str) -> str:
    return (site / name).read_text(encoding="utf-8")


def test_site_builds_strictly_with_every_page_of_the_nav(site: Path):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    nav = list(pages(config["nav"]))
    on_disk = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == on_disk, "every page of docs/ is in the nav of mkdocs.yml, and only those"
    for page in nav:
        source = (ROOT / "docs" / page).read_text(encoding="utf-8")
        assert source.count("<!-- generated:") == source.count(generated.END), f"{page}: a generated block without its end"
    assert not (site / "hooks.py").exists() and not (site / "figures.py").exists()


def test_a_broken_anchor_fails_the_build(tmp_path: Path):
    """The validation settings of mkdocs.yml turn a broken link into a failure under --strict."""
    validation = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["validation"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[there](other.md#no-such-heading)\n")
    (tmp_path / "docs" / "other.md").write_text("# Other\n")
    config = {"site_name": "t", "nav": ["index.md", "other.md"], "validation": validation}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = _mkdocs(tmp_path, tmp_path / "site")
    assert result.returncode != 0 and "no-such-heading" in result.stdout + result.stderr


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move reference material into docs/"
    text = README.read_text(encoding="utf-8")
    assert "make test" in text and "make demo" in text  # .ci/run runs the README's test command
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert not re.search(r"(/work/|/home/|/Users/|/root/)", text), "no absolute path of a build machine"


def _heading_ids(markdown: str) -> set[str]:
    from markdown.extensions.toc import slugify

    ids = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*(\{\s*#([\w.-]+)\s*\})?\s*$", line)
        if match:
            ids.add(match.group(3) or slugify(re.sub(r"[`*]", "", match.group(1)), "-"))
    return ids


def test_every_relative_link_of_the_readme_exists(site: Path):
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code blocks are not links
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)
    assert len(links) >= 12, "the README links to the documentation pages"
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (ROOT / path).resolve() if path else README
        if not target.exists():
            broken.append(f"{link}: no such file")
            continue
        if not anchor:
            continue
        if target.suffix == ".md" and target.parent == ROOT / "docs":
            html = _page(site, target.with_suffix(".html").name)  # the ids mkdocs actually made
            if f'id="{anchor}"' not in html:
                broken.append(f"{link}: no such anchor in the built page")
        elif anchor not in _heading_ids(target.read_text(encoding="utf-8")):
            broken.append(f"{link}: no such heading")
    assert not broken, "broken links in README.md:\n" + "\n".join(broken)
    linked = {re.sub(r"#.*", "", link) for link in links}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"README.md does not link to {sorted(pages - linked)}"


def _section(markdown: str, anchor: str) -> str:
    """The Markdown of the generated section with this id, up to the next heading."""
    match = re.search(rf"^#+ .*\{{ #{re.escape(anchor)} \}}\n(.*?)(?=^#)", markdown + "\n#", re.S | re.M)
    assert match, f"no section #{anchor} in the generated reference"
    return match.group(1)


def _row(section: str, key: str) -> str:
    rows = [line for line in section.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"expected one row for {key}"
    return rows[0]


def test_configuration_reference_is_generated_from_the_params_dataclasses(site: Path):
    from lmforge.params import BASE_TIER, Params, load_params

    reference = generated.configuration_reference()
    checked = 0

    def check(default_obj, file_obj, path: str) -> None:
        nonlocal checked
        text = _section(reference, re.sub(r"[^a-z0-9]+", "-", path.lower()))
        hints = typing.get_type_hints(type(default_obj))
        for f in dataclasses.fields(default_obj):
            default, value = getattr(default_obj, f.name), getattr(file_obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                check(default, value, f"{path}.{f.name}")
                continue
            row = _row(text, f.name)
            if isinstance(default, bool):
                assert f"`{str(default).lower()}`" in row
            elif isinstance(default, (int, float)):
                assert f"| `{default!r}` |" in row, f"{path}.{f.name}: default {default!r} not in {row}"
                if value != default:
                    assert f"`{value!r}`" in row.split("|")[4], f"{path}.{f.name}: params.yaml's {value!r} not in {row}"
                checked += 1
            elif isinstance(default, str):
                assert default.replace("\n", "\\n") in row

    defaults, in_file = Params(), load_params(ROOT / "params.yaml", tier=BASE_TIER)
    for section in dataclasses.fields(Params):  # every top-level section, and every section nested in it
        assert dataclasses.is_dataclass(getattr(defaults, section.name))
        check(getattr(defaults, section.name), getattr(in_file, section.name), section.name)
    assert checked > 80, checked
    # nested sections and models/train_config.py, with a real default and the comment that explains it
    train = _section(reference, "pretrain-train")
    assert f"| `{Params().pretrain.train.lr!r}` |" in _row(train, "lr")
    source = (ROOT / "lmforge" / "params" / "sections.py").read_text()
    comment = re.search(r"^\s+vocab_size: int = \d+\s+#\s*(.*)$", source, re.M).group(1)
    assert comment in _row(_section(reference, "tokenizer"), "vocab_size")
    assert "each entry of `pretrain.candidates`" in reference and "| `source` |" in _section(reference, "pretrain-candidates")
    html = _page(site, "configuration.html")
    for section in dataclasses.fields(Params):
        assert f'id="{generated.anchor(section.name)}"' in html  # batch_inference → batch-inference


def _cli_commands():
    import typer

    from dagster_project.cli import app

    def walk(command, path, parent):
        ctx = command.context_class(command, info_name=path.split()[-1], parent=parent)
        yield path, command, ctx
        for name in getattr(command, "list_commands", lambda ctx: [])(ctx):
            yield from walk(command.get_command(ctx, name), f"{path} {name}", ctx)

    return list(walk(typer.main.get_command(app), "lmforge", None))


def test_cli_reference_lists_every_command_and_option(site: Path):
    reference = generated.cli_reference()
    html = _page(site, "cli.html")
    commands = _cli_commands()
    assert len(commands) > 5
    for path, command, ctx in commands:
        anchor = path.replace(" ", "-")
        assert f"`{path}` {{ #{anchor} }}" in reference, f"{path} is missing from the CLI reference"
        assert f'id="{anchor}"' in html
        section = _section(reference, anchor)
        for param in command.get_params(ctx):
            if param.name != "help" and not getattr(param, "hidden", False):
                name = max(param.opts, key=len)
                assert name in section, f"{path}: {name} is missing from the CLI reference"
    assert str(ROOT) not in reference, "defaults computed on this machine are shown relative to the checkout"


def test_the_committed_references_are_what_lmforge_docs_writes():
    """docs/configuration.md, docs/cli.md and docs/modules.md hold their generated text (readable on GitHub): it must be current."""
    wanted = generated.pages()
    assert set(wanted) == {ROOT / "docs" / name for name in ("configuration.md", "cli.md", "modules.md")}
    for path, text in wanted.items():
        assert path.read_text(encoding="utf-8") == text, f"{path.relative_to(ROOT)} is stale: run `lmforge docs`"


def test_lmforge_docs_rewrites_only_the_generated_block(tmp_path: Path, monkeypatch):
    from dagster_project.cli import app

    page = tmp_path / "page.md"
    page.write_text(f"# Page\n\nBy hand.\n\n<!-- generated: toy -->\nold\n{generated.END}\n\nAfter.\n")
    monkeypatch.setattr(generated, "PAGES", {page: ("toy", lambda: "| new |\n")})
    stale = CliRunner().invoke(app, ["docs", "--check"])
    assert stale.exit_code == 1 and "run `lmforge docs`" in stale.output and "old" in page.read_text()
    assert CliRunner().invoke(app, ["docs"]).exit_code == 0
    assert page.read_text() == f"# Page\n\nBy hand.\n\n{generated.begin('toy')}\n\n| new |\n\n{generated.END}\n\nAfter.\n"
    assert CliRunner().invoke(app, ["docs", "--check"]).exit_code == 0
    page.write_text("# Page\n\nno block\n")
    missing = CliRunner().invoke(app, ["docs"])
    assert missing.exit_code == 1 and "expected one block" in missing.output


def test_figures_are_small_pictures():
    images = sorted((ROOT / "docs" / "img").glob("*.png"))
    assert {p.name for p in images} >= {"loss_curve.png", "factor_matrix.png"}
    for image in images:
        assert image.stat().st_size < 150_000, f"{image.name} is over 150 KB"


def test_the_module_map_has_every_module_of_the_code_once_with_its_docstring(tmp_path: Path):
    """One line per module of every code folder; a module without a docstring is refused, saying what to write."""
    text = generated.module_map()
    modules = [f for folder in generated.CODE_FOLDERS for f in sorted((ROOT / folder).glob("*.py"))]
    assert len(modules) > 100 and text.count("\n| `") == len(modules)
    assert "| `factory.py` | `stage_asset`: the Dagster asset of a declared stage" in text
    (tmp_path / "lmforge").mkdir()
    (tmp_path / "lmforge" / "bare.py").write_text("X = 1\n")
    with pytest.raises(LmforgeError, match="lmforge/bare.py has no docstring"):
        generated.module_map(tmp_path)
