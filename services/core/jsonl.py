"""Durable JSON Lines files for work that resumes: the classifier's collected samples,
`tandem eval`'s results and `tandem batch run`'s output all use this one module.

A record is one line, written with a single `write()` and fsync'd before `append` returns,
so a record its writer saw written survives a crash, and a crash mid-write leaves at most a
torn last line: bytes after the last newline. Opening a file to append cuts such a tail off,
so the next record starts on a line of its own; `read` never sees it either (it stops at
the last newline and changes nothing), so the torn record's work is simply done again.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 1 << 16


class BadLine(ValueError):
    """A complete line that is not JSON (a torn last line is not one: it is dropped)."""

    def __init__(self, path: Path, number: int, error: str) -> None:
        super().__init__(f"{path} line {number} is not JSON ({error})")
        self.path = path
        self.number = number


def encode(record: Any) -> bytes:
    """One record as one line."""
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def read(path: Path, *, skip_bad: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, record) for every complete, non-blank line. A line that is not JSON
    raises `BadLine`, or is passed over with `skip_bad`. A missing file has no lines."""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return  # a torn last line: not a record
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
                if skip_bad:
                    continue
                raise BadLine(path, number, str(error)) from None
            yield number, record


class BadObject(ValueError):
    """A dataset line that is not a JSON object; the message names `path:line`."""


def objects(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`path:line`, record) for every non-blank line of a dataset file, each a JSON object
    (a last line without a newline counts: datasets are not appended to). Raises OSError,
    or BadObject for a line that is not UTF-8, not JSON, or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise BadObject(f"{where}: not valid JSON ({error})") from None
                if not isinstance(record, dict):
                    raise BadObject(f"{where}: a line must be a JSON object")
                yield where, record
    except UnicodeDecodeError as error:
        raise BadObject(f"{path}: not UTF-8 text ({error.reason})") from None


def repair(path: Path) -> int:
    """Cut a torn last line off a regular file; returns the number of bytes cut."""
    if not path.is_file():
        return 0
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - _BLOCK)
            handle.seek(start)
            block = handle.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return 0
        handle.truncate(end)
        handle.flush()
        os.fsync(handle.fileno())
        return size - end


class Appender:
    """Appends records to one file: each with one write, then fsync (for regular files; a
    pipe such as /dev/stdout is only written). Thread-safe. Cuts a torn tail on opening."""

    def __init__(self, path: Path) -> None:
        self.path = path
        repair(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._sync = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._lock = threading.Lock()

    def append(self, record: Any) -> None:
        data = memoryview(encode(record))
        with self._lock:
            while data:  # one write for a regular file; a loop only for a short write
                data = data[os.write(self._fd, data) :]
            if self._sync:
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def append(path: Path, record: Any) -> None:
    """Append one record to `path` (opened, written, fsync'd and closed)."""
    with Appender(path) as appender:
        appender.append(record)
