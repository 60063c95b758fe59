"""Output files of the command line and the demo: a writable output folder and atomic writes (a
temporary name renamed into place, so an interrupted run never leaves a half-written file)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["output_dir", "atomic_write", "write_json"]


def output_dir(path: str | os.PathLike) -> Path:
    """The folder ``path``, created if missing and checked writable (a ``UsageError`` naming
    it otherwise)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, delete=True)
        probe.close()
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {path}: {exc.strerror or exc}") from exc
    return out


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``
    (with the usual file mode); on any error the temporary file is removed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
    atomic_write(path, write)
