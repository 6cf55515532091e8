# Shared by run-smoke and run-long (sourced, from fuzz/): the toolchain set-up, the target list, one build, and
# `fuzz <target> <libFuzzer args...>`, which runs the binary just built.
#
# Works with the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z sanitizer flags cargo-fuzz
# passes. Installs cargo-fuzz if it is missing.

export RUSTC_BOOTSTRAP=1
# The fuzz workspace builds into fuzz/target, whatever the caller's CARGO_TARGET_DIR says.
unset CARGO_TARGET_DIR
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"

# The slowest rate a target should reach, in executions per second on one core.
MIN_RATE="${FUZZ_MIN_RATE:-5000}"

# Targets that fuzz with a build without AddressSanitizer (`cargo fuzz build -s none`, into target/plain/), and
# whose corpus, the committed inputs and every input the run added, is then run through the AddressSanitizer build
# (`asan_recheck`): a sanitizer build checks what the fast build found, as AFL++'s guide splits campaigns on many
# cores. For a target whose AddressSanitizer build stays below MIN_RATE whatever its harness does:
# `blkif_dataplane` runs about 1900 to 2800 executions per CPU-second with AddressSanitizer and 6800 to 7000
# without (2 cores, 2026-12-06; fuzz/README.md). Its assertions (the target's invariants) hold in both builds; what
# the plain build misses is a memory error that does not crash, on an input that found nothing new.
# FUZZ_PLAIN_TARGETS= (empty) fuzzes every target with AddressSanitizer.
PLAIN_TARGETS="${FUZZ_PLAIN_TARGETS-blkif_dataplane}"

# is_plain <target>: whether the target fuzzes with the plain build.
is_plain() {
    [[ " $PLAIN_TARGETS " == *" $1 "* ]]
}

# fuzz_setup <name> [target...]: sets `targets` (the arguments, or every target) and builds them once.
fuzz_setup() {
    local name=$1
    shift
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "$name: installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
    if [ "$#" -gt 0 ]; then
        targets=("$@")
    else
        mapfile -t targets < <(cargo fuzz list)
    fi
    echo "$name: building ${#targets[@]} targets"
    cargo fuzz build
    # Run the binaries just built (no rebuild per target): what `cargo fuzz run` would run, with its settings.
    local host
    host=$(rustc -vV | sed -n 's/^host: //p')
    bindir="target/$host/release"
    plaindir="target/plain/$host/release"
    local t
    for t in "${targets[@]}"; do
        if is_plain "$t"; then
            echo "$name: building $t without AddressSanitizer (FUZZ_PLAIN_TARGETS)"
            cargo fuzz build --sanitizer none --target-dir target/plain "$t"
        fi
    done
}

# target_options <target>: libFuzzer options a target always runs with (before the caller's).
target_options() {
    case $1 in
        # It keeps its data planes across inputs (src/targets/blkif_dataplane/lanes.rs), so an input that starts
        # one allocates more than it frees, by design. libFuzzer runs such an input again and, if that run does
        # too, has LeakSanitizer scan the whole heap (about 25 ms, a hundred inputs' time) until it gives up after
        # 1000 of them. LeakSanitizer still checks the whole process when it exits.
        blkif_dataplane) echo -detect_leaks=0 ;;
    esac
}

# run_build <dir> <target> <libFuzzer args...>: run a target's binary of one build.
run_build() {
    local dir=$1 t=$2
    shift 2
    mkdir -p "artifacts/$t"
    # shellcheck disable=SC2046 # (word splitting of the options is meant)
    "$dir/$t" -artifact_prefix="artifacts/$t/" $(target_options "$t") "$@"
}

# fuzz <target> <libFuzzer args...>: the AddressSanitizer build (replays, merges, rechecks).
fuzz() {
    run_build "$bindir" "$@"
}

# fuzz_fast <target> <libFuzzer args...>: the build a target fuzzes with (plain for PLAIN_TARGETS).
fuzz_fast() {
    if is_plain "$1"; then
        run_build "$plaindir" "$@"
    else
        run_build "$bindir" "$@"
    fi
}

# asan_recheck <target> <scratch dir> <corpus dir...>: for a plain target, run every input of the corpus
# directories through the AddressSanitizer build (-runs=0; the scratch directory first, so that nothing is written
# to the corpora). Fails if one fails there; the log is <scratch dir>.log. Nothing to do for the other targets.
asan_recheck() {
    local t=$1 scratch=$2
    shift 2
    is_plain "$t" || return 0
    rm -rf "$scratch"
    mkdir -p "$scratch"
    fuzz "$t" -runs=0 -timeout=30 -rss_limit_mb=4096 "$scratch" "$@" >"$scratch.log" 2>&1
}

# final_stat <log> <name>: the last `stat::<name>` libFuzzer printed (-print_final_stats=1), or nothing.
final_stat() {
    sed -n "s/^stat::$2: *//p" "$1" | tail -1
}

# replay_regressions <target> <scratch dir>: replay regressions/<target>/ (-runs=0; the scratch directory first,
# so nothing is ever written to regressions/). Fails if an input fails again.
replay_regressions() {
    local t=$1 scratch=$2
    if [ -d "regressions/$t" ] && [ -n "$(ls -A "regressions/$t")" ]; then
        mkdir -p "$scratch"
        fuzz "$t" -runs=0 "$scratch" "regressions/$t" >"$scratch.log" 2>&1
    fi
}
