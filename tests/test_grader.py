"""The code grader with real bubblewrap and hostile programs (no mocks, no stand-ins).

Each hostile case is graded the way a model's answer is: a small problem of our own whose
check calls the candidate. The assertions look from the host: files that must not appear,
a listener that must get no connection, a sentinel process (running as the sandbox's own
uid when the tests run as root) that must survive, the grader's memory and wall time, and
that the machine can still start processes afterwards.

HumanEval's canonical solutions are read from ../shared/data/humaneval.jsonl when that file
is there (it is not part of the repository); the other problems are our own.
"""

from __future__ import annotations

import ast
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.grading.humaneval import (
    DatasetError,
    Grader,
    Problem,
    build_program,
    load_problems,
    load_solutions,
)
from services.grading.sandbox import (
    NOBODY,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    find_bwrap,
)
from tests.infra import BIN, ROOT

HUMANEVAL = ROOT.parent / "shared" / "data" / "humaneval.jsonl"
TIMEOUT_S = 3.0
WALL_BOUND_S = TIMEOUT_S + 3.0  # timeout, plus the kill's grace, plus a loaded machine's slack
SKIP_HINT = "bubblewrap (bwrap) is not installed: run scripts/install_test_deps.sh"


@pytest.fixture(scope="module")
def grader() -> Grader:
    """Skips only where bwrap is not installed; a bwrap that is there but cannot build the
    sandbox is a failure, not a skip (a broken sandbox must not pass as a missing one)."""
    try:
        find_bwrap()
    except SandboxUnavailable as error:
        pytest.skip(f"{SKIP_HINT} ({error})")
    return Grader(SandboxLimits(timeout_s=TIMEOUT_S), workers=2)


def probe(test: str = "def check(candidate):\n    assert candidate() == 'ok'\n") -> Problem:
    """A problem asking for ``def probe():``, checked by ``test``."""
    return Problem(
        task_id=f"probe/{uuid.uuid4().hex[:6]}",
        prompt='def probe():\n    """Return \'ok\'."""\n',
        entry_point="probe",
        test=test,
    )


def candidate(body: str) -> str:
    return "def probe():\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"


def graded(grader: Grader, body: str, **problem_args: str):
    started = time.monotonic()
    grade = grader.grade(probe(**problem_args), candidate(body))
    wall = time.monotonic() - started
    assert wall < WALL_BOUND_S, f"the grader took {wall:.1f} s"
    assert grade.seconds <= wall
    return grade


def machine_can_start_processes() -> None:
    done = subprocess.run(["/bin/sh", "-c", "echo alive"], capture_output=True, text=True, timeout=10)
    assert done.stdout == "alive\n"


def sandbox_processes_left() -> list[int]:
    """Host processes running as the sandbox's uid (zombies too: none may be left for the
    host's init to reap)."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(NOBODY)]:
            left.append(int(entry.name))
    return left


def wait_until_no_sandbox_processes(exclude: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    if os.geteuid() != 0:
        return  # the sandbox runs as our own uid: its processes cannot be told from ours
    deadline = time.monotonic() + 2
    while set(sandbox_processes_left()) - exclude and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(sandbox_processes_left()) - exclude


@pytest.fixture
def sentinel() -> Iterator[subprocess.Popen[bytes]]:
    """A host process the sandbox must not be able to kill: as root, it runs as the
    sandbox's own uid, so only the PID namespace protects it."""
    kwargs = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
    process = subprocess.Popen(["sleep", "60"], **kwargs)  # type: ignore[call-overload]
    yield process
    process.kill()
    process.wait()


# ---------------------------------------------------------------- hostile programs


def test_infinite_loop_times_out_within_the_limit(grader: Grader) -> None:
    grade = graded(grader, "while True:\n    pass")
    assert grade.verdict == "timeout", grade.reason
    assert f"{TIMEOUT_S:g} s" in grade.reason
    assert TIMEOUT_S <= grade.seconds < TIMEOUT_S + 2.5
    wait_until_no_sandbox_processes()


def test_fork_bomb_is_contained_and_the_machine_still_forks(
    grader: Grader, sentinel: subprocess.Popen[bytes]
) -> None:
    spinning = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    grade = graded(grader, spinning)
    assert grade.verdict == "timeout", grade.reason
    machine_can_start_processes()
    wait_until_no_sandbox_processes(exclude={sentinel.pid})
    assert sentinel.poll() is None

    plain = graded(grader, "import os\nwhile True:\n    os.fork()")  # dies on its first EAGAIN
    assert plain.verdict == "failed", plain.reason
    assert "BlockingIOError" in plain.reason and "os.fork()" in plain.reason
    machine_can_start_processes()


def test_process_limit_is_per_sandbox(grader: Grader) -> None:
    """A fork bomb in one sandbox does not use up the process limit of another running at
    the same time (RLIMIT_NPROC is counted per user namespace, not per uid)."""
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    threads = "import threading\nts = [threading.Thread(target=lambda: None) for _ in range(8)]\n" \
        "[t.start() for t in ts]\n[t.join() for t in ts]\nreturn 'ok'"  # fmt: skip
    items = [(probe(), candidate(bomb)), (probe(), candidate(threads))]  # two workers: together
    bomb_grade, threads_grade = list(grader.grade_many(items))
    assert bomb_grade.verdict == "timeout", bomb_grade.reason
    assert threads_grade.verdict == "passed", threads_grade.reason


def test_memory_bombs_fail_with_memory_error(grader: Grader) -> None:
    at_once = graded(grader, "x = bytearray(8 * 1024 ** 3)\nreturn 'ok'")
    assert at_once.verdict == "failed", at_once.reason
    assert "MemoryError" in at_once.reason and "512 MiB" in at_once.reason
    growing = graded(grader, "chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))")
    assert growing.verdict == "failed" and "MemoryError" in growing.reason, growing.reason
    machine_can_start_processes()


def test_writes_outside_the_working_directory_fail_and_leave_nothing(grader: Grader) -> None:
    marker = f"tandem-grader-escape-{uuid.uuid4().hex}"
    targets = [
        f"/tmp/{marker}",
        str(ROOT / marker),
        f"/root/{marker}",
        f"/etc/{marker}",
        f"/{marker}",
        f"/usr/{marker}",
        f"/dev/{marker}",
        f"/dev/shm/{marker}",
        f"/proc/{marker}",
    ]
    body = f"""
    import json, os
    written = []
    for path in {targets!r}:
        try:
            with open(path, "w") as handle:
                handle.write("escaped")
            written.append(path)
        except OSError:
            pass
    with open("inside.txt", "w") as handle:
        handle.write("fine")
    print(json.dumps({{"written": written, "cwd": os.getcwd(),
                      "inside": open("inside.txt").read()}}))
    return "ok"
    """
    grade = graded(grader, body)
    assert grade.verdict == "passed", grade.reason
    seen = json.loads(grade.result.stdout)
    assert seen == {"written": [], "cwd": "/sandbox", "inside": "fine"}
    for path in targets:
        assert not os.path.exists(path), path
    plain = graded(grader, f"open('/tmp/{marker}', 'w').write('x')\nreturn 'ok'")
    assert plain.verdict == "failed" and "Error" in plain.reason, plain.reason
    assert not os.path.exists(f"/tmp/{marker}")


def test_the_host_filesystem_is_not_visible(grader: Grader) -> None:
    body = f"""
    import os
    print(sorted(os.listdir("/")))
    for path in ["/work", "/root", "/home", "/etc", "/tmp", "/var", {str(ROOT)!r},
                 {str(Path.home())!r}, "/sys"]:
        assert not os.path.exists(path), path
    return "ok"
    """
    grade = graded(grader, body)
    assert grade.verdict == "passed", grade.reason


def test_no_network_not_even_the_database_port(grader: Grader) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0)
        port = listener.getsockname()[1]
        body = f"""
        import json, socket
        outcomes = {{}}
        for host, port in [("127.0.0.1", 5432), ("127.0.0.1", {port}), ("1.1.1.1", 53)]:
            try:
                socket.create_connection((host, port), timeout=1).close()
                outcomes[f"{{host}}:{{port}}"] = "connected"
            except OSError as error:
                outcomes[f"{{host}}:{{port}}"] = type(error).__name__
        print(json.dumps(outcomes))
        return "ok"
        """
        grade = graded(grader, body)
        assert grade.verdict == "passed", grade.reason
        outcomes = json.loads(grade.result.stdout)
        assert outcomes["127.0.0.1:5432"] == "ConnectionRefusedError"
        assert outcomes[f"127.0.0.1:{port}"] == "ConnectionRefusedError"
        assert outcomes["1.1.1.1:53"] != "connected"
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the host's listener
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the host's can
    plain = graded(grader, "import socket\nsocket.create_connection(('127.0.0.1', 5432))")
    assert plain.verdict == "failed" and "ConnectionRefusedError" in plain.reason, plain.reason


def test_the_environment_is_empty(grader: Grader, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_SECRET", "grader-secret-value")
    monkeypatch.setenv("TANDEM_DATABASE_URL", "postgresql://user:grader-secret-value@db/x")
    body = """
    import json, os
    environs = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            environs[pid] = open(f"/proc/{pid}/environ", "rb").read().decode()
    print(json.dumps({"env": dict(os.environ), "procs": environs}))
    return "ok"
    """
    grade = graded(grader, body)
    assert grade.verdict == "passed", grade.reason
    assert "grader-secret-value" not in grade.result.stdout
    seen = json.loads(grade.result.stdout)
    assert set(seen["env"]) <= {"PATH", "LANG", "HOME", "TMPDIR", "PWD", "LC_CTYPE"}
    assert not any("TANDEM" in environ for environ in seen["procs"].values())


def test_killing_the_parent_and_everything_visible_harms_nothing_outside(
    grader: Grader, sentinel: subprocess.Popen[bytes]
) -> None:
    body = f"""
    import os, signal
    tried = []
    for pid in [os.getppid(), 1, -1, {os.getpid()}, {os.getppid()}, {sentinel.pid}]:
        try:
            os.kill(pid, signal.SIGKILL)
            tried.append(pid)
        except OSError:
            pass
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
    print(tried, sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
    return "ok"
    """
    grade = graded(grader, body)
    # The sandbox's init ignores SIGKILL from inside its namespace, and the host's PIDs
    # do not exist there: the program carries on and its check passes.
    assert grade.verdict == "passed", (grade.reason, grade.result.stdout)
    assert sentinel.poll() is None
    machine_can_start_processes()
    wait_until_no_sandbox_processes(exclude={sentinel.pid})


def test_megabytes_of_output_are_clipped_in_bounded_memory(grader: Grader) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    body = """
    import sys
    line = "x" * 1023 + "\\n"
    for _ in range(48 * 1024):
        sys.stdout.write(line)
        sys.stderr.write(line)
    print("the end")
    return "ok"
    """
    grade = graded(grader, body)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grade.verdict == "passed", grade.reason
    assert grade.result.output_bytes >= 96 * 1024 * 1024
    cap = grader.sandbox.limits.max_output_bytes
    assert len(grade.result.stdout.encode()) <= cap and len(grade.result.stderr.encode()) <= cap
    assert grade.result.stdout.endswith("the end\n") and grade.result.clipped
    assert grown_mib < 16, f"the grader's peak memory grew by {grown_mib:.0f} MiB"


def test_exit_before_the_checks_is_not_a_pass(grader: Grader) -> None:
    quiet = graded(grader, "import os\nos._exit(0)")
    assert quiet.verdict == "failed" and "before the program finished" in quiet.reason, quiet.reason
    called = graded(grader, "import sys\nsys.exit(0)")
    assert called.verdict == "failed" and "exit(0)" in called.reason, called.reason


def test_limits_are_in_force_inside(grader: Grader) -> None:
    body = """
    import resource
    print({name: resource.getrlimit(getattr(resource, name))
           for name in ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC",
                        "RLIMIT_NOFILE", "RLIMIT_CORE"]})
    return "ok"
    """
    grade = graded(grader, body)
    assert grade.verdict == "passed", grade.reason
    expected = {name: tuple(pair) for name, pair in grader.sandbox.limits.rlimits().items()}
    assert ast.literal_eval(grade.result.stdout) == expected
    too_big = graded(grader, "open('big', 'wb').write(b'x' * (17 << 20))\nreturn 'ok'")
    assert too_big.verdict == "failed" and "File too large" in too_big.reason, too_big.reason


UNPRIVILEGED_GRADER = """
import json, os
from services.grading.sandbox import Sandbox, SandboxLimits
sandbox = Sandbox(SandboxLimits(timeout_s=3, max_processes=8))
bomb = sandbox.run(
    "import os, time\\nn = 0\\ntry:\\n    while True:\\n        if os.fork() == 0:\\n"
    "            time.sleep(10)\\n            os._exit(0)\\n        n += 1\\n"
    "except OSError:\\n    print(n)\\n"
)
network = sandbox.run("import socket\\nsocket.create_connection(('127.0.0.1', 5432))")
print(json.dumps({"uid": os.getuid(), "forks": bomb.stdout.strip(), "bomb": bomb.verdict,
                  "network": network.reason}))
"""


def test_an_unprivileged_grader_sandboxes_the_same(grader: Grader) -> None:
    """As any other user than root (docs/grading.md): bwrap builds the sandbox through an
    unprivileged user namespace, and the process limit still counts only that sandbox."""
    if os.geteuid() != 0:
        pytest.skip("this whole suite already runs unprivileged")
    if not (os.path.exists("/usr/bin/python3") and shutil.which("setpriv")):
        pytest.skip("needs /usr/bin/python3 and setpriv (util-linux)")
    if any(not folder.stat().st_mode & 0o001 for folder in [ROOT, *ROOT.parents]):
        pytest.skip(f"{ROOT} is not reachable by other users")
    uid = 64_000  # a uid no account on the machine uses
    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         "/usr/bin/python3", "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
         + UNPRIVILEGED_GRADER],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["uid"] == uid and seen["bomb"] == "passed"
    assert seen["forks"] == "7"  # 8 processes: the launcher and 7 children, then EAGAIN
    assert seen["network"].startswith("ConnectionRefusedError")


# ---------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def humaneval() -> list[Problem]:
    if not HUMANEVAL.exists():
        pytest.skip(f"{HUMANEVAL} is not here (the shared data folder)")
    return load_problems(HUMANEVAL)


def test_every_canonical_solution_passes(grader: Grader, humaneval: list[Problem]) -> None:
    started = time.monotonic()
    grades = list(grader.grade_many((problem, None) for problem in humaneval))
    elapsed = time.monotonic() - started
    assert [grade.task_id for grade in grades] == [problem.task_id for problem in humaneval]
    failures = [(g.task_id, g.verdict, g.reason) for g in grades if g.verdict != "passed"]
    assert not failures
    assert len(grades) == 124 and elapsed < 120


def test_a_wrong_solution_fails_with_the_failing_assertion(
    grader: Grader, humaneval: list[Problem]
) -> None:
    problem = humaneval[0]  # has_close_elements
    grade = grader.grade(problem, "    return True\n")
    assert grade.verdict == "failed", grade.reason
    assert grade.reason.startswith("AssertionError (line ")
    assert "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False" in grade.reason

    reply = f"Here you go:\n```python\ndef {problem.entry_point}(numbers, threshold):\n" \
        "    return numbers[10]\n```\n"  # fmt: skip
    grade = grader.grade(problem, reply)
    assert grade.verdict == "failed", grade.reason
    assert "IndexError: list index out of range" in grade.reason and "numbers[10]" in grade.reason


def test_replies_functions_and_completions_are_all_graded(grader: Grader) -> None:
    problem = Problem(
        task_id="own/palindrome",
        prompt=(
            "def is_palindrome(text: str) -> bool:\n    return text == text[::-1]\n\n\n"
            "def longest_palindrome(words: list) -> str:\n"
            '    """The longest word that is a palindrome, "" if none."""\n'
        ),
        entry_point="longest_palindrome",
        test=(
            "def check(candidate):\n"
            "    assert candidate(['ab', 'aba', 'x']) == 'aba'\n"
            "    assert candidate(['ab']) == ''\n"
        ),
        canonical_solution=(
            "    found = [w for w in words if is_palindrome(w)]\n"
            "    return max(found, key=len) if found else ''\n"
        ),
    )
    function = (
        "def longest_palindrome(words):\n"
        "    found = [w for w in words if is_palindrome(w)]\n"
        "    return max(found, key=len, default='')\n"
    )
    reply = f"Use the helper.\n\n```python\n{function}\nprint(longest_palindrome(['aa']))\n```\nDone."
    assert grader.grade(problem, function).verdict == "passed"  # the prompt's helper is there
    assert grader.grade(problem, reply).verdict == "passed"
    assert grader.grade_canonical(problem).verdict == "passed"
    none = grader.grade(problem, "I am not sure how to do this.")
    assert none.verdict == "error" and "no function named longest_palindrome" in none.reason
    assert none.seconds == 0 and none.result is None
    broken = grader.grade(problem, "    return [w for w in words\n")
    assert broken.verdict == "error" and "SyntaxError" in broken.reason
    cut_off = grader.grade(problem, "```python\ndef longest_palindrome(words):\n    return [w\n```")
    assert cut_off.verdict == "error"
    assert cut_off.reason == "the function longest_palindrome in the reply does not parse"


def test_programs_are_built_from_the_prompt_and_the_candidate() -> None:
    problem = Problem(
        task_id="own/1",
        prompt='import math\n\nSCALE = 2\n\n\ndef f(x):\n    """Scaled root."""\n',
        entry_point="f",
        test="def check(candidate):\n    assert candidate(4) == 4\n",
    )
    program, reason = build_program(problem, "def f(x):\n    return SCALE * math.sqrt(x)\n")
    assert reason == "" and program is not None
    assert program.startswith("import math\n\nSCALE = 2\n") and '"""Scaled root."""' not in program
    assert program.rstrip().endswith("check(f)")
    completion, _ = build_program(problem, "    return SCALE * math.sqrt(x)\n")
    assert completion is not None and completion.startswith(problem.prompt)
    missing, reason = build_program(problem, "def g(x):\n    return x\n")
    assert missing is None and "no function named f" in reason


def test_malformed_dataset_lines_are_named(tmp_path: Path) -> None:
    good = {"task_id": "a", "prompt": "def f():\n", "entry_point": "f", "test": "", "canonical_solution": ""}
    cases = {
        "not json\n": ":1: not valid JSON",
        "[1, 2]\n": ":1: a line must be a JSON object",
        json.dumps({"task_id": "a"}) + "\n": ":1: missing fields prompt, entry_point, test",
        json.dumps({**good, "test": 3}) + "\n": ":1: field test must be a string",
        json.dumps({**good, "entry_point": "f()"}) + "\n": ":1: entry_point 'f()' is not",
        json.dumps(good) + "\n\n" + json.dumps(good) + "\n": ":3: task_id 'a' appears twice",
        "\n": ": no problems in the file",
    }
    path = tmp_path / "data.jsonl"
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(DatasetError, match=re.escape(f"{path}{message}")):
            load_problems(path)
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_problems(path)
    path.write_text(json.dumps({"task_id": "a"}) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:1: missing field completion")):
        load_solutions(path)


def test_grading_is_parallel_and_bounded(grader: Grader) -> None:
    sleeper = "import time\ntime.sleep(1)\nreturn 'ok'"
    items = [(probe(), candidate(sleeper)) for _ in range(4)]
    started = time.monotonic()
    grades = list(grader.grade_many(items))  # two workers
    elapsed = time.monotonic() - started
    assert [g.task_id for g in grades] == [problem.task_id for problem, _ in items]
    assert all(g.verdict == "passed" for g in grades)
    assert 2.0 <= elapsed < 3.9  # two at a time: two rounds of one second, not four, not one


# ---------------------------------------------------------------- refusing to run unsandboxed


def test_no_bwrap_is_refused_naming_the_package() -> None:
    with pytest.raises(SandboxUnavailable, match="install the package `bubblewrap`"):
        find_bwrap(search_path="/nonexistent")


def test_a_sandbox_that_cannot_start_is_refused(grader: Grader, tmp_path: Path) -> None:
    """An interpreter bwrap cannot mount (as root: under pytest's 0700 folder, unreadable to
    nobody; otherwise: a Python without its standard library): refused at construction."""
    fake = tmp_path / "python" / "bin" / "python3"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(Path(os.path.realpath("/usr/bin/python3")).read_bytes())
    fake.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="the sandbox cannot run a program here"):
        Sandbox(SandboxLimits(timeout_s=TIMEOUT_S), python=str(fake))


# ---------------------------------------------------------------- tandem grade


def tandem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tandem"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_grade_command_prints_one_json_line_per_item(grader: Grader, tmp_path: Path) -> None:
    dataset = tmp_path / "problems.jsonl"
    problems = [
        {
            "task_id": "own/add",
            "prompt": 'def add(a: int, b: int) -> int:\n    """a + b"""\n',
            "entry_point": "add",
            "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
            "canonical_solution": "    return a + b\n",
        },
        {
            "task_id": "own/loop",
            "prompt": 'def spin() -> None:\n    """Never returns."""\n',
            "entry_point": "spin",
            "test": "def check(candidate):\n    candidate()\n",
            "canonical_solution": "    while True:\n        pass\n",
        },
    ]
    dataset.write_text("".join(json.dumps(p) + "\n" for p in problems))
    canonical = tandem("grade", "--dataset", str(dataset), "--timeout", "1", "--workers", "2")
    assert canonical.returncode == 0, canonical.stderr
    lines = [json.loads(line) for line in canonical.stdout.splitlines()]
    assert [(row["task_id"], row["verdict"]) for row in lines] == [
        ("own/add", "passed"),
        ("own/loop", "timeout"),
    ]
    assert all(set(row) == {"task_id", "verdict", "reason", "seconds"} for row in lines)
    assert "2 items: 1 passed, 0 failed, 1 timeout, 0 error" in canonical.stderr

    solutions = tmp_path / "solutions.jsonl"
    replies = [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "    return a - b\n",
        "No idea.",
    ]
    solutions.write_text("".join(json.dumps({"task_id": "own/add", "completion": r}) + "\n" for r in replies))
    given = tandem("grade", "--dataset", str(dataset), "--solutions", str(solutions))
    assert given.returncode == 0, given.stderr
    verdicts = [json.loads(line)["verdict"] for line in given.stdout.splitlines()]
    assert verdicts == ["passed", "failed", "error"]
    strict = tandem("grade", "--dataset", str(dataset), "--solutions", str(solutions), "--strict")
    assert strict.returncode == 2
    assert [json.loads(line)["verdict"] for line in strict.stdout.splitlines()] == verdicts


def test_grade_command_errors_are_one_line(tmp_path: Path) -> None:
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"task_id": "x"}\n')
    bad = tandem("grade", "--dataset", str(dataset))
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("tandem: error: ") and bad.stderr.count("\n") == 1
    assert "missing fields" in bad.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"task_id": "a", "prompt": "def f():\n", "entry_point": "f", "test": ""}) + "\n"
    )
    solutions = tmp_path / "solutions.jsonl"
    solutions.write_text(json.dumps({"task_id": "b", "completion": ""}) + "\n")
    unknown = tandem("grade", "--dataset", str(good), "--solutions", str(solutions))
    assert unknown.returncode == 1
    assert f"{solutions}:1: task_id 'b' is not in the dataset" in unknown.stderr


def test_the_grader_is_not_in_the_api_process() -> None:
    """The API never imports the grading package (code runs only in grading processes)."""
    code = (
        "import sys\nfrom services.api import create_app\ncreate_app\n"
        "print(sorted(m for m in sys.modules if m.startswith('services.grading')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_signals_are_named_in_the_reason(grader: Grader) -> None:
    grade = graded(grader, "import ctypes\nctypes.string_at(0)")  # a real segmentation fault
    assert grade.verdict == "failed" and grade.result.signal == "SIGSEGV", grade.reason
    assert "killed by SIGSEGV" in grade.reason
