#!/usr/bin/env bash
# Load harness, one command: installs the tools it needs with apt (when missing), builds
# icp-gate in release, then runs bench.py (icp-gate vs nginx vs HAProxy). See README.md here.
#
#   benches/load/run.sh                  # full: every scenario, N = 1 000 and 1 000 000, 2 rounds
#   benches/load/run.sh --quick          # smoke test: N = 1 000, one round, 3 s per measurement
#   benches/load/run.sh --scenarios http --sizes 1000 --rounds 3
#   benches/load/run.sh --syscalls       # also count system calls per operation (installs perf)
#   benches/load/run.sh --help           # every option of bench.py
#
# Own options: --no-install (never call apt), --no-build (use the existing release binary).
# Everything else goes to bench.py.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

install=1 build=1 syscalls=0 args=()
for a in "$@"; do
    case "$a" in
        --no-install) install=0 ;;
        --no-build) build=0 ;;
        -h | --help) exec python3 "$here/bench.py" --help ;;
        --syscalls) syscalls=1; args+=("$a") ;;
        *) args+=("$a") ;;
    esac
done

# --- tools (Debian package names) ---------------------------------------------------------
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need nginx nginx
need haproxy haproxy
need wrk wrk
need curl curl
need openssl openssl
need taskset util-linux
need python3 python3
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
[ $syscalls = 0 ] || need perf linux-perf

if [ ${#missing[@]} -gt 0 ]; then
    if [ $install = 0 ]; then
        echo "missing packages: ${missing[*]} (and --no-install given)" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "installing: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
fi

# --- icp-gate, release build ----------------------------------------------------------------
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="$target/release/icp-gate"
if [ $build = 1 ]; then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: icp-gate needs a Rust toolchain >= 1.85 (rustup);" \
             "Debian's own rustc is too old" >&2
        exit 1
    fi
    echo "building icp-gate (release) into $target" >&2
    cargo build --release --locked --quiet --manifest-path "$repo/Cargo.toml"
fi

export ICP_LOAD_COMMAND="benches/load/run.sh $*"
exec python3 "$here/bench.py" --binary "$bin" "${args[@]}"
