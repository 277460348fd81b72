"""A file's bytes in and out of Postgres, a chunk at a time."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

from sqlalchemy.orm import Session

from services.storage import file_rows
from services.storage.db import transaction
from services.storage.models import StoredFile

CHUNK_BYTES = 1 << 20  # one file_chunks row
READ_CHUNKS = 4  # chunks one read transaction fetches (so at most 4 MiB in memory)


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


class FileWriter:
    """Takes a file's bytes as they come and stores them as chunk rows in the caller's
    session (so the file and its bytes commit, or roll back, together)."""

    def __init__(self, session: Session, file: StoredFile) -> None:
        self.session = session
        self.file = file
        self.size = 0
        self._seq = 0
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) >= CHUNK_BYTES:
            self._store(bytes(self._buffer[:CHUNK_BYTES]))
            del self._buffer[:CHUNK_BYTES]

    def close(self) -> StoredFile:
        """Store what is left and the file's size; returns the file."""
        if self._buffer:
            self._store(bytes(self._buffer))
            self._buffer.clear()
        self.file.bytes = self.size
        self.session.flush()
        return self.file

    def _store(self, chunk: bytes) -> None:
        file_rows.add_chunk(self.session, self.file.id, self._seq, chunk)
        self._seq += 1


def create(
    session: Session, owner: str, purpose: str, filename: str, batch_id: str | None = None
) -> FileWriter:
    """A new file (its row is inserted now, so its chunks can follow) and its writer."""
    file = StoredFile(
        id=new_file_id(),
        owner=owner,
        purpose=purpose,
        filename=filename,
        bytes=0,
        batch_id=batch_id,
    )
    session.add(file)
    session.flush()
    return FileWriter(session, file)


def read(url: str, file_id: str) -> Iterator[bytes]:
    """The file's bytes, a chunk at a time, each few chunks in its own short transaction (a
    slow reader holds no transaction open). A file deleted while it is read ends early."""
    last = -1
    while True:
        with transaction(url) as session:
            rows = file_rows.chunk_page(session, file_id, last, READ_CHUNKS)
        for seq, data in rows:
            last = seq
            yield bytes(data)
        if len(rows) < READ_CHUNKS:
            return


class FileReader(io.RawIOBase):
    """A stored file as a binary stream (what the batch ingest reads lines from)."""

    def __init__(self, url: str, file_id: str) -> None:
        self._chunks = read(url, file_id)
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._current:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._current = memoryview(chunk)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n
