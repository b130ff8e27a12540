"""The training corpus's sources and their guarantees: the dependency closure (against a
hand-built set of fake distributions and known members of this environment), stdlib names
unchanged from a plain reading of the files, skipped generated files, the corpus manifest
checked on resume, the repository order (against a whole-file `ast` reading), and the
evaluation's code from outside the corpus."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata as md
import json
import random
import shutil
from pathlib import Path

import pytest

from spark_model.tokenizer import stdlib_python_files
from train import cli, corpus, loop, manifest, repo_order, site_sources
from train.corpus import Document

MINI = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
        "d_ff": 64}


# ---- closure --------------------------------------------------------------------------

def _fake_dist(site: Path, name: str, requires: list[str], files: dict[str, str]
               ) -> md.Distribution:
    """An installed-looking distribution in `site`: METADATA, RECORD and its files."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    record = []
    for rel, text in files.items():
        if not rel.startswith(".."):
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).write_text(text)
        record.append(f"{rel},,")
    record.append(f"{info.name}/METADATA,,")
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return md.PathDistribution(info)


def test_closure_of_fake_distributions(tmp_path):
    """Extras and markers that do not hold are left out, names are normalized, cycles end,
    a requirement that is not installed is listed as missing; the expected set is written
    out by hand."""
    site = tmp_path / "site"
    specs = {
        "root-proj": ["Alpha>=1", "beta_pkg; python_version >= '3'", "gamma; extra == 'test'",
                      "never; python_version < '3'", "ghost>=2"],
        "alpha": ["Delta.Lib", "beta-pkg"],
        "beta-pkg": ["alpha"],  # a cycle
        "delta-lib": [],
        "gamma": ["epsilon"],  # only through an extra: outside
        "epsilon": [],
        "never": [],
        "unrelated": ["alpha"],
    }
    dists = {site_sources.normalize(n): _fake_dist(site, n, r, {}) for n, r in specs.items()}
    c = site_sources.closure("Root_Proj", dists)
    assert c.members == ("alpha", "beta-pkg", "delta-lib")
    assert c.missing == ("ghost",)
    with pytest.raises(LookupError, match="not installed"):
        site_sources.closure("nothing-here", dists)


def test_python_files_follow_the_record(tmp_path):
    site = tmp_path / "site"
    d = _fake_dist(site, "pkg-a", [], {"pkg_a/__init__.py": "", "pkg_a/m.py": "x = 1\n",
                                       "pkg_a/data.txt": "no", "../../bin/tool.py": "",
                                       "pkg_a/__pycache__/m.cpython-311.pyc": ""})
    files = site_sources.python_files(d)
    assert [rel for rel, _ in files] == ["pkg_a/__init__.py", "pkg_a/m.py"]
    assert all(p.is_file() and p.is_relative_to(site) for _, p in files)


def test_this_environments_closure_holds_the_dependencies_not_the_test_extras():
    c = site_sources.closure()
    for name in ("jax", "jaxlib", "numpy", "optax", "flax", "scipy"):  # scipy through jax
        assert name in c.members
    outside = site_sources.outside_closure()
    assert "spark-model" not in c.members and "spark-model" not in outside
    for name in ("pytest", "pluggy", "iniconfig"):
        if name in site_sources.installed():
            assert name in outside and name not in c.members


# ---- sources --------------------------------------------------------------------------

def _plain_stdlib_reading() -> list[tuple[str, str]]:
    """(name, sha256) of the stdlib as the loader always read it: UTF-8 files with text,
    first copy of each content kept, in path order."""
    root = corpus.stdlib_root()
    seen, out = set(), []
    for p in stdlib_python_files():
        try:
            text = p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if text and digest not in seen:
            seen.add(digest)
            out.append((p.relative_to(root).as_posix(), digest))
    return out


def test_stdlib_names_unchanged_and_site_packages_kept_apart():
    reference = _plain_stdlib_reading()
    default, _ = corpus.load_corpus()
    named, _ = corpus.load_corpus(["stdlib"])
    both, stats = corpus.load_corpus(["stdlib", "site-packages"])
    assert [(d.name, d.sha256) for d in default] == reference
    assert [(d.name, d.sha256) for d in named] == reference
    assert [(d.name, d.sha256) for d in both[:len(reference)]] == reference
    site = both[len(reference):]
    assert site and all(d.name.startswith("site-packages/") for d in site)
    dists = {d.name.split("/")[1] for d in site}
    assert {"jax", "numpy", "optax"} <= dists and not {"pytest", "pluggy"} & dists
    assert len({d.name for d in both}) == len(both)
    assert len({d.sha256 for d in both}) == len(both)  # exact copies kept once
    # The held-out stdlib files are the same whether or not site-packages is loaded.
    assert ([d.name for d in corpus.split_corpus(default)[1]]
            == [d.name for d in corpus.split_corpus(both)[1]
                if not d.name.startswith("site-packages/")])
    assert stats.kept == len(both)


def test_oversized_documents_are_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.py").write_text("x = 1\n")
    (src / "huge.py").write_text("y = 2\n" * (corpus.MAX_DOC_BYTES // 6 + 1))
    (src / "table.py").write_text("T = '" + "a" * corpus.MAX_LINE_CHARS + "'\n")
    (src / "long_but_fine.py").write_text(("z = 3\n" * 4000))
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "w" * (corpus.MAX_DOC_BYTES + 1)}) + "\n")
    docs, stats = corpus.load_corpus([src, jl])
    assert sorted(d.name for d in docs) == ["long_but_fine.py", "ok.py"]
    assert stats.oversized == 3 and "3 oversized" in stats.summary()


def test_cli_keeps_named_sources_and_turns_on_repo_order_for_new_runs(tmp_path):
    import argparse
    parser = cli.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--data", "stdlib",
                              "site-packages", str(tmp_path)])
    tc = cli.settings_from_args(args)
    assert tc.data == ("stdlib", "site-packages", str(tmp_path.absolute()))
    assert tc.repo_order is True
    old = loop.TrainConfig().to_json_dict()
    del old["repo_order"]  # a run saved before the field existed
    resumed = cli.settings_from_args(parser.parse_args(["--out", "x", "--resume"]), old)
    assert resumed.repo_order is False
    off = cli.settings_from_args(parser.parse_args(["--out", "x", "--no-repo-order"]))
    assert off.repo_order is False


# ---- manifest -------------------------------------------------------------------------

def _doc(name: str, text: str) -> Document:
    return Document(name, text, hashlib.sha256(text.encode()).hexdigest())


def test_manifest_difference_counts_and_names_the_first():
    a, b, c = _doc("a.py", "a"), _doc("b.py", "b"), _doc("c.py", "c")
    saved = manifest.build([a, b, c], ["src"])
    assert manifest.difference(saved, [a, b, c]) is None
    assert manifest.difference(saved, [a, c]) == (1, "b.py (removed)")
    assert manifest.difference(saved, [a, b, c, _doc("d.py", "d")]) == (1, "d.py (added)")
    assert manifest.difference(saved, [_doc("a.py", "A"), b, _doc("c.py", "C")]) == (
        2, "a.py (changed)")
    assert manifest.difference(saved, [b, _doc("e.py", "e")]) == (3, "a.py (removed)")


@pytest.mark.slow
def test_resume_checks_the_corpus_manifest(tmp_path):
    """A run saves its manifest; a changed, added or removed file stops the resume with one
    line; a run without a manifest (saved before it existed) resumes as before."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
                 "textwrap.py", "string.py", "heapq.py", "shlex.py", "glob.py", "copy.py"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(corpus.stdlib_root() / name, src / name)
    cache = tmp_path / "cache"
    tc = loop.TrainConfig(overrides=tuple(sorted(MINI.items())), vocab_size=384,
                          data=(str(src),), val_permille=200, seq_len=32, batch_size=4,
                          steps=2, warmup=0, log_every=1, eval_every=0, eval_tokens=500,
                          save_every=2, keep=1, repo_order=True)
    out = tmp_path / "run"
    loop.train(tc, out, cache_dir=cache, progress=False)
    saved = json.loads((out / "training" / manifest.MANIFEST_FILE).read_text())
    docs, _ = corpus.load_corpus([src])
    assert saved["documents"] == [[d.name, d.nbytes, d.sha256] for d in docs]

    def resume(steps: int = 2):
        return loop.train(dataclasses.replace(tc, steps=steps), out, resume=True,
                          cache_dir=cache, progress=False)

    original = (src / "heapq.py").read_text()
    (src / "heapq.py").write_text(original + "# edited\n")
    (src / "extra.py").write_text("x = 1\n")
    caches = sorted(cache.glob("tokens-*"))
    with pytest.raises(loop.TrainError, match=r"corpus changed .*: 2 files differ, first "
                                             r"heapq\.py \(changed\)"):
        resume()
    assert sorted(cache.glob("tokens-*")) == caches  # checked before tokenizing
    (src / "heapq.py").write_text(original)
    with pytest.raises(loop.TrainError, match=r"1 file differs, first extra\.py \(added\)"):
        resume()
    (src / "extra.py").unlink()
    (out / "training" / manifest.MANIFEST_FILE).unlink()  # as saved before manifests
    assert resume(3)["step"] == 3


# ---- repository order -----------------------------------------------------------------

def test_repo_order_puts_imported_modules_first_and_is_deterministic():
    docs = [
        _doc("pkg/__init__.py", "from .a import run\n"),
        _doc("pkg/a.py", "from . import b\nimport os\n"),
        _doc("pkg/b.py", "from pkg.c import helper\n\ndef f():\n    import pkg.util\n"),
        _doc("pkg/c.py", "x = 1\n"),
        _doc("pkg/util.py", "from pkg import (\n    c,\n)\n"),
        _doc("pkg/x.py", "from .y import g\n"),  # x and y import each other
        _doc("pkg/y.py", "from .x import h\n"),
        _doc("zeta.py", "import pkg.a\n"),  # another package: order among packages by name
        _doc("alpha.py", "import zeta\n"),
        _doc("site-packages/dist-one/one/__init__.py", "from one import two\n"),
        _doc("site-packages/dist-one/one/two.py", "import pkg\n"),
    ]
    ordered = [d.name for d in repo_order.repo_order(docs)]
    assert ordered == ["alpha.py", "pkg/c.py", "pkg/util.py", "pkg/b.py", "pkg/a.py",
                       "pkg/__init__.py", "pkg/x.py", "pkg/y.py",
                       "site-packages/dist-one/one/two.py",
                       "site-packages/dist-one/one/__init__.py", "zeta.py"]
    for seed in range(3):
        shuffled = list(docs)
        random.Random(seed).shuffle(shuffled)
        assert [d.name for d in repo_order.repo_order(shuffled)] == ordered


def _reference_imports(module: str, is_package: bool, text: str) -> set[str]:
    """Imported names from a whole-file ast walk (the reference for the statement-only
    reading), with the same resolution rules written out again."""
    names = set()
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > len(here):
                    continue
                base = ".".join(here[:len(here) - up] + (node.module.split(".")
                                                         if node.module else []))
            else:
                base = node.module
            for a in node.names:
                names.add(base if a.name == "*" else f"{base}.{a.name}")
    return names


@pytest.mark.parametrize("package", ["json", "email", "asyncio", "importlib", "concurrent"])
def test_statement_reading_finds_the_imports_of_a_full_parse(package):
    root = corpus.stdlib_root()
    for path in sorted((root / package).rglob("*.py")):
        name = path.relative_to(root).as_posix()
        text = path.read_text("utf-8")
        _, module = repo_order.package_and_module(name)
        is_pkg = path.name == "__init__.py"
        assert (repo_order.imported_names(module, is_pkg, text)
                == _reference_imports(module, is_pkg, text)), name


def test_repo_order_of_the_stdlib_respects_acyclic_imports():
    """Over the whole stdlib: a module imported by another of its package, with no import
    path back, comes first."""
    docs, _ = corpus.load_corpus()
    ordered = repo_order.repo_order(docs)
    assert sorted(d.name for d in ordered) == sorted(d.name for d in docs)
    pos = {d.name: i for i, d in enumerate(ordered)}
    assert pos["json/decoder.py"] < pos["json/__init__.py"]
    assert pos["json/scanner.py"] < pos["json/decoder.py"]
    assert pos["email/errors.py"] < pos["email/message.py"]
    assert repo_order.package_and_module("site-packages/six/six.py") == (
        "site-packages/six/six", "six")


# ---- evaluation code outside the corpus -----------------------------------------------

def test_out_of_corpus_default_is_pytest_and_absent_from_the_corpus(monkeypatch):
    from eval import sources

    files, root = sources.default_code()["pytest"]
    assert files and all(p.is_relative_to(root) for p in files)
    assert any(p.relative_to(root).as_posix() == "_pytest/python.py" for p in files)
    assert "pytest" in site_sources.outside_closure()
    monkeypatch.setattr(site_sources, "installed", lambda: {})
    with pytest.raises(sources.SourcesError, match="pytest is not installed"):
        sources.default_code()
    assert list(sources.default_code(["stdlib-heldout"])) == ["stdlib-heldout"]
