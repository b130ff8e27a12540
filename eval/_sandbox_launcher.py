"""The trusted half of `eval.sandbox`: it sets up one sample's cell and supervises it.

`eval.sandbox.run_program` starts this file as

    [unshare --net --pid --mount --fork --kill-child --mount-proc]  python -I -B -S \
        _sandbox_launcher.py CFG_FD STATUS_FD

so that, when the namespaces are available, the launcher is PID 1 of a fresh PID namespace
with no network and a private mount table. It is a script rather than a module of the
package because it runs under `-I -S` (no site-packages, no project on sys.path) and must
not depend on anything that could be half-edited: the standard library only.

What it does, in order:
  1. reads its configuration (JSON) from CFG_FD, a pipe only the harness can write; the
     per-run sentinel token travels there, never in argv or the environment;
  2. optionally mounts private tmpfs over the world-writable directories (/tmp, /var/tmp,
     /dev/shm, ...) and over the sample's working directory, hides directories the
     sample uid may not traverse (e.g. /root) behind a tmpfs and binds the Python
     installation back read-only, so the sample can run the interpreter but writes
     nothing that outlives the namespace;
  3. forks the sample: resource limits, then setgroups/setgid/setuid to the dedicated
     unprivileged uid, then exec of `python -I -B -u -c RUNNER TOKEN_FD DONE_FD program.py`;
  4. waits for the sample's main process (at most until its own deadline, so that a
     sample never outlives a harness that died), then kills every other process left in the
     namespace (kill(-1) as PID 1) or, without a PID namespace, every descendant it finds
     (it is a child subreaper, so orphans are re-parented to it);
  5. reports exit status, signal and whether the sentinel token arrived on DONE_FD, as one
     JSON object on STATUS_FD (closed in the sample before exec, so it cannot write there).

The sentinel: RUNNER reads the token from TOKEN_FD (a pipe the launcher filled and
closed) before the program starts, runs the program with exec(), and only if exec()
returns normally writes the token to DONE_FD. sys.exit()/os._exit()/signals/exec()
before the end of the program therefore never produce the token; printing to stdout does
not help either since the token is not in the program's source, argv or environment.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time

# Runs inside the sample's interpreter before its program. Kept tiny; it reads the token,
# forgets the descriptor, runs the program as __main__, and proves completion afterwards.
RUNNER = r"""
import os, sys, types
def _spark_sandbox_run():
    token_fd, done_fd, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    token = b""
    while True:
        chunk = os.read(token_fd, 256)
        if not chunk:
            break
        token += chunk
    os.close(token_fd)
    with open(path, "rb") as f:
        source = f.read()
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    sys.argv = [path]
    code = compile(source, path, "exec", dont_inherit=True)
    del source
    exec(code, module.__dict__)
    os.write(done_fd, token)
_spark_sandbox_run()
"""

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)):
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or source} on {target}: {os.strerror(err)}")


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(out)
        out += chunk


def read_available(fd: int) -> bytes:
    """Whatever is in a pipe now, without waiting for writers that may never close it.
    (Standard library only: the supervisor in eval.sandbox imports it too.)"""
    os.set_blocking(fd, False)
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def _setup_mounts(cfg: dict, program: bytes) -> None:
    """Private tmpfs for every writable place, and the interpreter re-exposed read-only."""
    # Descriptors to the directories that must stay reachable, taken before any tmpfs
    # covers them; bind-mounting /proc/self/fd/N then works whatever is mounted on top.
    exposed = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in cfg["expose"]]
    tmp_data = f"mode=1777,size={cfg['tmpfs_bytes']}"
    for path in cfg["private_dirs"]:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, tmp_data)
    for path in cfg["hide"]:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path, fd in exposed:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        os.close(fd)
    workdir = cfg["workdir"]
    os.makedirs(workdir, exist_ok=True)
    owner = "" if cfg["uid"] is None else f",uid={cfg['uid']},gid={cfg['gid']}"
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"mode=0700,size={cfg['workdir_bytes']}{owner}")
    with open(cfg["program"], "wb") as f:
        f.write(program)
    os.chmod(cfg["program"], 0o644)
    os.makedirs(cfg["env"]["TMPDIR"], exist_ok=True)
    if cfg["uid"] is not None:
        os.chown(cfg["env"]["TMPDIR"], cfg["uid"], cfg["gid"])


def _exec_sample(cfg: dict, status_fd: int, token_r: int, done_w: int) -> None:
    """In the forked child: limits, privileges, then the sample's interpreter. Never returns."""
    os.close(status_fd)
    for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)  # ignored signals would survive exec
    if not cfg["pid_namespace"]:
        os.setpgid(0, 0)  # one group for the launcher's fallback clean-up
    for name, (soft, hard) in cfg["rlimits"].items():
        which = getattr(resource, name)
        cur_soft, cur_hard = resource.getrlimit(which)
        if os.geteuid() != 0 and cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)  # an unprivileged process may only lower hard limits
        resource.setrlimit(which, (min(soft, hard), hard))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        if os.getresuid() != (cfg["uid"],) * 3 or os.getgroups():
            raise RuntimeError("privileges were not dropped")
    os.umask(0o077)
    os.chdir(cfg["workdir"])
    os.set_inheritable(token_r, True)
    os.set_inheritable(done_w, True)
    python = cfg["python"]
    argv = [python, "-I", "-B", "-u", "-c", RUNNER, str(token_r), str(done_w), cfg["program"]]
    os.execve(python, argv, cfg["env"])


def _reap_nohang() -> bool:
    """Reap finished children; False once there are no children left at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _children() -> list[int]:
    me, kids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[1]) == me:
            kids.append(int(entry))
    return kids


def _kill_everything_else(sample_pid: int, pid_namespace: bool) -> None:
    """Kill whatever the sample left behind; as PID 1 that is every other process here."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if pid_namespace and os.getpid() == 1:
            try:
                os.kill(-1, signal.SIGKILL)  # never reaches PID 1 itself
            except ProcessLookupError:
                pass
        else:
            try:
                os.killpg(sample_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in _children():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not _reap_nohang():
            return
        time.sleep(0.002)


def main() -> None:
    cfg_fd, status_fd = int(sys.argv[1]), int(sys.argv[2])
    status: dict = {"error": None, "exit_code": None, "signal": None, "sentinel": False,
                    "launcher_pid": os.getpid()}
    sample_pid = None
    cfg: dict = {}

    def stop(signum, frame):
        # SIGTERM: the harness's polite stop, used without a PID namespace. SIGALRM: our
        # own deadline, for when the harness died and can no longer stop us.
        if sample_pid is not None:
            _kill_everything_else(sample_pid, cfg.get("pid_namespace", False))
        os._exit(3)

    try:
        cfg = json.loads(_read_all(cfg_fd))
        os.close(cfg_fd)
        if not cfg["pid_namespace"]:
            _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            signal.signal(signal.SIGTERM, stop)
        elif os.getpid() != 1:
            raise RuntimeError("expected to be PID 1 of a new PID namespace")
        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, float(cfg["deadline_s"]))
        token = bytes.fromhex(cfg["token"])
        if cfg["mounts"]:
            with open(cfg["program"], "rb") as f:
                program = f.read()
            _setup_mounts(cfg, program)
        token_r, token_w = os.pipe()
        os.write(token_w, token)
        os.close(token_w)
        done_r, done_w = os.pipe()
        err_r, err_w = os.pipe()  # close-on-exec: EOF without data means exec succeeded
        sample_pid = os.fork()
        if sample_pid == 0:
            try:
                os.close(err_r)
                os.close(done_r)
                _exec_sample(cfg, status_fd, token_r, done_w)
            except BaseException as e:  # noqa: BLE001 - report anything, then die
                try:
                    os.write(err_w, f"{type(e).__name__}: {e}".encode()[:4000])
                finally:
                    os._exit(127)
        os.close(token_r)
        os.close(done_w)
        os.close(err_w)
        exec_error = _read_all(err_r).decode(errors="replace")
        os.close(err_r)
        while True:
            try:
                pid, wstatus = os.waitpid(-1, 0)
            except InterruptedError:
                continue
            if pid == sample_pid:
                break
        _kill_everything_else(sample_pid, cfg["pid_namespace"])
        if exec_error:
            status["error"] = f"could not start the sample: {exec_error}"
        elif os.WIFSIGNALED(wstatus):
            status["signal"] = os.WTERMSIG(wstatus)
        else:
            status["exit_code"] = os.waitstatus_to_exitcode(wstatus)
        status["sentinel"] = token in read_available(done_r)
    except BaseException as e:  # noqa: BLE001 - the harness turns this into SandboxError
        status["error"] = f"sandbox setup failed: {type(e).__name__}: {e}"
        if sample_pid:
            _kill_everything_else(sample_pid, cfg.get("pid_namespace", False))
    os.write(status_fd, json.dumps(status).encode())
    os.close(status_fd)
    os._exit(0)


if __name__ == "__main__":
    main()
