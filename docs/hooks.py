"""MkDocs hook: under ``--strict`` the build fails when a generated reference in docs/ is stale.

The configuration and CLI references are committed Markdown that ``lmforge docs`` writes
(``dagster_project/reference.py``), so the site shows the pages as they are in git; the hook only
checks them again, so that no site is published from pages that drifted from the code.
``mkdocs.yml`` names this file under ``hooks:``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's packages, also when mkdocs runs from another environment's bin/
    sys.path.insert(0, str(ROOT))

from dagster_project import reference  # noqa: E402  (after the path above)

log = logging.getLogger("mkdocs.hooks.reference")  # under "mkdocs": --strict counts its warnings


def on_pre_build(config: Any, **kwargs: Any) -> None:
    for path in reference.stale(reference.pages()):
        log.warning(f"{path.relative_to(ROOT)} differs from the code: run `lmforge docs`")
