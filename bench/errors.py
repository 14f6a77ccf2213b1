"""One error type for everything a user can get wrong; the CLI prints it as one line."""

import os
import tempfile
from pathlib import Path


class BenchError(Exception):
    """A problem with the user's input, stated with what to do about it."""


def writable_folder(folder: Path, what: str, instead: str) -> None:
    """The folder takes files, or could be made where it is missing, or one error line
    naming `what`: checked before the work whose files it is to hold, so no work is lost
    to it. Creates nothing (a refused command leaves no empty folder behind)."""
    existing = next(path for path in (folder, *folder.parents) if os.path.lexists(path))
    if not existing.exists():
        raise BenchError(f"{what}: {existing} is a link to nothing; choose another {instead}")
    if not existing.is_dir():
        raise BenchError(f"{what}: {existing} is a file, not a folder; choose another {instead}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise BenchError(f"{what}: cannot write in {existing} ({reason}); choose another {instead}") from None
