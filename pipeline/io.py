"""Small file helpers shared by every stage: atomic writes, and reading a text file whatever its encoding mark."""
from __future__ import annotations

import codecs
import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: ``.<name>.<random>.tmp`` beside the target

# Byte-order marks that declare a text file's encoding, longest first (the UTF-32 LE mark starts like UTF-16 LE's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere set-and-restore, which is not atomic between
    threads (another thread creating a file in between would get mode 0666), hence the /proc route first."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_open_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: an existing file keeps its own, a new one gets 0666
    less the umask. (mkstemp creates 0600 files, which a shared team folder could not read.)"""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Write to a temporary file next to ``path`` and rename it into place, so readers never see half a file.

    The file ends with the permissions a plain ``open()`` would give it. A killed process may leave its
    temporary ``.<name>.<random>.tmp`` behind (never ``path`` half written); :func:`stray_temp_files` finds them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            os.chmod(tmp, _plain_open_mode(path))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def stray_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files :func:`atomic_write` left in ``folder`` when its process was killed mid-write."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file())


# ------------------------------------------------------------------------------------------------ reading


class TextDecodeError(ValueError):
    """A text file that is neither UTF-8 nor in the encoding its byte-order mark declares."""


def decode_text(data: bytes, name: str) -> str:
    """``data`` as text: in the encoding its byte-order mark declares (UTF-8, UTF-16, UTF-32; the mark is
    dropped), else strict UTF-8. A file in another encoding (Latin-1, cp1252...) is a :class:`TextDecodeError`
    naming ``name``, the line and the byte, never a guess that would turn a class name into mojibake."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1 if encoding == "utf-8" else None
        where = f"line {line}, " if line is not None else ""
        raise TextDecodeError(
            f"{name}: not {encoding.upper().removesuffix('-SIG')} text ({where}byte {exc.start}: "
            f"{data[exc.start:exc.start + 1]!r}); save the file as UTF-8"
        ) from None


def read_text(path: str | Path) -> str:
    """The text file at ``path`` (see :func:`decode_text`); OSError (missing file, a folder) propagates."""
    path = Path(path)
    return decode_text(path.read_bytes(), str(path))
