"""Run an untrusted Python program in a bubblewrap sandbox, in its own process, never here.

``Sandbox(limits).run(source)`` writes nothing to disk: the program and the launcher
(launcher.py) reach the sandbox through memfds that bwrap mounts read-only. What each layer
gives (docs/grading.md has the whole picture and what an unprivileged host needs):

- **bwrap namespaces** (``--unshare-all --unshare-user``): its own network namespace (only a
  loopback with nothing listening: 127.0.0.1:5432 is refused, the outside unreachable), its
  own PID namespace (it sees only its own processes; when its PID 1, the launcher, ends or
  is killed, the kernel kills every process in it), IPC, UTS and cgroup
  namespaces, and a user namespace in which it holds no capabilities (``--disable-userns``:
  it cannot nest another).
- **filesystem**: a new root with only /usr (and the /bin, /lib... links into it) read-only,
  a fresh /proc and a minimal read-only /dev; the working directory /sandbox is a tmpfs of
  ``workdir_mb``, the only writable place, gone when the sandbox ends. No /etc, /home, /root,
  /tmp, /work or repository checkout exists inside.
- **environment**: emptied (``--clearenv``); only PATH, LANG, HOME and TMPDIR are set. The
  bwrap process itself is started with an empty environment too.
- **resource limits**, set by the launcher inside the sandbox: CPU seconds (SIGXCPU),
  address space (MemoryError), file size (EFBIG), open files, no core files, and processes.
- **wall clock**: past ``timeout_s`` the grader SIGKILLs the sandbox's PID 1, and the kernel
  ends every process of its PID namespace; should bwrap itself die, ``--die-with-parent``
  takes the sandbox with it.
- **output**: stdout and stderr are drained as they come and only the last
  ``max_output_bytes`` of each are kept, so megabytes of output cost no memory here.

Why the process limit is real: RLIMIT_NPROC is not enforced for uid 0, and a root grader's
sandbox would be uid 0 outside its user namespace. So when the grader runs as root, bwrap is
started as ``nobody`` (65534, through ``subprocess.Popen(user=...)``: no setuid helper, no
capabilities left); as any other user it runs as that user. Since Linux 5.14 RLIMIT_NPROC is
counted per user namespace, and each sandbox has its own, so the limit the launcher sets
counts exactly this sandbox's processes and threads: concurrent sandboxes and the host's
other ``nobody`` processes do not share it. A pids cgroup would do the same but needs a
writable, delegated cgroup, which neither these CI machines nor a default Kubernetes pod has.

Why the launcher is PID 1 (``--as-pid-1``): with its own init, bwrap exits as soon as the
program does, before its init is reaped, and every run leaves an orphan that the host's PID 1
must reap; in a container whose PID 1 is this very process (no tini), those zombies would pile
up. As PID 1 the launcher is bwrap's direct child, which bwrap reaps. PID 1 ignores signals it
has no handler for (the launcher handles SIGXCPU), and when it exits the PID namespace ends.

Limits are per process: a program that forks ``max_processes`` children can hold up to
``max_processes * memory_mb`` of memory until the timeout; the grading host (or pod) needs a
memory limit of its own for a hard total (docs/grading.md).

bwrap missing or unable to create its namespaces raises ``SandboxUnavailable``; nothing ever
falls back to running a program unsandboxed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from services.settings import Settings

__all__ = [
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "Verdict",
    "limits_from_settings",
]

Verdict = Literal["passed", "failed", "timeout", "error"]

INSTALL_HINT = (
    "bubblewrap (bwrap) is not installed: install the package `bubblewrap` "
    "(apt-get install bubblewrap; scripts/install_test_deps.sh for the tests)"
)
WORKDIR = "/sandbox"
LAUNCHER = Path(__file__).with_name("launcher.py")
NOBODY = 65534  # the uid/gid a root grader's sandboxes run as (see the module docstring)
STATUS_CAP = 64 * 1024  # bytes read from the status pipe
KILL_GRACE_S = 2.0  # after a kill, how long the pipes may take to close
_CHUNK = 65536
_ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (bwrap missing or unable to create namespaces)."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed run may use. Memory, file size and processes are per process."""

    timeout_s: float = 10.0  # wall clock, whole sandbox
    memory_mb: int = 512  # address space (RLIMIT_AS)
    max_processes: int = 16  # processes and threads, the launcher's included (RLIMIT_NPROC)
    file_size_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    workdir_mb: int = 64  # size of the /sandbox tmpfs
    max_output_bytes: int = 64 * 1024  # tail kept of stdout and of stderr, each
    open_files: int = 128  # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        checks = {
            "timeout_s": self.timeout_s > 0,
            "memory_mb": self.memory_mb >= 32,
            "max_processes": self.max_processes >= 2,
            "file_size_mb": self.file_size_mb >= 1,
            "workdir_mb": self.workdir_mb >= 1,
            "max_output_bytes": self.max_output_bytes >= 256,
            "open_files": self.open_files >= 16,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"sandbox limit out of range: {', '.join(bad)}")

    def rlimits(self) -> dict[str, tuple[int, int]]:
        """(soft, hard) per resource, as the launcher sets them. The CPU hard limit is one
        second above the soft one so that a CPU-bound program gets SIGXCPU (reported as a
        timeout) before SIGKILL."""
        cpu = math.ceil(self.timeout_s) + 1
        mib = 1024 * 1024
        return {
            "RLIMIT_CPU": (cpu, cpu + 1),
            "RLIMIT_AS": (self.memory_mb * mib, self.memory_mb * mib),
            "RLIMIT_FSIZE": (self.file_size_mb * mib, self.file_size_mb * mib),
            "RLIMIT_NPROC": (self.max_processes, self.max_processes),
            "RLIMIT_NOFILE": (self.open_files, self.open_files),
            "RLIMIT_CORE": (0, 0),
        }


def limits_from_settings(settings: Settings) -> SandboxLimits:
    """The TANDEM_GRADER_* limits."""
    return SandboxLimits(
        timeout_s=settings.grader_timeout_s,
        memory_mb=settings.grader_memory_mb,
        max_processes=settings.grader_max_processes,
        file_size_mb=settings.grader_file_size_mb,
    )


@dataclass(frozen=True)
class SandboxResult:
    """How one sandboxed run ended."""

    verdict: Verdict  # passed: ran to its end; failed; timeout; error: could not run
    reason: str  # one line; "" when passed
    seconds: float  # wall time of the sandbox, start to end
    exit_code: int | None  # bwrap's exit status (the program's; 128+N after signal N)
    signal: str | None  # the signal that ended the program, e.g. "SIGXCPU"
    stdout: str  # the last max_output_bytes of it
    stderr: str
    output_bytes: int  # stdout + stderr bytes written in all, kept or not

    @property
    def clipped(self) -> bool:
        return self.output_bytes > len(self.stdout.encode()) + len(self.stderr.encode())


class Sandbox:
    """Runs programs under one set of limits; safe to share between threads.

    Construction checks, once per process and interpreter, that bwrap exists and can build
    the sandbox (by running an empty program in it), and raises ``SandboxUnavailable``
    otherwise.
    """

    def __init__(self, limits: SandboxLimits | None = None, python: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.bwrap = find_bwrap()
        self.python, self._python_binds = _interpreter(python)
        self._as_user = _drop_privileges()
        self._launcher = LAUNCHER.read_bytes()
        self._probe()

    def run(self, source: str) -> SandboxResult:
        """Run ``source`` in a fresh sandbox and say how it ended."""
        return self._run(source, self.limits)

    def _run(self, source: str, limits: SandboxLimits) -> SandboxResult:
        status_r, status_w = os.pipe()
        fds = [status_w]  # the sandbox's ends, closed here once it has them
        try:
            fds += [launcher := _memfd("launcher", self._launcher)]
            fds += [program := _memfd("program", source.encode("utf-8", errors="surrogatepass"))]
            started = time.monotonic()
            process = subprocess.Popen(
                self._command(launcher, program, status_w, limits),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=tuple(fds),
                env={},
                cwd="/",
                start_new_session=True,
                **self._as_user,
            )
        except BaseException as error:
            os.close(status_r)
            if isinstance(error, OSError):
                raise SandboxUnavailable(f"cannot start {self.bwrap}: {error}") from error
            raise
        finally:
            for fd in fds:
                os.close(fd)
        with process:
            streams, timed_out = _collect(process, status_r, started, limits)
            seconds = time.monotonic() - started
        return _judge(process.returncode, streams, timed_out, seconds, limits)

    def _command(
        self, launcher: int, program: int, status_fd: int, limits: SandboxLimits
    ) -> list[str]:
        args = [
            self.bwrap,
            "--unshare-all",
            "--unshare-user",
            *(["--disable-userns"] if _supports(self.bwrap, "--disable-userns") else []),
            "--die-with-parent",
            "--new-session",
            "--as-pid-1",  # no bwrap init inside: see "Why the launcher is PID 1" above
            "--hostname",
            "sandbox",
            "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "HOME", WORKDIR,
            "--setenv", "TMPDIR", WORKDIR,
            "--ro-bind", "/usr", "/usr",
        ]  # fmt: skip
        for path in _ROOT_LINKS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in self._python_binds:
            args += ["--ro-bind", path, path]
        args += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--remount-ro", "/dev",
            "--size", str(limits.workdir_mb * 1024 * 1024),
            "--tmpfs", WORKDIR,
            "--ro-bind-data", str(launcher), "/grader/launcher.py",
            "--ro-bind-data", str(program), "/grader/program.py",
            "--remount-ro", "/",
            "--chdir", WORKDIR,
            "--",
            self.python, "-I", "-B", "/grader/launcher.py",
            str(status_fd), json.dumps(limits.rlimits()),
        ]  # fmt: skip
        return args

    def _probe(self) -> None:
        key = (self.bwrap, self.python, tuple(self._python_binds), bool(self._as_user))
        with _probe_lock:
            if key in _probed:
                return
            # A generous clock: a loaded machine must not pass for one that cannot sandbox.
            limits = dataclasses.replace(self.limits, timeout_s=max(self.limits.timeout_s, 30.0))
            result = self._run("pass\n", limits)
            if result.verdict != "passed":
                detail = (result.stderr.strip().splitlines() or [result.reason])[-1]
                raise SandboxUnavailable(
                    f"the sandbox cannot run a program here: {detail[:300]} "
                    "(bwrap needs unprivileged user namespaces; see docs/grading.md)"
                )
            _probed.add(key)


_probed: set[tuple[object, ...]] = set()
_probe_lock = threading.Lock()


def find_bwrap(search_path: str | None = None) -> str:
    """The bwrap executable on ``search_path`` (default: PATH, then /usr/bin and /bin), or
    SandboxUnavailable naming the package to install."""
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"])
    found = shutil.which("bwrap", path=search_path)
    if not found:
        raise SandboxUnavailable(INSTALL_HINT)
    if not _supports(found, "--size"):
        raise SandboxUnavailable(
            f"{found} is too old (no --size option): install bubblewrap 0.8 or newer"
        )
    return found


_help_text: dict[str, str] = {}


def _supports(bwrap: str, option: str) -> bool:
    if bwrap not in _help_text:
        try:
            done = subprocess.run(
                [bwrap, "--help"], capture_output=True, text=True, timeout=10, env={}
            )
            _help_text[bwrap] = done.stdout + done.stderr
        except (OSError, subprocess.SubprocessError) as error:
            raise SandboxUnavailable(f"cannot run {bwrap}: {error}") from error
    return option in _help_text[bwrap]


def _interpreter(configured: str | None) -> tuple[str, list[str]]:
    """The sandbox's Python and the folders to bind for it besides /usr.

    Configured (TANDEM_GRADER_PYTHON), else this process's own base interpreter when it
    lives under /usr, else /usr/bin/python3 or /usr/local/bin/python3. One outside /usr has
    its installation folder (the parent of its bin/) bound read-only at the same path.
    """
    candidates = [configured] if configured else []
    if not configured:
        base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        candidates += [base] if base.startswith("/usr/") else []
        candidates += ["/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            real = os.path.realpath(candidate)
            if real.startswith("/usr/"):
                return candidate, []
            return real, [str(Path(real).parent.parent)]
    wanted = configured or "a python3 under /usr"
    raise SandboxUnavailable(
        f"no Python interpreter for the sandbox: {wanted} not found (set TANDEM_GRADER_PYTHON)"
    )


def _drop_privileges() -> dict[str, object]:
    """Popen arguments that start bwrap as nobody when this process is root."""
    if os.geteuid() != 0:
        return {}
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(f"tandem-grader-{name}", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Tail:
    """The last ``cap`` bytes written to a stream, and how many bytes came in all."""

    def __init__(self, cap: int) -> None:
        self.cap, self.total, self.data = cap, 0, bytearray()

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > 2 * self.cap:
            del self.data[: -self.cap]

    def text(self) -> str:
        return bytes(self.data[-self.cap :]).decode("utf-8", errors="replace")


@dataclass
class _Streams:
    stdout: _Tail
    stderr: _Tail
    status: _Tail


def _collect(
    process: subprocess.Popen[bytes], status_fd: int, started: float, limits: SandboxLimits
) -> tuple[_Streams, bool]:
    """Read stdout, stderr and the status pipe until the sandbox ends or its time is up;
    then kill it. Returns the streams and whether the wall-clock limit was hit."""
    assert process.stdout is not None and process.stderr is not None
    streams = _Streams(
        _Tail(limits.max_output_bytes), _Tail(limits.max_output_bytes), _Tail(STATUS_CAP)
    )
    deadline = started + limits.timeout_s
    killed = False
    with contextlib.ExitStack() as stack, selectors.DefaultSelector() as selector:
        stack.callback(os.close, status_fd)
        selector.register(process.stdout.fileno(), selectors.EVENT_READ, streams.stdout)
        selector.register(process.stderr.fileno(), selectors.EVENT_READ, streams.stderr)
        selector.register(status_fd, selectors.EVENT_READ, streams.status)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if killed:  # the pipes did not close within the grace after the kill
                    break
                killed = True
                _kill(process)
                deadline = time.monotonic() + KILL_GRACE_S
                continue
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, _CHUNK)
                if chunk:
                    key.data.add(chunk)
                else:
                    selector.unregister(key.fd)
    if not killed:  # the pipes closed: the program has ended, or closed them and runs on
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed = True
            _kill(process)
    if killed:
        try:
            process.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait()
    return streams, killed


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the sandbox's PID 1 (bwrap's child): the kernel then ends every process of
    its PID namespace, and bwrap reaps it and exits. Only when it cannot be found, bwrap's
    process group, which would leave PID 1 to the host's init to reap."""
    children = _children(process.pid)
    for pid in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if not children:
        _kill_group(process)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, from /proc (the kernel's children lists need
    CONFIG_PROC_CHILDREN, which not every kernel has)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    stat = handle.read()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces and parentheses
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) > 1 and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _events(status: _Tail) -> tuple[bool, dict[str, object] | None]:
    """Whether the launcher started, and the last outcome it reported."""
    started, outcome = False, None
    for line in bytes(status.data).splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("event") == "started":
            started = True
        elif started:
            outcome = event
    return started, outcome


def _judge(
    returncode: int | None,
    streams: _Streams,
    timed_out: bool,
    seconds: float,
    limits: SandboxLimits,
) -> SandboxResult:
    started, outcome = _events(streams.status)
    signum = None
    if returncode is not None and returncode < 0:
        signum = -returncode
    elif returncode is not None and returncode > 128 and (outcome is None):
        signum = returncode - 128
    signame = _signal_name(signum) if signum else None

    verdict: Verdict
    if timed_out:
        verdict, reason = "timeout", f"wall-clock limit of {limits.timeout_s:g} s reached"
    elif signame == "SIGXCPU" or (outcome or {}).get("event") == "cpu_limit":
        verdict, reason = "timeout", f"CPU-time limit of {limits.rlimits()['RLIMIT_CPU'][0]} s reached"
    elif not started:
        detail = _last_line(streams.stderr.text()) or f"exit status {returncode}"
        verdict, reason = "error", f"the sandbox did not start: {detail}"
    elif outcome is None:
        how = f"killed by {signame}" if signame else f"exited with status {returncode}"
        verdict, reason = "failed", f"{how} before the program finished"
    elif outcome.get("event") == "completed" and returncode == 0:
        verdict, reason = "passed", ""
    elif outcome.get("event") == "syntax_error":
        verdict, reason = "error", _located(outcome, str(outcome.get("message", "SyntaxError")))
    elif outcome.get("event") == "exit":
        verdict, reason = "failed", f"the program called exit({outcome.get('code')})"
    elif outcome.get("event") == "exception":
        message = str(outcome.get("message") or "")
        kind = str(outcome.get("type") or "Exception")
        head = f"{kind}: {message}" if message else kind
        if kind == "MemoryError":
            head += f" (address-space limit {limits.memory_mb} MiB)"
        verdict, reason = "failed", _located(outcome, head)
    else:
        verdict, reason = "failed", f"exited with status {returncode}"
    return SandboxResult(
        verdict=verdict,
        reason=_one_line(reason),
        seconds=round(seconds, 3),
        exit_code=returncode,
        signal=signame,
        stdout=streams.stdout.text(),
        stderr=streams.stderr.text(),
        output_bytes=streams.stdout.total + streams.stderr.total,
    )


def _located(outcome: dict[str, object], head: str) -> str:
    text, line = outcome.get("text"), outcome.get("line")
    if text:
        return f"{head} (line {line}: {text})"
    return f"{head} (line {line})" if line else head


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
