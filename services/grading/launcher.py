"""The first code that runs inside the sandbox; the grader never imports it.

The sandbox (services/grading/sandbox.py) mounts this file read-only at /grader/launcher.py
and runs it with the sandbox's Python:

    python3 -I -B /grader/launcher.py STATUS_FD LIMITS_JSON

It sets the resource limits on itself (so they hold inside the sandbox's own user namespace,
see sandbox.py), runs /grader/program.py as a module named ``__candidate__`` (so a candidate's
``if __name__ == "__main__":`` block does not run, as in HumanEval's own harness), and writes
how the program ended, one JSON object per line, to the status pipe STATUS_FD:

    {"event": "started"}
    {"event": "completed"} | {"event": "exception", "type", "message", "line", "text"}
    | {"event": "exit", "code"} | {"event": "syntax_error", "message", "line", "text"}
    | {"event": "cpu_limit"}

It is the sandbox's PID 1 (bwrap ``--as-pid-1``): processes the program forks and leaves
behind are reparented to it, and it ignores signals it has no handler for, so it handles
SIGXCPU itself.

The pipe tells a program that ran to its end from one that left early (``os._exit(0)``
before the checks, a crash, a signal); it is not a defence against code written to forge it.
Standard library only: the sandbox sees nothing but the interpreter.
"""

import builtins
import json
import linecache
import os
import resource
import signal
import sys
import traceback

PROGRAM = "/grader/program.py"
NAME = "program.py"  # the file name tracebacks show for the program's lines


def main() -> None:
    status_fd = int(sys.argv[1])
    limits = json.loads(sys.argv[2])
    # Bound before the program runs: it may replace anything in os, json or sys.
    write, exit_now, getpid, dumps = os.write, os._exit, os.getpid, json.dumps

    def report(event: dict) -> None:
        try:  # noqa: SIM105 (no contextlib: the program may have replaced it)
            write(status_fd, (dumps(event) + "\n").encode())
        except Exception:
            pass

    main_pid = getpid()

    def cpu_limit(signum: int, frame: object) -> None:
        # The launcher is the sandbox's PID 1, and PID 1 ignores signals it has no handler
        # for: without this, the CPU soft limit would pass unnoticed until the hard one's
        # SIGKILL.
        if getpid() == main_pid:
            report({"event": "cpu_limit"})
        exit_now(1)

    signal.signal(signal.SIGXCPU, cpu_limit)
    for name, (soft, hard) in limits.items():
        _limit(getattr(resource, name), int(soft), int(hard))
    report({"event": "started"})

    with open(PROGRAM, encoding="utf-8", errors="replace") as handle:
        source = handle.read()
    linecache.cache[NAME] = (len(source), None, source.splitlines(True), NAME)
    try:
        code = compile(source, NAME, "exec")
    except (SyntaxError, ValueError) as error:  # ValueError: a NUL byte in the source
        report(
            {
                "event": "syntax_error",
                "message": f"{type(error).__name__}: {getattr(error, 'msg', None) or error}",
                "line": getattr(error, "lineno", None),
                "text": (getattr(error, "text", None) or "").strip()[:300],
            }
        )
        exit_now(2)

    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(code, namespace)
        outcome: dict = {"event": "completed"}
    except SystemExit as error:
        outcome = {"event": "exit", "code": _text(error.code, 100)}
    except BaseException as error:
        outcome = _describe(error)
    if getpid() != main_pid:  # a process the program forked got here: only the main one reports
        exit_now(0)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:  # noqa: SIM105
            stream.flush()
        except Exception:
            pass
    report(outcome)
    exit_now(0 if outcome["event"] == "completed" else 1)


def _limit(kind: int, soft: int, hard: int) -> None:
    """Set a limit, never above the hard limit inherited (lowering is all a process may do)."""
    _, inherited = resource.getrlimit(kind)
    if inherited != resource.RLIM_INFINITY:
        soft, hard = min(soft, inherited), min(hard, inherited)
    resource.setrlimit(kind, (soft, hard))


def _describe(error: BaseException) -> dict:
    """The exception and the innermost line of the program it came from."""
    line, text = None, ""
    try:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == NAME]
        if frames:
            line, text = frames[-1].lineno, (frames[-1].line or "").strip()
    except BaseException:
        pass
    return {
        "event": "exception",
        "type": _text(type(error).__name__, 100),
        "message": _text(error, 500),
        "line": line,
        "text": text[:300],
    }


def _text(value: object, limit: int) -> str:
    try:
        return str(value)[:limit]
    except BaseException:
        return "<unprintable>"


if __name__ == "__main__":
    main()
