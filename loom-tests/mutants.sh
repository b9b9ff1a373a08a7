#!/usr/bin/env bash
# Planted slips: apply each hand-written mutant in loom-tests/mutants/ (one realistic
# one-line slip in lepus's synchronisation code: an ordering, a notify choice, a step
# split in two) to a scratch copy of the crate, run the loom models its `Models:` line
# names (test-name filters, space-separated), and report whether they catch it. Slow (a rebuild of lepus
# and a model run per mutant), so it is not part of run.sh or CI's default path.
#
# Usage: loom-tests/mutants.sh [--models-at REV] [--generated] [MUTANT...]
#   MUTANT         names of files in mutants/ without .patch (default: all)
#   --generated    instead, the mutants cargo-mutants generates (`cargo install
#                  cargo-mutants --locked`) in the synchronisation cores (src/sync.rs,
#                  pool_core.rs, link.rs, delivery_queue.rs, confirm_tracker.rs, send_core.rs,
#                  end_relay.rs; MUTANT_FILES overrides,
#                  MUTANT_RE keeps only names matching a regex). Hours for all of them.
#   --models-at    run the models (tests/models.rs and the package's Cargo.toml) as they
#                  were at git revision REV, against today's src/: the kill rate "before"
# Environment: LOOM_MAX_PREEMPTIONS (default 3), MUTANT_TIMEOUT seconds per model run
# (default 600), MUTANTS_DIR scratch directory (default loom-tests/target/mutants).
#
# A mutant is "caught" when a model fails (loom reports a deadlock or an assertion
# fails), "MISSED" when the models pass, "timeout" when they run past MUTANT_TIMEOUT,
# "build-error" when the mutated crate does not compile, "run-error" when the test run
# failed without a model failing. Exit status 1 if any was missed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
models_at=""
generated=""
names=()
while [ $# -gt 0 ]; do
    case "$1" in
        --models-at) models_at="$2"; shift 2 ;;
        --generated) generated=1; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) names+=("$1"); shift ;;
    esac
done

export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
export RUSTFLAGS="--cfg lepus_loom"
scratch="${MUTANTS_DIR:-$here/target/mutants}"
export CARGO_TARGET_DIR="$scratch/target"
timeout_s="${MUTANT_TIMEOUT:-600}"
crate="$scratch/crate"
mkdir -p "$crate" "$scratch/logs"
patch_dir="$here/mutants"

if [ -n "$generated" ]; then
    # cargo-mutants' mutants, written as patches in the same format, each with the
    # models of the file it mutates.
    patch_dir="$scratch/generated"
    rm -rf "$patch_dir" && mkdir -p "$patch_dir"
    files="${MUTANT_FILES:-src/sync.rs src/pool_core.rs src/link.rs src/delivery_queue.rs src/confirm_tracker.rs src/send_core.rs src/end_relay.rs}"
    args=()
    for f in $files; do args+=(-f "$f"); done
    (cd "$repo" && cargo mutants --list --json --diff "${args[@]}") >"$scratch/generated.json"
    python3 - "$scratch/generated.json" "$patch_dir" "${MUTANT_RE:-.}" <<'EOF'
import json, re, sys
# Each file's models: test-name filters, space-separated (a model runs if any matches).
# The one-shot reply (sync.rs) is what the RPC and send models wait on; the failure flag
# (send_core.rs) is also each connection generation's in the link models.
models = {"src/sync.rs": "rpc_waiter send_", "src/pool_core.rs": "pool",
          "src/link.rs": "flight_", "src/send_core.rs": "send_ flight_",
          "src/end_relay.rs": "consumer_end",
          "src/delivery_queue.rs": "consumer_", "src/confirm_tracker.rs": "confirms",
          "src/sync/lightq.rs": "consumer_"}
keep = re.compile(sys.argv[3])
for i, m in enumerate(json.load(open(sys.argv[1]))):
    if not keep.search(m["name"]):
        continue
    f = m["file"]
    body = m["diff"].split("\n", 2)[2]
    with open(f"{sys.argv[2]}/g{i:03}.patch", "w") as out:
        out.write(f"Mutant: {m['name']}\nModels: {models.get(f, '')}\n\n")
        out.write(f"--- a/{f}\n+++ b/{f}\n{body}")
EOF
fi
if [ ${#names[@]} -eq 0 ]; then
    for p in "$patch_dir"/*.patch; do names+=("$(basename "$p" .patch)"); done
fi

# The pristine copy: lepus's sources and the loom-tests package, no build outputs.
sync_pristine() {
    rsync -a --delete --exclude target --exclude .git --exclude fuzz "$repo/" "$crate/"
    if [ -n "$models_at" ]; then
        git -C "$repo" show "$models_at:loom-tests/tests/models.rs" >"$crate/loom-tests/tests/models.rs"
        git -C "$repo" show "$models_at:loom-tests/Cargo.toml" >"$crate/loom-tests/Cargo.toml"
    fi
    # rsync restores old modification times; make sure cargo rebuilds lepus each time.
    find "$crate/src" "$crate/loom-tests/tests" -name '*.rs' -exec touch {} +
}

caught=0
missed=0
other=0
printf '%-36s %-14s %s\n' "mutant" "result" "caught by (failing models: why)"
for name in "${names[@]}"; do
    patch_file="$patch_dir/$name.patch"
    [ -f "$patch_file" ] || { echo "no such mutant: $name" >&2; exit 2; }
    filter="$(sed -n 's/^Models: //p' "$patch_file")"
    label="$(sed -n 's/^Mutant: //p' "$patch_file")"
    log="$scratch/logs/$name${models_at:+.at-$models_at}.log"
    sync_pristine
    if ! patch -s -p1 -d "$crate" <"$patch_file" >"$log" 2>&1; then
        printf '%-36s %-14s %s\n' "$label" "patch-failed" "(see $log)"
        other=$((other + 1))
        continue
    fi
    if ! (cd "$crate/loom-tests" && cargo test --release --test models --no-run) >>"$log" 2>&1; then
        printf '%-36s %-14s %s\n' "$label" "build-error" "(see $log)"
        other=$((other + 1))
        continue
    fi
    set +e
    # The filters go to the test harness (cargo takes one only).
    # shellcheck disable=SC2086
    (cd "$crate/loom-tests" && timeout "$timeout_s" cargo test --release --test models \
        -- $filter --nocapture --test-threads=1) >>"$log" 2>&1
    rc=$?
    set -e
    if [ $rc -eq 0 ]; then
        printf '%-36s %-14s %s\n' "$label" "MISSED" "(models '$filter' pass)"
        missed=$((missed + 1))
    elif [ $rc -eq 124 ]; then
        printf '%-36s %-14s %s\n' "$label" "timeout" "(models '$filter' ran past ${timeout_s}s)"
        other=$((other + 1))
    elif ! grep -qE '^deadlock;|panicked at|^test result: FAILED' "$log"; then
        # Failed without a model failing (cargo refused its arguments, ...): not a catch.
        printf '%-36s %-14s %s\n' "$label" "run-error" "(see $log)"
        other=$((other + 1))
    else
        # The failing models cargo lists, or (loom aborts the process on some
        # deadlocks) the model that was running.
        by="$(sed -n '/^failures:$/,/^test result/p' "$log" | grep -E '^    [a-z0-9_]+$' | tr -d ' ' | paste -sd, - || true)"
        [ -n "$by" ] || by="$(grep -oE "^thread '[a-z0-9_]+' \([0-9]+\) panicked" "$log" | cut -d"'" -f2 | uniq | paste -sd, - || true)"
        [ -n "$by" ] || by="$(grep -oE '^test [a-z0-9_]+ \.\.\.' "$log" | tail -1 | awk '{print $2}' || true)"
        if grep -q '^deadlock;' "$log"; then
            how="loom: deadlock"
        else
            how="$(grep -A1 -m1 'panicked at' "$log" | tail -1 | cut -c1-60 || true)"
        fi
        printf '%-36s %-14s %s\n' "$label" "caught" "$by ($how)"
        caught=$((caught + 1))
    fi
done
total=$((caught + missed + other))
echo "== $caught of $total caught, $missed missed, $other other${models_at:+ (models at $models_at)}"
[ $missed -eq 0 ]
