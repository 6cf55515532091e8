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
    bindir="target/$(rustc -vV | sed -n 's/^host: //p')/release"
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

fuzz() {
    local t=$1
    shift
    mkdir -p "artifacts/$t"
    # shellcheck disable=SC2046 # (word splitting of the options is meant)
    "$bindir/$t" -artifact_prefix="artifacts/$t/" $(target_options "$t") "$@"
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
