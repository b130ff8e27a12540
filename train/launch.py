"""Joining a multi-process run (``spark train --distributed``): the settings, a handshake
that fails with one clear line, then ``jax.distributed.initialize``.

Why a handshake of our own: when ``jax.distributed.initialize`` cannot gather every process
within its ``initialization_timeout`` (nothing listens at the coordinator address, a process
was never started, two were told different process counts), XLA's coordination client ends
the process with a fatal log and a C++ stack trace instead of raising. So before handing over
to JAX, the processes meet on the coordinator's port with a small protocol over plain TCP:

    process k > 0 -> process 0:  {"spark": "train-join", "num_processes": N, "process_id": k}
    process 0 -> process k:      {"ok": true}   or   {"error": "<one line>"}

Process 0 listens on the coordinator's port until all N - 1 others have joined or the
timeout passes, checks that they agree on N and hold distinct ids, answers every one, and
closes the port again; JAX's own coordination service then binds it. Every process that
fails raises TrainError naming what to check. When the three settings are not all known
(a cluster environment such as SLURM fills them in), JAX detects them and there is no
handshake: its timeout still applies, with JAX's own (fatal) error.

Reads JAX only inside `initialize`, so `resolve` and the handshake are testable without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from typing import Mapping

from train.config import SettingsError, TrainError

DEFAULT_TIMEOUT_S = 60  # seconds for the handshake, and again for JAX's initialization
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
_HELLO = "train-join"
_CHECK = ("every process needs the same --coordinator and --num-processes and its own "
          "--process-id in 0 .. N-1")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the run; None fields are left to JAX's cluster detection."""

    coordinator: str | None  # "host:port" of process 0
    num_processes: int | None
    process_id: int | None
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def complete(self) -> bool:
        return None not in (self.coordinator, self.num_processes, self.process_id)


def resolve(coordinator: str | None, num_processes: int | None, process_id: int | None,
            timeout_s: int | None = None, environ: Mapping[str, str] = os.environ) -> Launch:
    """The launch settings: the options, else $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES
    and $JAX_PROCESS_ID. Raises SettingsError (a usage error) for values that cannot work."""
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes = _int_or_env(num_processes, environ, ENV_NUM_PROCESSES, "--num-processes")
    process_id = _int_or_env(process_id, environ, ENV_PROCESS_ID, "--process-id")
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if timeout_s < 1:
        raise SettingsError(f"--distributed-timeout must be at least 1 second, got {timeout_s}")
    if num_processes is not None and num_processes < 1:
        raise SettingsError(f"--num-processes must be at least 1, got {num_processes}")
    if process_id is not None and process_id < 0:
        raise SettingsError(f"--process-id must be >= 0, got {process_id}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise SettingsError(f"--process-id {process_id} is out of range for --num-processes "
                            f"{num_processes}: ids run from 0 to {num_processes - 1}")
    if coordinator is not None:
        split_address(coordinator)
    return Launch(coordinator, num_processes, process_id, timeout_s)


def _int_or_env(value: int | None, environ: Mapping[str, str], name: str, flag: str
                ) -> int | None:
    if value is not None or not environ.get(name):
        return value
    try:
        return int(environ[name])
    except ValueError:
        raise SettingsError(f"${name} must be an integer (like {flag}), "
                            f"got {environ[name]!r}") from None


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" (IPv6 hosts in brackets: "[::1]:1234")."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"--coordinator must be HOST:PORT with a port in 1..65535, "
                            f"got {address!r}")
    return host, int(port)


def handshake(launch: Launch) -> None:
    """Meet the other processes on the coordinator's port (see the module docstring);
    returns once all have joined and agree, else raises TrainError within the timeout."""
    if not launch.complete or launch.num_processes == 1:
        return
    host, port = split_address(launch.coordinator)
    deadline = time.monotonic() + launch.timeout_s
    if launch.process_id == 0:
        _lead(port, launch.num_processes, launch.timeout_s, deadline)
    else:
        _join(host, port, launch, deadline)


def _send(conn: socket.socket, msg: dict) -> None:
    conn.sendall((json.dumps(msg) + "\n").encode())


def _read(conn: socket.socket, deadline: float) -> dict | None:
    """One JSON line from `conn` by the deadline; None if it closes or sends something else."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < 4096:
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
    try:
        msg = json.loads(buf)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _listen(port: int) -> socket.socket:
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6,
                                        dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError as e:
        raise TrainError(f"process 0 cannot listen on the coordinator port {port} "
                         f"({e.strerror or e}); choose a free port in --coordinator") from None


def _lead(port: int, n: int, timeout_s: int, deadline: float) -> None:
    """Process 0: wait for processes 1 .. n-1, check them, answer all of them."""
    server = _listen(port)
    conns: list[socket.socket] = []
    joined: dict[int, int] = {}  # process id -> the process count it was given
    problem = None
    try:
        while len(joined) < n - 1 and problem is None:
            server.settimeout(max(deadline - time.monotonic(), 0.0))
            try:
                conn, _ = server.accept()
            except (socket.timeout, BlockingIOError):
                break
            try:
                msg = _read(conn, min(deadline, time.monotonic() + 10))
            except OSError:
                msg = None
            if not msg or msg.get("spark") != _HELLO:
                conn.close()  # not a spark process (a port scanner, a stale client)
                continue
            conns.append(conn)
            k, m = msg.get("process_id"), msg.get("num_processes")
            if m != n:
                problem = (f"process {k} was started with --num-processes {m}, process 0 "
                           f"with {n}")
            elif k in joined or k == 0:
                problem = f"two processes were started with --process-id {k}"
            else:
                joined[k] = m
        if problem is None and len(joined) < n - 1:
            missing = ", ".join(str(k) for k in range(1, n) if k not in joined)
            problem = (f"only {len(joined) + 1} of {n} processes joined the coordinator "
                       f"within {timeout_s}s (missing --process-id {missing}); start the "
                       "same command on every host, or raise --distributed-timeout")
        elif problem is not None:
            problem += f"; {_CHECK}"
        server.close()  # free the port for JAX's coordination service before answering
        for conn in conns:
            try:
                _send(conn, {"error": problem} if problem else {"ok": True})
            except OSError:
                pass
        if problem is None:
            _wait_closed(conns)  # the peers close first: no TIME_WAIT left on our port
    finally:
        server.close()
        for conn in conns:
            conn.close()
    if problem is not None:
        raise TrainError(problem)


def _wait_closed(conns: list[socket.socket]) -> None:
    end = time.monotonic() + 5
    for conn in conns:
        try:
            conn.settimeout(max(end - time.monotonic(), 0.01))
            conn.recv(1)
        except OSError:
            pass


def _join(host: str, port: int, launch: Launch, deadline: float) -> None:
    """Process k > 0: connect to process 0 (retrying until the deadline), introduce
    ourselves, and wait for its answer."""
    where = f"the coordinator {launch.coordinator}"
    conn = None
    while conn is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrainError(f"cannot reach {where} within {launch.timeout_s}s: start "
                             "process 0 (--process-id 0) with the same --coordinator, and "
                             "check the address and that its port is open to this host")
        try:
            conn = socket.create_connection((host, port), timeout=min(left, 5))
        except OSError:
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
    with conn:
        try:
            _send(conn, {"spark": _HELLO, "num_processes": launch.num_processes,
                         "process_id": launch.process_id})
            reply = _read(conn, deadline)
        except OSError:  # a timeout is an OSError too
            reply = None
    if reply is None:
        raise TrainError(f"{where} gave no answer within {launch.timeout_s}s: is process 0 "
                         f"running this version of spark train, and still waiting? {_CHECK}")
    if "error" in reply:
        raise TrainError(f"process 0 stopped the launch: {reply['error']}")


def initialize(launch: Launch) -> None:
    """The handshake, then ``jax.distributed.initialize`` with the same timeout; checks
    that JAX counts the processes the launch asked for."""
    handshake(launch)
    import jax

    try:
        jax.distributed.initialize(coordinator_address=launch.coordinator,
                                   num_processes=launch.num_processes,
                                   process_id=launch.process_id,
                                   initialization_timeout=launch.timeout_s)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"jax.distributed.initialize failed: {first} (give --coordinator, "
                         "--num-processes and --process-id where no cluster environment "
                         "provides them)") from None
    if launch.num_processes is not None and jax.process_count() != launch.num_processes:
        raise TrainError(f"JAX counts {jax.process_count()} processes, --num-processes is "
                         f"{launch.num_processes}; {_CHECK}")
