"""Name numba's compiled functions in a ``perf`` profile: runs a script, and when it ends writes perf's map for JIT
code (``/tmp/perf-<pid>.map``) from the object code of every compiled function of ``pipeline``, so that ``perf
report`` shows ``_overlapping``, ``_cluster_label_group``... where it would show bare addresses.

Run::

    NUMBA_CACHE_DIR=$(mktemp -d) perf record -e cpu-clock -F 4000 -o perf.data \\
        python benchmarks/perf_map.py [--objects DIR] [--map PATH] SCRIPT [ARGS...]
    perf report -i perf.data --no-children --sort dso,symbol

A fresh ``NUMBA_CACHE_DIR`` matters: a function loaded from numba's cache carries no object code, and is left out
of the map (the script says how many). ``--objects DIR`` also keeps each compiled function's object file, with its
load address in ``DIR/bases.txt``, for counts per instruction (``perf script -F ip`` against ``objdump -d``).
Inlined functions are counted in their callers. This machine's perf has no hardware counters: ``cpu-clock`` only.
"""
from __future__ import annotations

import argparse
import atexit
import os
import runpy
import subprocess
import sys
from pathlib import Path


def compiled_libraries() -> list[tuple[str, object]]:
    """``(module.function, compile result)`` for every compiled signature of ``pipeline``'s numba functions."""
    import numba
    found, seen = [], set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("pipeline") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if not isinstance(value, numba.core.registry.CPUDispatcher):
                continue
            for result in value.overloads.values():
                if id(result.library) not in seen:
                    seen.add(id(result.library))
                    found.append((f"{name}.{attr}", result))
    return found


def _symbols(object_file: Path) -> dict[str, tuple[int, int]]:
    """``{symbol: (offset, size)}`` of the functions defined in an object file (``nm -S``)."""
    out = subprocess.run(["nm", "-S", "--defined-only", str(object_file)], capture_output=True, text=True,
                         check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tT":
            symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return symbols


def write_map(map_path: Path, objects: Path | None) -> tuple[int, int]:
    """Write the map (and with ``objects`` the object files); returns ``(functions mapped, functions without
    object code)``."""
    lines, mapped, missing = [], 0, 0
    work = objects or Path(os.environ.get("TMPDIR", "/tmp")) / f"perf-map-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    bases = []
    for k, (name, result) in enumerate(compiled_libraries()):
        entry = result.fndesc.llvm_func_name
        try:
            code = result.library._get_compiled_object()  # numba keeps it for functions compiled in this process
        except RuntimeError:
            missing += 1
            continue
        object_file = work / f"{name}.{k}.o"
        object_file.write_bytes(code)
        symbols = _symbols(object_file)
        if entry not in symbols:
            missing += 1
            continue
        base = result.library.get_pointer_to_function(entry) - symbols[entry][0]
        bases.append(f"{object_file} {base:x}")
        lines += [f"{base + offset:x} {size:x} {symbol}" for symbol, (offset, size) in symbols.items()]
        mapped += 1
        if objects is None:
            object_file.unlink()
    if objects is not None:
        (objects / "bases.txt").write_text("\n".join(bases) + "\n")
    else:
        work.rmdir()
    map_path.write_text("\n".join(lines) + "\n")
    return mapped, missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=Path, help="keep each function's object file here, with bases.txt")
    ap.add_argument("--map", type=Path, help="where to write the map (default: perf's /tmp/perf-<pid>.map)")
    ap.add_argument("script", type=Path)
    ap.add_argument("args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    map_path = args.map or Path(f"/tmp/perf-{os.getpid()}.map")

    def at_exit() -> None:
        mapped, missing = write_map(map_path, args.objects)
        print(f"perf_map: {mapped} compiled functions mapped in {map_path}"
              + (f", {missing} without object code (loaded from numba's cache)" if missing else ""), file=sys.stderr)

    atexit.register(at_exit)
    sys.argv = [str(args.script), *args.args]
    sys.path.insert(0, str(args.script.resolve().parent))
    runpy.run_path(str(args.script), run_name="__main__")


if __name__ == "__main__":
    main()
