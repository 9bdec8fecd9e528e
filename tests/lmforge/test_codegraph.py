"""Staleness sees every file: code versions and dvc.yaml deps come from each stage's import closure."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, run_command

from lmforge import codegraph, stages

STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
#: The stages off the DVC pipeline: the feedback and preference loops (they read a live database) and the search.
NOT_IN_DVC = stages.off_the_pipeline()
#: Every stage: DVC's and the others.
ALL_STAGES = STAGES + NOT_IN_DVC


def closure(stage: str, root: Path = REPO) -> set[str]:
    return set(codegraph.relative(codegraph.stage_files(stage, root), root))


def test_the_stages_found_in_the_source_are_the_definitions_and_the_dvc_stages():
    """codegraph finds asset and check functions by reading the source; the Definitions say what they are."""
    import ast
    import importlib
    import inspect

    from dagster_project.definitions import defs

    found = codegraph.definitions()
    graph = defs.resolve_asset_graph()
    stages = {k.to_user_string() for k in graph.materializable_asset_keys}
    assert set(found) == stages == set(ALL_STAGES) and not set(STAGES) & set(NOT_IN_DVC)
    for key in graph.materializable_asset_keys:
        fn = defs.get_assets_def(key).op.compute_fn.decorated_fn
        ((path, node),) = found[key.to_user_string()]["asset"]
        if isinstance(node, ast.Assign):  # `<stage> = stage_asset("<stage>", ...)`: the factory's function, bound there
            module = importlib.import_module(codegraph.module_name(path))
            assert fn.__name__ == key.to_user_string() and getattr(module, node.targets[0].id).key == key
        else:
            assert Path(inspect.getsourcefile(fn)).resolve() == path.resolve() and fn.__name__ == node.name
    checked = 0
    for checks_def in defs.asset_checks:  # checks with functions of their own (not check specs of an asset)
        for key in checks_def.check_keys:
            names = {node.name for _, node in found[key.asset_key.to_user_string()]["checks"]}
            assert checks_def.op.compute_fn.decorated_fn.__name__ in names, key
            checked += 1
    assert checked >= 4  # data quality (several), leakage, round trip, unknown-token rate


def test_dvc_yaml_lists_exactly_the_import_closure_of_each_stage():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    wrong = []
    for stage, spec in stages.items():
        spec = spec.get("do", spec)
        listed = {d for d in spec["deps"] if d.endswith(".py")}
        missing, extra = sorted(closure(stage) - listed), sorted(listed - closure(stage))
        if missing or extra:
            wrong.append(f"{stage}: add {missing}, remove {extra}")
    assert not wrong, "dvc.yaml deps differ from the stages' imports:\n" + "\n".join(wrong)


def test_the_closure_holds_what_pretraining_imports_and_nothing_outside_the_stages():
    # the files the hand-written lists had left out
    assert {"models/data.py", "models/metrics.py", "lmforge/artifacts.py", "lmforge/params/sections.py",
            "lmforge/tracking.py", "assets/common.py", "assets/pretrain.py", "assets/resources.py"} <= closure("pretrain")
    # an asset's own imports, not its module neighbours': only `register*` use the registry's code directly
    assert "lmforge/registry.py" not in closure("ingest") and "models/training.py" not in closure("split")
    everything = set().union(*(closure(s) for s in STAGES))
    for unused in ("lmforge/demo_corpus.py", "dagster_project/cli/run.py", "dagster_project/sensors.py",
                   "dagster_project/definitions.py"):
        assert unused not in everything


def test_the_modules_python_imports_are_inside_the_closure():
    """What the interpreter really loads for the asset and check modules is within what the AST found."""
    modules = [codegraph.module_name(path) for d in codegraph.DEFINITION_DIRS for path in sorted((REPO / d).glob("*.py"))]
    code = (f"import sys; import {', '.join(modules)}; "
            "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in "
            f"{codegraph.PACKAGES!r} and getattr(m, '__file__', None))))")
    result = run_command([str(REPO / ".venv/bin/python"), "-c", code], REPO, dict(os.environ), timeout=300)  # no module of ours loaded before
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = result.stdout.split()
    loaded = {Path(f).resolve().relative_to(REPO).as_posix() for f in loaded}
    assert loaded - set().union(*(closure(s) for s in ALL_STAGES)) == set()


TOUCHED = ("lmforge/registry.py", "models/metrics.py", "lmforge/demo_corpus.py")


def _code_versions_as_modules_are_touched(project: Path) -> list[dict[str, str]]:
    """Every stage's Dagster code version, computed by the code of ``project`` (a copy of the checkout),
    first as copied, then after appending a comment to each module of ``TOUCHED`` in turn (one process)."""
    code = ("import json, pathlib; from assets.common import code_version; from lmforge import codegraph; "
            f"root = pathlib.Path({str(project)!r}); assert codegraph.CODE_ROOT == root, codegraph.CODE_ROOT; "
            f"versions = lambda: {{s: code_version(s) for s in {STAGES!r}}}; out = [versions()]\n"
            f"for module in {TOUCHED!r}:\n"
            "    (root / module).write_text((root / module).read_text() + '\\n# touched\\n'); out.append(versions())\n"
            "print(json.dumps(out))")
    env = {**os.environ, "PYTHONPATH": str(project), "LMFORGE_ROOT": str(project)}
    env.pop("LMFORGE_PARAMS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_touching_a_module_changes_the_code_version_of_exactly_the_stages_that_import_it(tmp_path: Path):
    project = tmp_path / "project"
    for name in (*codegraph.PACKAGES, "prompts", "dvc.yaml", "params.yaml"):
        src = REPO / name
        (shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy(src, project / name))
    versions = _code_versions_as_modules_are_touched(project)
    for module, before, after in zip(TOUCHED, versions, versions[1:]):
        changed = {s for s in STAGES if after[s] != before[s]}
        assert changed == {s for s in STAGES if module in closure(s, project)}, module
        assert bool(changed) == (module != "lmforge/demo_corpus.py")
