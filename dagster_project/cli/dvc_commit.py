"""Record DVC stages in ``dvc.lock`` as ``dvc commit --force`` does, reading dvc.yaml and dvc.lock once.

``lmforge run`` records the stages it materialized (``run._record_in_dvc``).  It runs this file with
DVC's own Python (the Makefile's ``.venv-dvc``, kept apart because hydra-core's antlr4 pin breaks
Dagster), so it imports DVC and nothing of lmforge:

    .venv-dvc/bin/python dagster_project/cli/dvc_commit.py <repository> <stage> [<stage> ...]

Why not ``dvc commit --force a b c``: DVC parses dvc.yaml and dvc.lock again for every target and
rewrites dvc.lock after each one, about 2.5 s a stage for lmforge's generated dvc.yaml (its deps list
each stage's import closure), so recording a whole pipeline run took over a minute.  This does the
same work per stage as ``dvc.repo.commit.commit`` (save the stage's hashes, commit its outputs to the
cache) over one parse, and writes each DVC file's lock entries once.
"""

from __future__ import annotations

import logging
import sys
from itertools import groupby


def commit(root: str, targets: list[str]) -> None:
    """Force-commit ``targets`` (stage addresses as ``dvc commit`` takes them: ``pretrain@0``, ``data.dvc``)."""
    from dvc.repo import Repo, lock_repo

    logging.getLogger("dvc").setLevel(logging.ERROR)  # as --quiet: the caller reports the outcome
    with Repo(root) as repo, lock_repo(repo):
        by_address = {stage.addressing: stage for stage in repo.index.stages}
        unknown = [t for t in targets if t not in by_address]
        if unknown:
            raise SystemExit(f"not stages of {root}'s DVC pipeline: {', '.join(unknown)}")
        stages = [by_address[t] for t in dict.fromkeys(targets)]
        for stage in stages:
            stage.save()
            stage.commit(relink=True)
        for _path, group in groupby(sorted(stages, key=lambda s: s.dvcfile.path), key=lambda s: s.dvcfile.path):
            group = list(group)
            group[0].dvcfile.dump_stages(group, update_pipeline=False)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    commit(sys.argv[1], sys.argv[2:])
