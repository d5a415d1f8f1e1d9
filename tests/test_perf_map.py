"""benchmarks/perf_map.py: the map perf reads to name numba's compiled functions."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nm") is None, reason="the helper reads symbols with binutils' nm")
def test_the_map_names_the_compiled_functions_at_their_addresses(tmp_path):
    # a script that compiles one of the package's kernels afresh (an empty numba cache), run through the helper
    script = tmp_path / "run.py"
    script.write_text("import numpy as np\nfrom pipeline.metrics.gwd import box_areas\n"
                      "print(box_areas(np.array([[0.0, 0.0, 2.0, 3.0]]))[0])\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "perf_map.py"), "--map", str(tmp_path / "m.map"),
                           "--objects", str(tmp_path / "objects"), str(script)], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.strip() == "6.0"  # the script ran as __main__
    assert "compiled functions mapped" in done.stderr
    rows = [line.split(maxsplit=2) for line in (tmp_path / "m.map").read_text().splitlines()]
    named = [(int(start, 16), int(size, 16)) for start, size, name in rows if "box_areas" in name]
    assert named and all(start > 0 and size > 0 for start, size in named)
    bases = (tmp_path / "objects" / "bases.txt").read_text().split()
    assert Path(bases[0]).is_file() and int(bases[1], 16) > 0


def test_functions_loaded_from_numbas_cache_are_counted_not_mapped(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import perf_map
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    class Library:
        def _get_compiled_object(self):
            raise RuntimeError("no compiled object yet")

    class Result:
        library = Library()
        fndesc = type("Desc", (), {"llvm_func_name": "f"})()

    monkeypatch.setattr(perf_map, "compiled_libraries", lambda: [("pipeline.x.f", Result())])
    assert perf_map.write_map(tmp_path / "m.map", None) == (0, 1)
    assert (tmp_path / "m.map").read_text() == "\n"
