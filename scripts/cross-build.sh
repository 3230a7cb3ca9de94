#!/usr/bin/env bash
# Static, stripped release binaries of the box (storebox) and the hub
# (storehub) for ARM boards, built without Docker; their debug info kept apart.
#
#   scripts/cross-build.sh [--armv7] [--fault-injection] [--no-install] [TARGET...]
#
# TARGET defaults to aarch64-unknown-linux-musl. Supported:
#   aarch64-unknown-linux-musl      Debian gcc-aarch64-linux-gnu   (verified)
#   armv7-unknown-linux-musleabihf  Debian gcc-arm-linux-gnueabihf (needs
#                                   rustup's rust-std for that target)
#   armv7-unknown-linux-gnueabihf   Debian gcc-arm-linux-gnueabihf, linked
#                                   statically against glibc (+crt-static)
# --armv7 means armv7-unknown-linux-musleabihf when rustup can install its
# standard library, else armv7-unknown-linux-gnueabihf, and says so.
#
# Rust's musl targets bring their own musl libc, crt objects and libunwind, so
# Debian's glibc cross gcc serves as linker and as C compiler for the C parts
# of crates (ring, zstd-sys); see .cargo/config.toml. The static glibc build
# resolves names through the NSS built into libc.a (files, dns); glibc warns
# that a static binary would need its own version's shared NSS modules for
# anything else (ldap, mdns...), which a box does not use.
#
# The release profile (LTO, panic=abort) is built with line tables; each
# binary is then split: target/T/release/NAME stripped, NAME.debug beside it
# with the debug info, tied by build id and .gnu_debuglink (gdb and
# addr2line find it; keep it with the release, do not ship it).
#
# --fault-injection builds, instead, storebox alone with the test-only fault
# switches (--features fault-injection) in the `fault-test` profile, into
# target/T/fault-test/storebox: for the image boot test, never for a release.
#
# Installs only what is missing (apt packages, after one `apt-get update`;
# rustup targets) and prints nothing for what is already there. Then runs
#   cargo build --release --locked --target T --bins -p storebox -p storehub
# and prints the binaries' sizes. Output goes to the normal target dir
# (target/T/release/, or $CARGO_TARGET_DIR/T/release/).
#
# Environment: CARGO (default cargo), CARGO_TARGET_DIR, and any of
# CC_<target>, AR_<target>, CARGO_TARGET_<TARGET>_LINKER to override the
# Debian cross gcc/ar chosen here.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO=${CARGO:-cargo}
PACKAGES=(storebox storehub)
install=1
targets=()
armv7=0
profile=release

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

while (($#)); do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --armv7) armv7=1 ;;
        --fault-injection) profile=fault-test ;;
        --no-install) install=0 ;;
        -*) echo "cross-build: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) targets+=("$1") ;;
    esac
    shift
done
# --armv7: musl when rustup has its standard library for this toolchain, else static glibc.
if ((armv7)); then
    if rustup target list --installed | grep -qx armv7-unknown-linux-musleabihf ||
        { ((install)) && rustup target add armv7-unknown-linux-musleabihf >/dev/null 2>&1; }; then
        targets+=(armv7-unknown-linux-musleabihf)
    else
        echo "cross-build: no Rust standard library for armv7-unknown-linux-musleabihf" \
            "from rustup; building armv7-unknown-linux-gnueabihf (static glibc) instead" >&2
        targets+=(armv7-unknown-linux-gnueabihf)
    fi
fi
((${#targets[@]})) || targets=(aarch64-unknown-linux-musl)

# target -> "gcc-prefix apt-packages..."
toolchain_for() {
    case $1 in
        aarch64-unknown-linux-musl)
            echo "aarch64-linux-gnu- gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
        armv7-unknown-linux-musleabihf|armv7-unknown-linux-gnueabihf)
            echo "arm-linux-gnueabihf- gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
        *)
            echo "cross-build: unsupported target '$1'" >&2
            echo "  (supported: aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf" \
                "armv7-unknown-linux-gnueabihf)" >&2
            return 1 ;;
    esac
}

as_root() {
    if ((EUID == 0)); then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else echo "cross-build: need root (or sudo) to run: $*" >&2; return 1
    fi
}

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

for t in "${targets[@]}"; do toolchain_for "$t" >/dev/null || exit 2; done

# --- install what is missing -------------------------------------------------
missing=()
for t in "${targets[@]}"; do
    read -r _prefix pkgs <<<"$(toolchain_for "$t")"
    for p in $pkgs; do
        pkg_installed "$p" || missing+=("$p")
    done
done
command -v file >/dev/null || missing+=(file)

if ((${#missing[@]})); then
    if ((!install)); then
        echo "cross-build: missing apt packages: ${missing[*]} (not installing: --no-install)" >&2
        exit 1
    fi
    echo "cross-build: installing ${missing[*]}"
    log=$(mktemp)
    if ! { as_root apt-get update -qq &&
           as_root env DEBIAN_FRONTEND=noninteractive \
               apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"
        echo "cross-build: apt-get failed" >&2
        exit 1
    fi
    rm -f "$log"
fi

installed_targets=$(rustup target list --installed)
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$installed_targets" && continue
    if ((!install)); then
        echo "cross-build: rustup target $t is missing (not installing: --no-install)" >&2
        exit 1
    fi
    echo "cross-build: rustup target add $t"
    if ! rustup target add "$t" >/dev/null; then
        echo "cross-build: could not get the Rust standard library for $t" >&2
        exit 1
    fi
done

# --- build -------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-target}
build_args=(--release)
if [[ $profile == fault-test ]]; then
    PACKAGES=(storebox)
    build_args=(--profile fault-test --features fault-injection)
fi
pkg_args=()
for p in "${PACKAGES[@]}"; do pkg_args+=(-p "$p"); done
# Line tables, not stripped by cargo: the split below keeps them in NAME.debug.
export CARGO_PROFILE_RELEASE_DEBUG=${CARGO_PROFILE_RELEASE_DEBUG:-line-tables-only}
export CARGO_PROFILE_RELEASE_STRIP=${CARGO_PROFILE_RELEASE_STRIP:-none}

for t in "${targets[@]}"; do
    read -r prefix _pkgs <<<"$(toolchain_for "$t")"
    tu=${t//-/_}                                  # aarch64_unknown_linux_musl
    TU=$(tr '[:lower:]' '[:upper:]' <<<"$tu")     # AARCH64_UNKNOWN_LINUX_MUSL
    cc_var=CC_$tu ar_var=AR_$tu ld_var=CARGO_TARGET_${TU}_LINKER
    export "$cc_var=${!cc_var:-${prefix}gcc}"
    export "$ar_var=${!ar_var:-${prefix}ar}"
    export "$ld_var=${!ld_var:-${prefix}gcc}"
    if [[ $t == *-gnueabihf ]]; then
        # glibc targets link dynamically unless told; an appliance binary must not.
        flags_var=CARGO_TARGET_${TU}_RUSTFLAGS
        export "$flags_var=${!flags_var:-} -C target-feature=+crt-static"
    fi

    echo "cross-build: $t, profile $profile (cc ${!cc_var}, linker ${!ld_var})"
    start=$SECONDS
    "$CARGO" build "${build_args[@]}" --locked --target "$t" --bins "${pkg_args[@]}"
    echo "cross-build: $t built in $((SECONDS - start)) s"

    for p in "${PACKAGES[@]}"; do
        bin=$target_dir/$t/$profile/$p
        if [[ ! -f $bin ]]; then
            echo "cross-build: $bin was not built" >&2
            exit 1
        fi
        desc=$(file -b "$bin")
        case $desc in
            *"statically linked"*|*"static-pie linked"*) ;;
            *) echo "cross-build: $bin is not static: $desc" >&2; exit 1 ;;
        esac
        # Debug info apart: cargo relinks only when a source changed, so split only a binary
        # that still has debug sections (a second run finds it stripped and leaves it, and
        # the NAME.debug of the first).
        if "${prefix}readelf" -S -W "$bin" | grep -q '\] \.debug_info '; then
            "${prefix}objcopy" --only-keep-debug "$bin" "$bin.debug"
            # A new file, not in place: cargo's copy in deps/ (a hard link) keeps its debug info.
            "${prefix}objcopy" --strip-all --add-gnu-debuglink="$bin.debug" "$bin" "$bin.tmp"
            mv "$bin.tmp" "$bin"
        fi
        desc=$(file -b "$bin")
        size=$(stat -c %s "$bin")
        printf '%-55s %10d bytes (%s KiB)  %s\n' "$bin" "$size" "$((size / 1024))" \
            "$(cut -d, -f1-2 <<<"$desc")"
        # An if, not an &&: a binary without debug info (the fault-test profile) must not
        # make the script's status a failure.
        if [[ -f $bin.debug ]]; then
            printf '%-55s %10d bytes (debug info, not shipped)\n' \
                "$bin.debug" "$(stat -c %s "$bin.debug")"
        fi
    done
done
