"""pipeline.io: atomic writes that keep the mode a plain open() gives, and text files read whatever their BOM."""
from __future__ import annotations

import os
import stat

import pytest

from pipeline.io import TextDecodeError, atomic_write, atomic_write_text, decode_text, read_text, stray_temp_files


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after it."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o000, 0o666)])
def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path, umask, mask, expected):
    """Finding 9: mkstemp's 0600 made every ledger, submission, folds file and checkpoint private."""
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    with atomic_write(tmp_path / "atomic.bin", "wb") as f:
        f.write(b"x")
    assert mode_of(plain) == expected
    assert mode_of(atomic) == expected and mode_of(tmp_path / "atomic.bin") == expected


def test_an_existing_file_keeps_its_mode_as_with_open(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "shared.csv"
    path.write_text("old")
    os.chmod(path, 0o664)  # a team folder's group-writable file
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and mode_of(path) == 0o664


def test_a_failed_write_leaves_neither_the_file_nor_a_temp_file(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and stray_temp_files(tmp_path) == []
    (tmp_path / ".x.txt.abc123.tmp").write_text("left by a kill")
    assert [p.name for p in stray_temp_files(tmp_path)] == [".x.txt.abc123.tmp"]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_text_is_read_in_the_encoding_its_bom_declares(tmp_path, encoding):
    text = "image_id,label\nblé,épi\n"
    path = tmp_path / "t.csv"
    path.write_bytes(text.encode(encoding))
    assert read_text(path) == text  # the BOM is no part of the first column's name


def test_text_in_another_encoding_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("a\nb\nblé\n".encode("latin-1"))
    with pytest.raises(TextDecodeError, match=r"latin1\.txt: not UTF-8 text \(line 3, byte 6: b'\\xe9'\)"):
        read_text(path)
    with pytest.raises(TextDecodeError, match=r"x\.txt: not UTF-16 text"):
        decode_text(b"\xff\xfea", "x.txt")  # a UTF-16 mark followed by half a character
