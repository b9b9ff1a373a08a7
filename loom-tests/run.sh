#!/usr/bin/env bash
# Model-check lepus's synchronisation cores with loom, then check that the two
# deliberately broken variants are caught. Usage: loom-tests/run.sh
# LOOM_MAX_PREEMPTIONS (default 3: every model finishes within about a minute) sets
# the preemption bound.
set -euo pipefail
cd "$(dirname "$0")"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export RUSTFLAGS="--cfg loom"

echo "== loom models (LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS)"
cargo test --release --test models -- --nocapture --test-threads=1

# A broken variant passes its test only if loom reports the failure (should_panic); the
# test itself also checks that the variant was switched on.
for variant in pool oneshot; do
    echo "== broken variant '$variant' (must be caught)"
    LEPUS_LOOM_BROKEN=$variant cargo test --release --test models "broken_$variant" -- \
        --ignored --nocapture 2>&1 | grep -E "^model|panicked at|test result|should panic" || true
    LEPUS_LOOM_BROKEN=$variant cargo test --release --test models "broken_$variant" -- \
        --ignored --quiet >/dev/null 2>&1 \
        || { echo "loom did NOT catch the broken '$variant' variant" >&2; exit 1; }
done
echo "== loom: all models passed and both broken variants were caught"
