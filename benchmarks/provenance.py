"""Where a result came from: the commit of this checkout, for result files and their names."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str | None:
    """``git ARGS`` run in this repository, its stripped output; ``None`` when git fails."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def short_commit() -> str:
    """The abbreviated commit of this checkout, or ``"unknown"`` outside a git checkout."""
    return git("rev-parse", "--short", "HEAD") or "unknown"


__all__ = ["REPO_ROOT", "git", "short_commit"]
