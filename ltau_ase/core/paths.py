"""Checks that an output path can be written, done before the work that produces the output.

A run that fails only when it saves (a directory where a file was expected, a read-only place)
loses its work; these checks fail first, leave nothing behind, and say what was wrong.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_writable_file(path: str | os.PathLike, what: str = "output") -> None:
    """Raise ``ValueError`` unless ``path`` can be written as a file.

    Refused: an existing directory, an existing file that cannot be opened for appending (it is not
    modified), a parent path that is a file, or a directory in which no file can be created (tested
    by creating and removing a temporary file in the nearest existing ancestor; missing parent
    directories are left to the writer to create).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; expected a file path")
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise ValueError(f"{what} {path} cannot be written: {exc.strerror or exc}") from None
        return
    check_writable_dir(path.parent, what)


def check_writable_dir(path: str | os.PathLike, what: str = "output") -> None:
    """Raise ``ValueError`` unless files can be created in directory ``path`` (or, if it does not
    exist yet, in its nearest existing ancestor)."""
    path = Path(path)
    ancestor = path
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what}: {ancestor} is not a directory, so {path} cannot be created there")
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".ltau-write-check-")
    except OSError as exc:
        raise ValueError(f"{what}: cannot create files in {ancestor}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
