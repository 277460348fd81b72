"""/v1/files: upload, list, read, download and delete files (the OpenAI Files API).

An upload is `multipart/form-data` with `purpose=batch` and a `file` part. The body is
parsed as it arrives (werkzeug's sans-IO multipart decoder, fed 64 KiB at a time) and the
file's bytes go straight into Postgres a chunk at a time (services/files), in one
transaction: nothing is spooled to disk, the API's memory stays flat whatever the size,
and a broken upload leaves nothing behind. The limit is TANDEM_MAX_FILE_BYTES (413 above),
which may exceed TANDEM_MAX_BODY_BYTES. Downloads stream the chunks back the same way.

Only purpose `batch` is accepted on upload (the input of an OpenAI batch); batches write
their own `batch_output` files. A file is its owner's: another key gets 404.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy.orm import Session
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from services import files as file_store
from services.api.auth import authenticate
from services.api.openai.protocol import FileDeleted, FileList, FileObject, OpenAIError
from services.settings import Settings
from services.storage import file_rows
from services.storage.db import transaction
from services.storage.models import StoredFile

bp = Blueprint("files", __name__)

READ_BYTES = 64 * 1024
MAX_FIELD_BYTES = 1024  # `purpose` and other small fields
MAX_FILENAME = 255
UPLOAD_PURPOSES = ("batch",)
LIST_LIMIT = 10_000
LIST_QUERY = ("purpose", "limit", "after", "order")


def settings() -> Settings:
    return current_app.config["TANDEM"]


def file_json(file: StoredFile) -> dict:
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=int(file.created_at.timestamp()),
        filename=file.filename,
        purpose=file.purpose,  # type: ignore[arg-type]
    ).model_dump(mode="json")


def not_found(file_id: str) -> OpenAIError:
    return OpenAIError(404, f"No such File object: {file_id[:80]}", param="id", code="not_found")


@bp.post("/files")
def upload_file() -> Response:
    owner = authenticate()
    config = settings()
    request.max_content_length = config.max_file_bytes  # before the body is touched
    mimetype, options = parse_options_header(request.headers.get("Content-Type", ""))
    boundary = options.get("boundary")
    if mimetype != "multipart/form-data" or not boundary:
        raise OpenAIError(415, "send the file as multipart/form-data with 'purpose' and 'file'")
    with transaction(config.database_url) as session:
        upload = _Upload(session, owner)
        upload.read(request.stream, boundary.encode())
        stored = upload.finish()
        body = file_json(stored)
    return jsonify(body)


class _Upload:
    """One multipart upload, parsed as it streams in; the file part is written to Postgres
    as it comes, the small fields kept (a few hundred bytes)."""

    def __init__(self, session, owner: str) -> None:
        self.session = session
        self.owner = owner
        self.fields: dict[str, bytearray] = {}
        self.writer: file_store.FileWriter | None = None
        self._field: bytearray | None = None

    def read(self, stream, boundary: bytes) -> None:
        decoder = MultipartDecoder(boundary, max_form_memory_size=1 << 20, max_parts=16)
        try:
            while True:
                event = decoder.next_event()
                if isinstance(event, NeedData):
                    decoder.receive_data(stream.read(READ_BYTES) or None)
                elif isinstance(event, File):
                    self._open_file(event)
                elif isinstance(event, Field):
                    self._open_field(event)
                elif isinstance(event, Data):
                    self._data(event.data)
                elif isinstance(event, Epilogue):
                    return
        except ValueError as error:
            raise OpenAIError(400, f"malformed multipart body: {error}") from None

    def _open_file(self, event: File) -> None:
        if event.name != "file":
            raise OpenAIError(400, f"unexpected file part {event.name!r}; send it as 'file'", param=event.name)
        if self.writer is not None:
            raise OpenAIError(400, "send one file per upload", param="file")
        filename = (event.filename or "upload.jsonl").replace("\x00", "")[:MAX_FILENAME] or "upload"
        # The purpose may come after the file: it is checked before the commit.
        self.writer = file_store.create(self.session, self.owner, "batch", filename)
        self._field = None

    def _open_field(self, event: Field) -> None:
        if event.name not in ("purpose", "expires_after[anchor]", "expires_after[seconds]"):
            raise OpenAIError(
                400, f"Unrecognized request argument supplied: {event.name}", param=event.name
            )
        if event.name.startswith("expires_after"):
            raise OpenAIError(
                400,
                "expires_after is not supported: files are kept until they are deleted",
                param="expires_after",
                code="unsupported_parameter",
            )
        self._field = self.fields.setdefault(event.name, bytearray())

    def _data(self, data: bytes) -> None:
        if self._field is not None:
            self._field += data
            if len(self._field) > MAX_FIELD_BYTES:
                raise OpenAIError(400, "a form field is too long")
        elif self.writer is not None:
            self.writer.write(data)

    def finish(self) -> StoredFile:
        purpose = self.fields.get("purpose", bytearray()).decode(errors="replace").strip()
        if not purpose:
            raise OpenAIError(400, "Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise OpenAIError(
                400,
                f"purpose {purpose[:40]!r} is not supported; upload batch input with "
                "purpose 'batch'",
                param="purpose",
                code="unsupported_parameter",
            )
        if self.writer is None:
            raise OpenAIError(400, "Missing required parameter: 'file'.", param="file")
        if self.writer.size == 0:
            raise OpenAIError(400, "the file is empty", param="file")
        self.writer.file.purpose = purpose
        return self.writer.close()


@bp.get("/files")
def list_files() -> Response:
    owner = authenticate()
    args = request.args
    unknown = set(args) - set(LIST_QUERY)
    if unknown:
        name = sorted(unknown)[0]
        raise OpenAIError(400, f"Unrecognized request argument supplied: {name}", param=name)
    limit = _limit(args.get("limit"))
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise OpenAIError(400, "order must be 'asc' or 'desc'", param="order")
    with transaction(settings().database_url) as session:
        after = None
        if "after" in args:
            cursor = file_rows.owned(session, args["after"], owner)
            if cursor is None:
                raise OpenAIError(400, f"after: no file {args['after'][:80]!r}", param="after")
            after = (cursor.created_at, cursor.id)
        rows = file_rows.page(
            session,
            owner,
            limit + 1,
            purpose=args.get("purpose") or None,
            after=after,
            ascending=order == "asc",
        )
        data = [file_json(row) for row in rows[:limit]]
    page = FileList(
        data=[FileObject(**item) for item in data],
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
        has_more=len(rows) > limit,
    )
    return jsonify(page.model_dump(mode="json"))


def _limit(raw: str | None) -> int:
    if raw is None:
        return LIST_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= LIST_LIMIT:
        raise OpenAIError(400, f"limit must be a whole number from 1 to {LIST_LIMIT}", param="limit")
    return int(raw)


def _owned(session: Session, file_id: str, owner: str) -> StoredFile:
    """The owner's file, or the OpenAI 404 (another owner's file looks like a missing one)."""
    file = file_rows.owned(session, file_id, owner)
    if file is None:
        raise not_found(file_id)
    return file


@bp.get("/files/<file_id>")
def get_file(file_id: str) -> Response:
    owner = authenticate()
    with transaction(settings().database_url) as session:
        file = _owned(session, file_id, owner)
        return jsonify(file_json(file))


@bp.get("/files/<file_id>/content")
def file_content(file_id: str) -> Response:
    owner = authenticate()
    url = settings().database_url
    with transaction(url) as session:
        file = _owned(session, file_id, owner)
        size, name, stored_id = file.bytes, file.filename, file.id

    def chunks() -> Iterator[bytes]:
        yield from file_store.read(url, stored_id)

    safe_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:MAX_FILENAME]
    return Response(
        chunks(),
        mimetype="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{safe_name}"',
            "Cache-Control": "no-store",
        },
    )


@bp.delete("/files/<file_id>")
def delete_file(file_id: str) -> Response:
    owner = authenticate()
    with transaction(settings().database_url) as session:
        file = _owned(session, file_id, owner)
        file_rows.remove(session, file.id)
    return jsonify(FileDeleted(id=file_id, deleted=True).model_dump(mode="json"))
