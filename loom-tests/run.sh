#!/usr/bin/env bash
# Model-check lepus's synchronisation cores with loom, then check that the deliberately
# broken variants are caught. Usage: loom-tests/run.sh
# LOOM_MAX_PREEMPTIONS (default 3) sets the preemption bound. The planted-slip harness
# (slow, not run here) is mutants.sh.
set -euo pipefail
cd "$(dirname "$0")"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export RUSTFLAGS="--cfg lepus_loom"

echo "== loom models (LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS)"
cargo test --release --test models -- --nocapture --test-threads=1

# Each broken variant (LEPUS_LOOM_BROKEN=<variant>) and the model that must catch it.
# The models passed above, so a failure with the variable set is the variant's. loom
# reports some deadlocks by aborting the test process, so this checks the exit status
# and loom's report rather than using should_panic.
broken=(
    "pool pool_acquire_release_drop_and_link_failure"
    "oneshot rpc_waiter_races_reply_and_connection_loss"
    "queue-store consumer_queue_io_and_consumer_alone"
    "send-fence send_rpc_waiter_races_link_failure_and_final_drain"
    "gate-carry gate_keeps_frames_whole_and_each_senders_in_order"
    "gate-rest gate_keeps_frames_whole_and_each_senders_in_order"
    "gate-queue gate_keeps_frames_whole_and_each_senders_in_order"
    "quiet-wake-one consumer_queue_quiet_batch_wakes_every_sleeper"
    "dispatch-claim dispatch_serves_each_queue_by_one_thread_and_leaves_nothing"
    "dispatch-recheck dispatch_serves_each_queue_by_one_thread_and_leaves_nothing"
    "dispatch-unwatch dispatch_pays_what_a_leaving_consumer_owed"
)
for entry in "${broken[@]}"; do
    read -r variant model <<<"$entry"
    echo "== broken variant '$variant' (must be caught by $model)"
    set +e
    out="$(LEPUS_LOOM_BROKEN=$variant cargo test --release --test models "$model" -- \
        --exact --nocapture --test-threads=1 2>&1)"
    rc=$?
    set -e
    grep -E "deadlock|panicked at|test result" <<<"$out" | head -3 || true
    if [ $rc -eq 0 ] || ! grep -qE "deadlock|panicked at" <<<"$out"; then
        echo "loom did NOT catch the broken '$variant' variant" >&2
        exit 1
    fi
done
echo "== loom: all models passed and all ${#broken[@]} broken variants were caught"
