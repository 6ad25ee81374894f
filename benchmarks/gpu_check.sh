#!/usr/bin/env bash
# The prepared GPU check of issue 18: one script, about 8 minutes on one H200, results in
# $OUT/gpu_check.json and $OUT/gpu_check.md (OUT defaults to runs/gpu_check).
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--dry-run] [driver options: benchmarks/gpu_check.py run --help]
#
# --wheels DIR (default: .whl/ when it exists): wheels from benchmarks/gpu_wheels.sh. Those whose
# distribution python3 cannot already import are installed offline into $GPU_CHECK_SITE
# (default /tmp/site), which goes first on PYTHONPATH; set GPU_CHECK_FORCE_WHEELS=1 to install all.
# --dry-run: the same path on the CPU (gloo, tiny shapes), without nvidia-smi, the CUDA tests and
# the kernel benchmark. Exit status: 0 when every required check passed, 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-runs/gpu_check}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
WHEELS=""
ARGS=()
while (($#)); do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
    --wheels=*) WHEELS="${1#--wheels=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
# .whl/ by default on the GPU machine only: a dry run uses this machine's installed packages.
if [[ -z "$WHEELS" && -d .whl && ! " ${ARGS[*]} " =~ " --dry-run " ]]; then
  WHEELS=.whl
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
REPORT="$OUT/wheels.json"

install_wheels() {
  # Which wheels to install: those whose distribution this python does not have (or all, forced).
  local start todo rc=0
  start=$(date +%s.%N)
  todo=$("$PYTHON" - "$WHEELS" "${GPU_CHECK_FORCE_WHEELS:-0}" "$REPORT" <<'PY'
import importlib.metadata as md, json, pathlib, sys
wheels, force, report = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
have, todo = {}, []
for w in sorted(wheels.glob("*.whl")):
    name = w.name.split("-")[0]
    try:
        have[name] = md.version(name)
    except md.PackageNotFoundError:
        have[name] = None
    if force or have[name] is None:
        todo.append(str(w))
there = {k: v for k, v in have.items() if v and not force}
names = [pathlib.Path(t).name for t in todo]
note = f"install {', '.join(n.split('-')[0] for n in names) or 'nothing'}; already there: " + ", ".join(
    f"{k} {v}" for k, v in there.items())
json.dump({"dir": str(wheels), "already_installed": there, "to_install": names, "note": note}, open(report, "w"),
          indent=1)
print("\n".join(todo))
PY
  ) || rc=$?
  if ((rc == 0)) && [[ -n "$todo" ]]; then
    mkdir -p "$SITE"
    mapfile -t files <<<"$todo"
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "${files[@]}" >"$OUT/wheels.log" 2>&1 || rc=$?
  fi
  "$PYTHON" - "$REPORT" "$rc" "$start" "$(date +%s.%N)" "$SITE" <<'PY' || true
import json, pathlib, sys
path, rc, start, end, site = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
p = pathlib.Path(path)
rec = json.loads(p.read_text()) if p.exists() else {}
rec.update(status="ok" if rc == 0 else "failed", required=True, rc=rc, wall_s=round(end - start, 2), site=site)
p.write_text(json.dumps(rec, indent=1))
PY
  return "$rc"
}

# Installed wheels go first on the path (a rerun on the same machine then finds them installed);
# fla's Triton autotuning results are cached, so a resumed run picks the kernels the first run picked.
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_AUTOTUNING="${TRITON_CACHE_AUTOTUNING:-1}"
if [[ -n "$WHEELS" ]]; then
  [[ -d "$WHEELS" ]] || { echo "error: --wheels $WHEELS is not a directory" >&2; exit 2; }
  install_wheels || echo "warning: installing wheels from $WHEELS failed (see $OUT/wheels.log); going on" >&2
else
  rm -f "$REPORT"
fi
rc=0
"$PYTHON" benchmarks/gpu_check.py run --out "$OUT" --wheels-report "$REPORT" "${ARGS[@]}" || rc=$?
echo "gpu_check: exit $rc; results in $OUT/gpu_check.json and $OUT/gpu_check.md"
exit "$rc"
