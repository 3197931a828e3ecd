#!/usr/bin/env bash
# The prepared GPU check of diffusion-align: DRaFT-K LoRA step memory and time on SD1.5 (512 px) and
# SDXL (1024 px) built from config with random weights, beside the memory planner's predictions; the
# fp16 / bf16 paths (finite losses, gradients and images; the VAE decoder in float32 when upcast); FK
# steering overhead over plain batched sampling.  What runs and how: bench/gpu/run.py's docstring.
#
#   bash bench/gpu/run.sh --out DIR        on one GPU (H200), under 8 minutes: DIR/gpu_check.json
#   bash bench/gpu/run.sh --smoke          on the CPU, every code path at toy sizes (one to two minutes):
#                                          bench/results/gpu_check_smoke.json (git-ignored)
#
# Options after the first are passed to bench/gpu/run.py (--deadline-s, --out).  The exit status is 0
# when every row ran or was skipped for a reason (memory, time), 1 when a row failed or a precision
# check did not pass, 2 when the check could not start, 3 when diffusers could not be installed.
#
# diffusers on the GPU machine.  Torch, transformers, peft and accelerate are installed there;
# diffusers is not and travels as a wheel in .whl/ at the repository root (git-ignored: name it in the
# device tool's `carry`).
# Fetch it here (pure Python; the version this checkout is tested with, which pyproject's
# diffusers>=0.30 allows), with the pure-Python packages it needs that may be missing there:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata zipp
#
# (--platform any works as well: these are py3-none-any wheels.)  diffusers 0.42.1 also needs
# huggingface_hub>=1.32 (and filelock, regex, requests, safetensors>=0.8, Pillow, which transformers
# brings); add `huggingface_hub==<version>` to the download where the machine's is older.  This script
# installs, into $ALIGN_SITE (default /tmp/align-site, put first on PYTHONPATH), the wheels of .whl/
# ($ALIGN_WHEELS) whose packages are missing, and all of them when diffusers still does not import.
#
# The code revision: where `git` is not available the results record $ALIGN_CODE_REVISION (pass the
# commit, e.g. `ALIGN_CODE_REVISION=abc1234 bash bench/gpu/run.sh --out $OUT`) and always a digest of
# the Python sources, which `python bench/gpu/run.py --digest` prints in a checkout.
#
# Then, here: copy DIR/gpu_check.json to bench/results/ and run
#   python bench/report.py --update BENCHMARKS.md
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
SITE="${ALIGN_SITE:-/tmp/align-site}"
WHEELS="${ALIGN_WHEELS:-$ROOT/.whl}"

# the models module needs huggingface_hub at the version diffusers requires; "import diffusers" alone is lazy
diffusers_imports() { "$PYTHON" -c "from diffusers import UNet2DConditionModel" >/dev/null 2>&1; }

install_wheels() {  # $1 = missing: only wheels whose distribution is not installed; all: every wheel
    local wheels
    wheels=$("$PYTHON" - "$1" "$WHEELS"/*.whl <<'EOF'
import importlib.metadata as md
import sys

mode, paths = sys.argv[1], sys.argv[2:]
for path in paths:
    name = path.rsplit("/", 1)[-1].split("-", 1)[0]
    try:
        md.version(name)
        installed = True
    except md.PackageNotFoundError:
        installed = False
    if mode == "all" or not installed:
        print(path)
EOF
)
    if [ -n "$wheels" ]; then
        echo "installing into $SITE: $(echo $wheels | tr '\n' ' ')"
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" $wheels
    fi
}

if ! diffusers_imports; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "error: diffusers is not importable and $WHEELS/ holds no wheels; see the top of bench/gpu/run.sh" >&2
        exit 3
    fi
    mkdir -p "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    install_wheels missing
    if ! diffusers_imports; then
        install_wheels all
    fi
    if ! diffusers_imports; then
        echo "error: diffusers still does not import after installing $WHEELS/:" >&2
        "$PYTHON" -c "from diffusers import UNet2DConditionModel" 2>&1 | tail -5 >&2
        exit 3
    fi
fi

exec "$PYTHON" "$ROOT/bench/gpu/run.py" "$@"
