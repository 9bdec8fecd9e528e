"""Where the project is: ``REPO_ROOT``, against which relative paths resolve, and the params file in force.

Kept apart from the section dataclasses and the loading code because both need it (``Params.path``
resolves against the root; ``load_params`` reads ``params_file()``).
"""

from __future__ import annotations

import os
from pathlib import Path


def _find_root() -> Path:
    """The project root: ``$LMFORGE_ROOT``, else the nearest directory from the working directory up
    that holds ``params.yaml`` and ``dvc.yaml`` (so ``dvc repro`` in a copy of the project uses that
    copy), else the checkout this package was installed from."""
    if os.environ.get("LMFORGE_ROOT"):
        return Path(os.environ["LMFORGE_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    for directory in (cwd, *cwd.parents):
        if (directory / "params.yaml").is_file() and (directory / "dvc.yaml").is_file():
            return directory
    return Path(__file__).resolve().parents[2]  # this file is <root>/lmforge/params/root.py


#: The project root: relative paths in any params file resolve against it.
REPO_ROOT = _find_root()


def params_file() -> Path:
    """The params file in force: ``$LMFORGE_PARAMS`` or ``<repo>/params.yaml``."""
    override = os.environ.get("LMFORGE_PARAMS")
    if override:
        p = Path(override).expanduser()
        return p if p.is_absolute() else Path.cwd() / p
    return REPO_ROOT / "params.yaml"
