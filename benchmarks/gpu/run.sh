#!/usr/bin/env bash
# The GPU run: self-check verdicts, kernel tests, kernel timings, guided steps, each stage
# writing <OUT>/<stage>.md and .json as it goes, under its own time limit (500 s in all).
#
#   benchmarks/gpu/run.sh OUT [--dry-run]     (DRY_RUN=1 works too: tiny sizes on the CPU)
#
# WHEELS=<folder>: install the missing pure-Python dependencies from it first (README.md).
# <STAGE>_LIMIT_S (SELFCHECK, TESTS, KERNELS, STEPS) override the stage limits in seconds.
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:?usage: benchmarks/gpu/run.sh OUT [--dry-run]}
shift
dry=${DRY_RUN:-0}
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && dry=1
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${PYTHON:-python}

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export DIT_ATTN_CACHE="$out/cache"  # tuning results and self-check failures of this run (kept for a rerun)
flags=()
if [ "$dry" = 1 ]; then
    flags=(--dry-run)
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
fi

if [ -n "${WHEELS:-}" ] && ! "$python" -c "import diffusers, transformers, pytest" 2>/dev/null; then
    echo "installing dependencies from $WHEELS"
    "$python" -m pip install --quiet --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" \
        || echo "installing from $WHEELS failed: the stages that need diffusers will fail"
fi

summary="$out/stages.md"
printf '# GPU run stages\n\n| stage | exit status | seconds | limit |\n|---|---:|---:|---:|\n' > "$summary"
json_rows=()
total_start=$(date +%s)

run_stage() {  # name, default limit, script
    local name=$1 limit=$2 script=$3 start status seconds variable
    variable="$(echo "$name" | tr '[:lower:]' '[:upper:]')_LIMIT_S"
    limit=${!variable:-$limit}
    echo "== stage $name (limit ${limit} s)"
    start=$(date +%s)
    PYTEST_LIMIT_S=$(( limit - 15 )) timeout -k 5 "$limit" "$python" "$here/$script" --out "$out" "${flags[@]}"
    status=$?
    seconds=$(( $(date +%s) - start ))
    [ "$status" = 124 ] && echo "stage $name ran past its limit; its files hold what it finished"
    echo "== stage $name: exit status $status, ${seconds} s"
    printf '| %s | %s | %s | %s |\n' "$name" "$status" "$seconds" "$limit" >> "$summary"
    json_rows+=("{\"stage\": \"$name\", \"exit_status\": $status, \"seconds\": $seconds, \"limit_s\": $limit}")
    local IFS=,
    printf '{"dry_run": %s, "stages": [%s]}\n' "$([ "$dry" = 1 ] && echo true || echo false)" "${json_rows[*]}" > "$out/stages.json"
}

run_stage selfcheck 50 stage_selfcheck.py
run_stage tests 160 stage_tests.py
run_stage kernels 140 stage_kernels.py
run_stage steps 150 stage_steps.py

printf '\ntotal: %s s\n' "$(( $(date +%s) - total_start ))" | tee -a "$summary"
echo "results in $out"
