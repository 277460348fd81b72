"""Files of the OpenAI Files API, kept in Postgres, framework-free (the API adapts them).

A file is one `files` row (owner, purpose, name, size) and its bytes in `file_chunks` rows
of at most `CHUNK_BYTES` each, in order. Bytes are written and read a chunk at a time, so
a file of hundreds of MB never sits in a process's memory; a file exists exactly when the
transaction that wrote its row and all its chunks committed (docs/openai.md says why
Postgres rather than large objects or an object store).

    store.py         create (a writer that takes bytes as they come), read (chunks, in
                     short transactions), a file-like reader, delete
    batch_output.py  an OpenAI-API batch's output and error files, written when it ends

Row-level SQL lives in `services.storage.file_rows`.
"""

from services.files.store import (
    CHUNK_BYTES,
    FileReader,
    FileWriter,
    create,
    new_file_id,
    read,
)

__all__ = ["CHUNK_BYTES", "FileReader", "FileWriter", "create", "new_file_id", "read"]
