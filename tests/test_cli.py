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


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_package_command_without_importing_jax():
    r = _python("import sys\n"
                "from spark_model.cli import main\n"
                "try:\n    main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
                "print('JAX-LOADED' if 'jax' in sys.modules else 'NO-JAX', code)\n")
    assert r.returncode == 0, r.stderr
    assert "NO-JAX 0" in r.stdout
    for name in ("info", "generate", "serve", "train", "eval", "bench", "compile"):
        assert f"    {name} " in r.stdout, name
    assert "skipping command" not in r.stderr


def test_a_broken_command_is_skipped_and_reported(monkeypatch, capsys):
    from importlib import metadata

    from spark_model import cli

    good = metadata.EntryPoint("info", "spark_model.commands:info", cli.GROUP)
    broken = metadata.EntryPoint("broken", "no_such_package.cli:command", cli.GROUP)
    wrong = metadata.EntryPoint("wrong", "spark_model.cli:main", cli.GROUP)
    monkeypatch.setattr(cli.metadata, "entry_points", lambda group: [broken, good, wrong])
    assert list(cli.commands()) == ["info"]
    err = capsys.readouterr().err
    assert "skipping command 'broken'" in err and "no_such_package" in err
    assert "skipping command 'wrong'" in err and "not a spark Command" in err


def test_the_model_package_imports_nothing_above_it():
    """spark_model sits at the bottom: importing it and every one of its modules loads none
    of compiler/, train/ or eval/ (checked at run time and in the source)."""
    r = _python("import importlib, pkgutil, sys\n"
                "import spark_model\n"
                "for m in pkgutil.walk_packages(spark_model.__path__, 'spark_model.'):\n"
                "    importlib.import_module(m.name)\n"
                "for name in spark_model.__all__:\n"
                "    getattr(spark_model, name)\n"
                "print(sorted({m.split('.')[0] for m in sys.modules}"
                " & {'compiler', 'train', 'eval'}))\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    import ast
    for path in (ROOT / "spark_model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for n in names:
                assert n.split(".")[0] not in ("compiler", "train", "eval"), (path, n)
