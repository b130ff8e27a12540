"""The `spark` command as a user runs it: a subprocess, its output and exit code."""

import json
import subprocess
import sys
from pathlib import Path

import spark_model

ROOT = Path(__file__).resolve().parent.parent


def spark(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "spark_model.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_info_70b_json_is_abstract_and_exact():
    r = spark("info", "--preset", "llama3-70b", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["params"] == 70_553_706_496
    assert info["config"]["vocab_size"] == 128_256
    assert info["config"]["n_kv_heads"] == 8


def test_info_tiny_text():
    r = spark("info", "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "d_model" in r.stdout


def test_info_checkpoint(tmp_path, small_model, small_tokenizer):
    path = spark_model.SparkModel(small_model, small_tokenizer).save(tmp_path / "c")
    r = spark("info", "--checkpoint", str(path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["d_model"] == small_model.cfg.d_model


def test_errors_are_one_clear_line(tmp_path):
    r = spark("info", "--checkpoint", str(tmp_path / "missing"))
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = spark("info", "--preset", "huge")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.replace("python3 -m ", "") in readme
