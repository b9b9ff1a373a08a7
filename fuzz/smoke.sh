#!/usr/bin/env bash
# Run every fuzz target for N seconds (default 30), starting from its seed corpus in
# fuzz/corpus/<target>/. Exits non-zero if any target crashes (panic, failed property,
# stack overflow, timeout, out of memory) or does not build. Crash inputs are left in
# fuzz/artifacts/<target>/; new corpus entries go to a temporary directory, so the
# committed seeds stay as they are.
#
#   fuzz/smoke.sh        # 30 s per target
#   fuzz/smoke.sh 10     # 10 s per target
#
# Works on the stable toolchain: `-s none` builds without a sanitizer (lepus forbids
# unsafe code, so panics and failed checks are what there is to find).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/smoke.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cargo fuzz build -s none
failed=()
passed=0
for target in $(cargo fuzz list); do
    mkdir -p "$work/$target"
    if cargo fuzz run -s none "$target" "$work/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$work/$target.log" 2>&1; then
        stats="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/$target.log" | tail -1 || true)"
        echo "fuzz $target: ok ($secs s) $stats"
        passed=$((passed + 1))
    else
        echo "fuzz $target: FAILED; the end of its log:" >&2
        tail -n 60 "$work/$target.log" >&2
        failed+=("$target")
    fi
done
echo "fuzz: $passed passed, ${#failed[@]} failed"
if ((${#failed[@]})); then
    echo "fuzz/smoke.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
