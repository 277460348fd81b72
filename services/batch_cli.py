"""`tandem batch`: submit, watch, fetch and cancel batches over the REST API (through
`services.client.TandemClient`, whose retry policy covers every call); feed the queues
(`feed`); or run a JSONL file in this process with the local engine (`run`), resumably
(results appended durably with `services.core.jsonl`)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from services.client import APIError, TandemClient
from services.core import jsonl

if TYPE_CHECKING:
    import httpx

    from services.core.engines import Engines

FINAL = ("completed", "failed", "cancelled")
API_HELP = "API base URL (env TANDEM_API_URL)"
KEY_HELP = "API key (env TANDEM_API_KEY)"
T = TypeVar("T")


def register(cli: click.Group) -> None:
    cli.add_command(batch)


class Fail(click.ClickException):
    def format_message(self) -> str:
        return self.message


@click.group(
    help="Batches of questions: over the API (submit, status, results, cancel, list),"
    " or in this process (run)."
)
def batch() -> None:
    pass


def api_options(command):
    command = click.option("--key", envvar="TANDEM_API_KEY", required=True, help=KEY_HELP)(command)
    return click.option(
        "--api",
        envvar="TANDEM_API_URL",
        default="http://127.0.0.1:8000",
        show_default=True,
        help=API_HELP,
    )(command)


def _api(call: Callable[[], T]) -> T:
    """The call's result, or its APIError as a one-line error (plus a batch's line errors)."""
    try:
        return call()
    except APIError as error:
        lines = [str(error)]
        lines += [f"  line {e['line']}: {e['error']}" for e in error.problem.get("errors", [])[:10]]
        raise Fail("\n".join(lines)) from None


# --- over the API -----------------------------------------------------------------------


@batch.command(help="Upload a JSONL file (one {custom_id, question[, strategy, params]} a line).")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--strategy", help="Default strategy for lines without one (default tandem)")
@click.option("--params", "params_json", help="Default job params, a JSON object")
@click.option(
    "--idempotency-key",
    help="Idempotency-Key of the upload (default: a new one, reused by its own retries)",
)
@click.option("--wait", is_flag=True, help="Show a progress bar until the batch ends")
@api_options
def submit(
    file: Path,
    strategy: str | None,
    params_json: str | None,
    idempotency_key: str | None,
    wait: bool,
    api: str,
    key: str,
) -> None:
    with TandemClient(api, key) as client:
        created = _api(lambda: client.upload_batch(file, strategy, params_json, idempotency_key))
        _describe_upload(created)
        if wait:
            final = watch(client, created["id"], created["lines"]["valid"])
            click.echo(summary(final))


def _upload(
    http: httpx.Client, file: Path, query: dict[str, str], headers: dict[str, str]
) -> dict[str, Any]:
    """`submit`'s upload through an existing httpx.Client (tests drive the API in-process):
    `TandemClient.upload_batch` with the query's defaults and the headers' key."""
    client = TandemClient.over(http)
    return _api(
        lambda: client.upload_batch(
            file, query.get("strategy"), query.get("params"), headers.get("Idempotency-Key")
        )
    )


def _describe_upload(created: dict[str, Any]) -> None:
    lines = created["lines"]
    click.echo(
        f"batch {created['id']}: {lines['total']} lines, {lines['valid']} jobs, "
        f"{lines['invalid']} invalid"
    )
    for error in created["errors"][:10]:
        click.echo(f"  line {error['line']}: {error['error']}", err=True)
    if lines["invalid"] > 10:
        click.echo(f"  ... and {lines['invalid'] - 10} more (see the results)", err=True)


def watch(client: TandemClient, batch_id: str, total: int, interval: float = 1.0) -> dict[str, Any]:
    """Poll the batch with a progress bar (done / failed / cost / ETA) until it ends."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="job", desc=batch_id[:16], dynamic_ncols=True)
    try:
        while True:
            state = _api(lambda: client.get_batch(batch_id))
            counts = state["counts"] or {}
            done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
            bar.update(done - bar.n)
            bar.set_postfix(
                failed=counts.get("failed", 0),
                tflops=f"{(state['cost'] or {}).get('tflops', 0):.4g}",
                status=state["status"],
                refresh=False,
            )
            if state["status"] in FINAL:
                return state
            time.sleep(interval)
    except KeyboardInterrupt:
        raise Fail(
            f"stopped watching; batch {batch_id} goes on "
            f"(`tandem batch status {batch_id}`, `tandem batch cancel {batch_id}`)"
        ) from None
    finally:
        bar.close()


def summary(state: dict[str, Any]) -> str:
    counts = state.get("counts") or {}
    cost = state.get("cost") or {}
    parts = [f"batch {state['id']}: {state['status']}"]
    if state.get("failure"):
        parts.append(f"({state['failure']})")
    parts.append(
        ", ".join(f"{counts[name]} {name}" for name in counts if counts[name]) or "no jobs"
    )
    if cost:
        parts.append(
            f"cost {cost.get('tflops', 0):.4g} TFLOPs, "
            f"{cost.get('generated_tokens', 0)} generated tokens"
        )
    if state.get("eta_s"):
        parts.append(f"eta {state['eta_s']:.0f}s")
    return " | ".join(parts)


@batch.command(help="Show a batch's status, counts, cost and ETA.")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the batch as JSON")
@api_options
def status(batch_id: str, as_json: bool, api: str, key: str) -> None:
    with TandemClient(api, key) as client:
        state = _api(lambda: client.get_batch(batch_id))
    click.echo(json.dumps(state, indent=2) if as_json else summary(state))


@batch.command("list", help="List your batches, newest first.")
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True)
@api_options
def list_(limit: int, api: str, key: str) -> None:
    with TandemClient(api, key) as client:
        page = _api(lambda: client.list_batches(limit))
    for state in page["data"]:
        click.echo(f"{state['created_at'][:19]}  {summary(state)}")


@batch.command(help="Download results as JSONL, one line per input line, in input order.")
@click.argument("batch_id")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout"
)
@api_options
def results(batch_id: str, output: Path | None, api: str, key: str) -> None:
    def download() -> None:
        with client.batch_results(batch_id) as stream:
            _save(stream.chunks, output, stream.batch_status)

    with TandemClient(api, key) as client:
        _api(download)


def _save(chunks: Iterator[bytes], output: Path | None, status: str | None) -> None:
    if output is None:
        stream = click.get_binary_stream("stdout")
        for chunk in chunks:
            stream.write(chunk)
        return
    lines = 0
    with output.open("wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
            lines += chunk.count(b"\n")
    click.echo(f"wrote {lines} results to {output} (batch {status})", err=True)


@batch.command(help="Cancel a batch: queued jobs end, running ones stop at their next stage.")
@click.argument("batch_id")
@api_options
def cancel(batch_id: str, api: str, key: str) -> None:
    with TandemClient(api, key) as client:
        state = _api(lambda: client.cancel_batch(batch_id))
    click.echo(summary(state))


# --- the feeder -------------------------------------------------------------------------


@batch.command(
    help="Feed batches' jobs to the queues as they drain (the reconciler does this "
    "too, each pass) and finalize finished batches."
)
@click.option(
    "--interval", type=float, default=1.0, show_default=True, help="Seconds between passes"
)
@click.option("--once", is_flag=True, help="One pass, then exit")
def feed(interval: float, once: bool) -> None:
    import logging

    from services import batches
    from services.broker import Broker
    from services.settings import get_settings
    from workers.tasks import enqueue

    settings = get_settings()
    broker = Broker(settings.redis_url, cache_s=0)
    log = logging.getLogger("tandem.feeder")
    while True:
        try:
            fed = batches.feed(settings, enqueue, broker.depth, broker.capacity)
            if once:
                click.echo(f"fed {fed} job(s)")
                return
        except Exception as error:  # keep feeding through a database or broker outage
            if once:
                raise
            log.warning("feed pass failed: %s", error)
        time.sleep(interval)


# --- embedded ---------------------------------------------------------------------------


@batch.command(
    help="Run a JSONL file in this process on the local engine, many questions at once "
    "(so the engine batches them). Resumable: custom_ids already in OUT are skipped."
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--strategy", help="Default strategy for lines without one (default tandem)")
@click.option("--params", "params_json", help="Default job params, a JSON object")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    help="Jobs at once. Default: TANDEM_LOCAL_MAX_BATCH",
)
def run(
    file: Path, output: Path, strategy: str | None, params_json: str | None, concurrency: int | None
) -> None:
    from services.settings import get_settings

    settings = get_settings()
    outcome = run_file(file, output, strategy, params_json, concurrency or settings.local_max_batch)
    click.echo(
        f"{outcome['succeeded']} succeeded, {outcome['failed']} failed, "
        f"{outcome['invalid']} invalid, {outcome['skipped']} already in {output}",
        err=True,
    )


def run_file(
    file: Path,
    output: Path,
    strategy: str | None,
    params_json: str | None,
    concurrency: int,
    progress: bool = True,
    engines: Engines | None = None,
) -> dict[str, int]:
    """Run every new line of `file`, appending one result a line to `output` (in completion
    order; each result names its `line`). Returns counts by outcome. Loads the models
    unless given already-loaded `engines` (which are then left open)."""
    from services.batches import parse_defaults
    from services.core.engines import Engines
    from services.settings import get_settings

    settings = get_settings()
    defaults = parse_defaults(strategy, params_json, settings.max_question_chars)
    done_ids, done_lines = _already_done(output)
    owned = engines is None
    engines = engines or Engines(settings)
    try:
        with _Sink(output, _count_lines(file), progress) as sink:
            _run_lines(file, defaults, settings, engines, sink, done_ids, done_lines, concurrency)
            return sink.counts
    finally:
        if owned:
            engines.close()


def _run_lines(file, defaults, settings, engines, sink, done_ids, done_lines, concurrency) -> None:
    from services.batches import Limits, LineError, LineReader, parse_lines

    limits = Limits()
    seen: dict[str, int] = {}
    slots = threading.BoundedSemaphore(concurrency * 2)  # lines read ahead: memory stays flat
    with file.open("rb") as source, ThreadPoolExecutor(concurrency) as pool:
        reader = LineReader(source, limits.max_line_bytes)
        for parsed in parse_lines(reader, defaults, settings.max_question_chars, limits):
            if parsed.custom_id in done_ids or parsed.line in done_lines:
                sink.skip()
                continue
            if isinstance(parsed, LineError):
                sink.write(_invalid(parsed.line, parsed.custom_id, parsed.error))
                continue
            if parsed.custom_id in seen:
                first = seen[parsed.custom_id]
                message = f"duplicate custom_id {parsed.custom_id!r} (first used on line {first})"
                sink.write(_invalid(parsed.line, parsed.custom_id, message))
                continue
            seen[parsed.custom_id] = parsed.line
            slots.acquire()
            future = pool.submit(_run_one, parsed, engines)
            future.add_done_callback(lambda f: (sink.write(f.result()), slots.release()))


def _run_one(parsed, engines) -> dict[str, Any]:
    from services.core.runner import run_job
    from services.storage.costs import SUM_FIELDS as COST_FIELDS

    try:
        result = run_job(parsed.request, engines)
    except Exception as error:
        return _result(
            parsed.line, parsed.custom_id, "failed", error=f"{type(error).__name__}: {error}"
        )
    cost = result.cost.to_dict()
    return _result(
        parsed.line,
        parsed.custom_id,
        "succeeded",
        answer=result.outcome.answer,
        cost={name: cost[name] for name in COST_FIELDS},
    )


def _result(line: int, custom_id: str | None, status: str, **fields: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "line": line,
        "job_id": None,
        "status": status,
        "answer": fields.get("answer"),
        "cost": fields.get("cost"),
        "error": fields.get("error"),
    }


def _invalid(line: int, custom_id: str | None, error: str) -> dict[str, Any]:
    return _result(line, custom_id, "invalid", error=error)


def _already_done(output: Path) -> tuple[set[str], set[int]]:
    """custom_ids (and, for lines without one, line numbers) that OUT already has. A line
    that is not a result (a torn one left by an older version) is passed over: redone."""
    ids: set[str] = set()
    lines: set[int] = set()
    for _, row in jsonl.read(output, skip_bad=True):
        if isinstance(row, dict) and isinstance(row.get("custom_id"), str):
            ids.add(row["custom_id"])
        elif isinstance(row, dict) and isinstance(row.get("line"), int):
            lines.add(row["line"])
    return ids, lines


def _count_lines(file: Path) -> int:
    with file.open("rb") as handle:
        return sum(1 for text in handle if text.strip())


class _Sink:
    """Appends results to OUT (one durable JSON line each, `services.core.jsonl`) and drives the
    progress bar."""

    def __init__(self, output: Path, total: int, progress: bool) -> None:
        self.output = output
        self.total = total
        self.progress = progress
        self.counts = {"succeeded": 0, "failed": 0, "invalid": 0, "skipped": 0}
        self.tflops = 0.0
        self._lock = threading.Lock()
        self._file: jsonl.Appender | None = None
        self._bar: Any = None

    def __enter__(self) -> _Sink:
        from tqdm import tqdm

        self._file = jsonl.Appender(self.output)
        self._bar = tqdm(total=self.total, unit="q", disable=not self.progress, dynamic_ncols=True)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._file is not None
        self._file.close()
        self._bar.close()

    def skip(self) -> None:
        with self._lock:
            self.counts["skipped"] += 1
            self._bar.update(1)

    def write(self, row: dict[str, Any]) -> None:
        assert self._file is not None
        with self._lock:
            self._file.append(row)
            self.counts[row["status"]] += 1
            self.tflops += (row["cost"] or {}).get("tflops", 0)
            self._bar.update(1)
            self._bar.set_postfix(
                failed=self.counts["failed"], tflops=f"{self.tflops:.4g}", refresh=False
            )
