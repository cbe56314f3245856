#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600) each, two at a time, then minimises each
# corpus (what is committed under fuzz/corpus/). Needs the nightly toolchain and cargo-fuzz:
#   cargo install cargo-fuzz --locked --root ~/.cargo-fuzz && PATH=~/.cargo-fuzz/bin:$PATH
# A finding stops its target and leaves the input under fuzz/artifacts/<target>/: turn it into a
# regression test (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH="${1:-600}"
TARGETS=(command http_head htpasswd at_response pdu)
cargo +nightly fuzz build
run() {
    local t="$1"
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$SECONDS_EACH" -max_len=4096 \
        -print_final_stats=1 > "target/$t.log" 2>&1 && echo "$t: no finding in ${SECONDS_EACH}s" \
        || { echo "$t: FINDING (see fuzz/target/$t.log and fuzz/artifacts/$t/)"; return 1; }
}
status=0
for ((i = 0; i < ${#TARGETS[@]}; i += 2)); do
    pids=()
    for t in "${TARGETS[@]:i:2}"; do
        run "$t" & pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || status=1; done
done
for t in "${TARGETS[@]}"; do
    cargo +nightly fuzz cmin "$t" "corpus/$t" > "target/$t.cmin.log" 2>&1 || true
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "target/$t.log" | tr '\n' ' ' \
        | sed "s/^/$t: /"; echo
done
exit "$status"
