"""One error type for everything a user can get wrong; the CLI prints it as one line."""

import tempfile
from pathlib import Path


class BenchError(Exception):
    """A problem with the user's input, stated with what to do about it."""


def writable_folder(folder: Path, what: str, instead: str) -> None:
    """The folder (made if missing) takes files, or one error line naming `what`: checked
    before the work whose files it is to hold, so no work is lost to it."""
    if folder.exists() and not folder.is_dir():
        raise BenchError(f"{what}: {folder} is a file, not a folder; choose another {instead}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise BenchError(f"{what}: cannot write in {folder} ({reason}); choose another {instead}") from None
