"""Batches: many jobs from one JSONL upload, framework-free (the API and the CLI adapt it).

A batch is one `batches` row plus one `jobs` row per valid input line (`batch_id`, `line`,
`custom_id`). Invalid lines are kept in the batch's `errors` (line number, custom_id,
reason) and never become jobs.

    parsing.py    the upload's defaults and lines, each validated like a single job
    ingest.py     storing an upload (one COPY), duplicates, rejection of a whole upload
    feeder.py     putting batch jobs on the queues: shallow, fair between owners, leased
    progress.py   counts, cost so far, ETA; results in input order
    lifecycle.py  cancel, finalize, fail uploads that died while validating

Row-level SQL lives in `services.storage.batch_rows`.
"""

from services.batches.feeder import feed, fill
from services.batches.ingest import check_owner_room, ingest
from services.batches.lifecycle import cancel, finalize_if_done
from services.batches.parsing import (
    MAX_CUSTOM_ID,
    BatchRejected,
    Defaults,
    Limits,
    LineError,
    LineReader,
    parse_defaults,
    parse_lines,
)
from services.batches.progress import Progress, progress, results

__all__ = [
    "MAX_CUSTOM_ID",
    "BatchRejected",
    "Defaults",
    "Limits",
    "LineError",
    "LineReader",
    "Progress",
    "cancel",
    "check_owner_room",
    "feed",
    "fill",
    "finalize_if_done",
    "ingest",
    "parse_defaults",
    "parse_lines",
    "progress",
    "results",
]
