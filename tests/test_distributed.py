"""`spark train --distributed`: two processes on loopback, each with one CPU device of its
own, joined by jax.distributed.initialize (gloo CPU collectives), train exactly as one
process with two devices does, and their checkpoint resumes in a single process; and every
bad launch ends in one line within its timeout (train/launch.py)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from spark_model.checkpoint import flat_params, load_params
from train import cli, launch
from train.config import SettingsError, TrainError

from test_train import (MINI_ARGS, VAL_PERMILLE, _assert_one_line_error, _env,  # noqa: F401
                        mini_corpus)

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(out: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", "--out", str(out), "--data", str(corpus),
            "--cache-dir", str(cache), "--vocab-size", "384", "--val-permille",
            str(VAL_PERMILLE), "--seq-len", "32", "--batch-size", "4", "--steps", "6",
            "--warmup", "1", "--lr", "5e-3", "--save-every", "3", "--eval-every", "0",
            "--eval-tokens", "500", "--log-every", "2", "--no-progress", *MINI_ARGS, *extra]


def _run_all(cmds: list[list[str]], env: dict, timeout: float = 300
             ) -> list[subprocess.CompletedProcess]:
    """Run commands at once; kill them all if any is still running after `timeout`."""
    procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    results = []
    try:
        for p, c in zip(procs, cmds):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _pair(port: int, n: tuple[int, int] = (2, 2), *extra: str) -> list[list[str]]:
    """The arguments of processes 0 and 1 (told `n` processes each)."""
    return [["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
             str(n[k]), "--process-id", str(k), *extra] for k in (0, 1)]


def _params(run: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat_params(load_params(run)[1]).items()}


def _train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl")
            .read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_in_one(tmp_path, mini_corpus):  # noqa: F811
    env = _env(tmp_path)
    env.pop("XLA_FLAGS", None)  # one CPU device per process unless --cpu-devices says more
    cache = tmp_path / "cache"
    single, pair = tmp_path / "single", tmp_path / "pair"
    # The reference: one process, two devices, the same global batch of 4 sequences.
    [ref] = _run_all([_cmd(single, mini_corpus, cache, "--cpu-devices", "2")], env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "2 device(s)" in ref.stderr
    # The pair starts from an empty cache: each process trains the tokenizer and builds the
    # token cache itself, and they must agree (train/loop.py checks that they do).
    p0, p1 = _run_all([_cmd(pair, mini_corpus, tmp_path / "cache-pair", *a)
                       for a in _pair(_free_port())], env)
    assert p0.returncode == 0 and p1.returncode == 0, p0.stderr[-3000:] + p1.stderr[-3000:]
    assert "2 device(s)" in p0.stderr  # the mesh spans both processes' single devices
    assert "step 6/6" not in p1.stderr  # process 0 speaks for the run
    # Two devices all-reduce the same two partial gradients whether they live in one
    # process or two (a + b == b + a in floating point), so the runs agree bit for bit.
    assert _train_losses(pair) == _train_losses(single)
    assert [s for s, _ in _train_losses(pair)] == [2, 4, 6]
    a, b = _params(single), _params(pair)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert sorted(p.name for p in (pair / "training" / "checkpoints").iterdir()) == ["3", "6"]

    # Both runs extended to 12 steps by one process with one device: the pair's checkpoint
    # (parameters, optimizer state, data position) restores like the single process's.
    resumed = _run_all([[sys.executable, "-m", "train", "--out", str(run), "--resume",
                         "--steps", "12", "--cache-dir", str(cache), "--no-progress"]
                        for run in (single, pair)], env)
    for r in resumed:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from step 6" in r.stderr and "1 device(s)" in r.stderr
    assert json.loads((pair / "config.json").read_text())["extra"]["step"] == 12
    assert _train_losses(pair) == _train_losses(single)
    assert [s for s, _ in _train_losses(pair)] == [2, 4, 6, 8, 10, 12]
    a2, b2 = _params(single), _params(pair)
    for name in a2:
        np.testing.assert_array_equal(a2[name], b2[name], err_msg=name)
    assert any(not np.array_equal(a[n], a2[n]) for n in a)  # it did train on


def test_processes_with_different_data_stop(tmp_path, mini_corpus):  # noqa: F811
    env = _env(tmp_path)
    env.pop("XLA_FLAGS", None)
    less = tmp_path / "less"  # process 1 is given one file fewer than process 0
    shutil.copytree(mini_corpus, less)
    (less / "textwrap.py").unlink()
    runs = _run_all([_cmd(tmp_path / "run", corpus, tmp_path / "cache", *a)
                     for corpus, a in zip((mini_corpus, less), _pair(_free_port()))], env)
    for r in runs:
        assert r.returncode == 1, r.stderr[-3000:]
        _assert_one_line_error(r.stderr, "processes [1] prepared other tokens than process 0")
    assert not (tmp_path / "run" / "training" / "checkpoints").exists()


# ---- bad launches: one line, within the timeout ------------------------------------------

def _cli(capsys, *argv) -> tuple[int, str, float]:
    t0 = time.monotonic()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err, time.monotonic() - t0


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path, capsys):
    port = _free_port()  # nothing listens there
    code, err, took = _cli(capsys, "--out", tmp_path / "run", "--distributed", "--coordinator",
                           f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                           "--distributed-timeout", "1")
    assert code == 1 and 1 <= took < 10, (code, took)
    _assert_one_line_error(err, f"cannot reach the coordinator 127.0.0.1:{port} within 1s")
    assert not (tmp_path / "run").exists()


def test_missing_process_fails_within_the_timeout(tmp_path, capsys):
    code, err, took = _cli(capsys, "--out", tmp_path / "run", "--distributed", "--coordinator",
                           f"127.0.0.1:{_free_port()}", "--num-processes", "3",
                           "--process-id", "0", "--distributed-timeout", "1")
    assert code == 1 and 1 <= took < 10, (code, took)
    _assert_one_line_error(err, "only 1 of 3 processes joined the coordinator within 1s "
                                "(missing --process-id 1, 2)")


def test_mismatched_process_counts_fail_in_both_processes(tmp_path):
    env = _env(tmp_path)
    runs = _run_all([[sys.executable, "-m", "train", "--out", str(tmp_path / "run"), *a,
                      "--distributed-timeout", "20"] for a in _pair(_free_port(), (2, 3))],
                    env, timeout=60)
    need = "process 1 was started with --num-processes 3, process 0 with 2"
    for r in runs:
        assert r.returncode == 1, r.stderr[-3000:]
        _assert_one_line_error(r.stderr, need)
        assert "same --coordinator and --num-processes" in r.stderr
    assert "process 0 stopped the launch" in runs[1].stderr
    assert not (tmp_path / "run").exists()


def _handshakes(n_claims: list[tuple[int, int]], timeout_s: int = 20
                ) -> list[BaseException | None]:
    """Run launch.handshake for (num_processes, process_id) claims in threads; their
    outcomes (None: joined)."""
    port = _free_port()
    outcomes: list[BaseException | None] = [None] * len(n_claims)

    def one(i: int, n: int, k: int) -> None:
        try:
            launch.handshake(launch.Launch(f"127.0.0.1:{port}", n, k, timeout_s))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            outcomes[i] = e

    threads = [threading.Thread(target=one, args=(i, n, k)) for i, (n, k) in
               enumerate(n_claims)]
    threads[0].start()
    time.sleep(0.2)  # process 0 first, so that the others' order is the one given
    for t in threads[1:]:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(timeout_s + 5)
    assert not any(t.is_alive() for t in threads)
    return outcomes


def test_handshake_joins_and_names_duplicate_ids():
    assert _handshakes([(3, 0), (3, 2), (3, 1)]) == [None, None, None]
    lead, first, second = _handshakes([(3, 0), (3, 1), (3, 1)])
    for e in (lead, first, second):
        assert isinstance(e, TrainError) and "two processes were started with --process-id 1" \
            in str(e), e
    # A process that arrives after the run started meets something that is not process 0's
    # handshake (here: a listener that closes at once) and says so instead of waiting.
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        threading.Thread(target=lambda: srv.accept()[0].close(), daemon=True).start()
        with pytest.raises(TrainError, match="gave no answer"):
            launch.handshake(launch.Launch(f"127.0.0.1:{port}", 2, 1, 5))


@pytest.mark.parametrize("argv, env, needle", [
    (["--distributed", "--coordinator", "127.0.0.1:1", "--num-processes", "2",
      "--process-id", "2"], {}, "--process-id 2 is out of range for --num-processes 2"),
    (["--distributed", "--num-processes", "0"], {}, "--num-processes must be at least 1"),
    (["--distributed", "--coordinator", "host-without-port"], {}, "must be HOST:PORT"),
    (["--distributed", "--distributed-timeout", "0"], {}, "--distributed-timeout must be"),
    (["--distributed"], {"JAX_NUM_PROCESSES": "two"}, "$JAX_NUM_PROCESSES must be an integer"),
    (["--distributed"], {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
     "--process-id 5 is out of range"),
    (["--coordinator", "127.0.0.1:1"], {}, "need --distributed"),
    (["--distributed-timeout", "5"], {}, "need --distributed"),
])
def test_launch_usage_errors(tmp_path, capsys, monkeypatch, argv, env, needle):
    for name in (launch.ENV_COORDINATOR, launch.ENV_NUM_PROCESSES, launch.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err, _ = _cli(capsys, "--out", tmp_path / "run", *argv)
    assert code == 2
    _assert_one_line_error(err, needle)
    assert not (tmp_path / "run").exists()


def test_resolve_reads_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "[::1]:8476", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    got = launch.resolve(None, None, None, None, env)
    assert got == launch.Launch("[::1]:8476", 4, 3, launch.DEFAULT_TIMEOUT_S) and got.complete
    assert launch.split_address(got.coordinator) == ("::1", 8476)
    assert launch.resolve("h:1", 2, 0, 7, env) == launch.Launch("h:1", 2, 0, 7)  # options win
    assert not launch.resolve(None, None, None, None, {}).complete  # left to JAX's detection
    with pytest.raises(SettingsError):
        launch.split_address("h:70000")
