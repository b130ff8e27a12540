"""`xz -9e` bits per byte: our in-process figure against the xz program itself."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval.xz_baseline import xz_bits_per_byte, xz_size

STDLIB = Path(sys.modules["os"].__file__).parent


@pytest.mark.skipif(shutil.which("xz") is None, reason="the xz program is not installed")
@pytest.mark.parametrize("name", ["os.py", "json/decoder.py", "this.py"])
def test_size_equals_the_xz_program(name):
    data = (STDLIB / name).read_bytes()
    out = subprocess.run(["xz", "-9e", "-c", "--check=crc64"], input=data,
                         capture_output=True, check=True).stdout
    assert xz_size(data) == len(out)


def test_files_are_compressed_alone_and_bad_files_skipped(tmp_path):
    a, b = (STDLIB / "os.py").read_bytes(), (STDLIB / "heapq.py").read_bytes()
    (tmp_path / "a.py").write_bytes(a)
    (tmp_path / "b.py").write_bytes(b)
    (tmp_path / "empty.py").write_bytes(b"")
    (tmp_path / "latin1.py").write_bytes(b"x = '\xe9'\n")
    got = xz_bits_per_byte(sorted(tmp_path.iterdir()) + [tmp_path / "missing.py"])
    assert got["files"] == 2 and got["bytes"] == len(a) + len(b)
    assert got["compressed_bytes"] == xz_size(a) + xz_size(b)
    assert got["bits_per_byte"] == pytest.approx(8 * got["compressed_bytes"] / got["bytes"])
    assert 1.0 < got["bits_per_byte"] < 3.0  # source code: xz gets 2.5-4x
