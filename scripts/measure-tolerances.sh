#!/usr/bin/env bash
# The worst gap of every tolerance comparison in the numerics tests (tests/support/compute_paths.py), under this CPU's own
# OpenBLAS kernel and each KERNEL given (default: the second kernel `make test` uses). Writes one JSON per kernel to
# .cache/tolerances/ and prints them side by side: the numbers beside the bounds in tests/support/compute_paths.py.
#   bash scripts/measure-tolerances.sh [KERNEL ...] [-- PYTEST_ARGS]
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
kernels=(); args=()
while [ $# -gt 0 ]; do if [ "$1" = "--" ]; then shift; args=("$@"); break; fi; kernels+=("$1"); shift; done
[ ${#kernels[@]} -gt 0 ] || kernels=("$($py tests/support/kernels.py)")
own=$($py tests/support/kernels.py --own)
out=.cache/tolerances; mkdir -p "$out"
for k in "$own" "${kernels[@]}"; do
  [ -n "$k" ] || continue
  echo "== $k"
  OPENBLAS_CORETYPE=$k PARALOOP_TOLERANCE_REPORT="$out/$k.json" .venv/bin/pytest -q -p no:cacheprovider -m numerics \
    "${args[@]}" | tail -1
done
$py - "$out" "$own" "${kernels[@]}" <<'PY'
import json, sys
from pathlib import Path
out, kernels = Path(sys.argv[1]), [k for k in dict.fromkeys(sys.argv[2:]) if k]
seen = {k: json.loads((out / f"{k}.json").read_text()) for k in kernels if (out / f"{k}.json").is_file()}
names = sorted({n for v in seen.values() for n in v})
print(f"{'comparison':58s}" + "".join(f"{k:>13s}" for k in seen))
for n in names:
    print(f"{n:58s}" + "".join(f"{v[n]:13.2e}" if n in v else f"{'-':>13s}" for v in seen.values()))
PY
