"""`services.core.jsonl`, the durable append every resumable file uses: whole lines only, a torn
last line cut off when the file is next opened to append, never read as a record."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from services.core import jsonl


def test_a_torn_last_line_is_not_read_and_is_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    jsonl.append(path, {"id": 1})
    jsonl.append(path, {"id": "é"})
    with path.open("ab") as handle:  # a crash in the middle of a write
        handle.write(b'{"id": 3, "tex')
    torn = path.read_bytes()
    assert [row for _, row in jsonl.read(path)] == [{"id": 1}, {"id": "é"}]
    assert path.read_bytes() == torn  # reading changes nothing
    jsonl.append(path, {"id": 3})
    assert path.read_text(encoding="utf-8").splitlines() == ['{"id":1}', '{"id":"é"}', '{"id":3}']


def test_repair_finds_the_last_newline_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a":1}\n' + b"x" * 200_000)
    assert jsonl.repair(path) == 200_000 and path.read_bytes() == b'{"a":1}\n'
    assert jsonl.repair(path) == 0
    path.write_bytes(b"no newline at all")
    assert jsonl.repair(path) == len(b"no newline at all") and path.read_bytes() == b""
    assert jsonl.repair(tmp_path / "missing.jsonl") == 0


def test_a_complete_line_that_is_not_json_is_an_error_or_passed_over(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a":1}\n\nnot json\n\xff\xfe\n{"a":2}\n')
    with pytest.raises(jsonl.BadLine, match=r"rows\.jsonl line 3 is not JSON") as caught:
        list(jsonl.read(path))
    assert caught.value.number == 3
    assert list(jsonl.read(path, skip_bad=True)) == [(1, {"a": 1}), (5, {"a": 2})]
    assert list(jsonl.read(tmp_path / "missing.jsonl")) == []


def test_concurrent_appends_are_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    text = "y" * 5000  # longer than a pipe buffer's atomic write, to catch interleaving

    with jsonl.Appender(path) as rows:

        def write(worker: int) -> None:
            for n in range(50):
                rows.append({"worker": worker, "n": n, "text": text})

        threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    read = [row for _, row in jsonl.read(path)]
    assert len(read) == 400 and all(row["text"] == text for row in read)
    assert sorted((row["worker"], row["n"]) for row in read) == [
        (w, n) for w in range(8) for n in range(50)
    ]


def test_a_pipe_is_written_without_fsync() -> None:
    read_end, write_end = os.pipe()
    try:
        with jsonl.Appender(Path(f"/proc/self/fd/{write_end}")) as out:
            out.append({"ok": True})
        assert os.read(read_end, 100) == b'{"ok":true}\n'
    finally:
        os.close(read_end)
        os.close(write_end)
