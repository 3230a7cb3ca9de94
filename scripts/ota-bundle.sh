#!/usr/bin/env bash
# Builds a signed RAUC update bundle (format "verity") of a storebox image's root filesystem,
# then checks it the way a box will: the signature against the keyring (with RAUC's codeSigning
# purpose check), the compatible string and the version (docs/OTA.md).
#
#   scripts/ota-bundle.sh --rootfs rootfs.ext4 --version 1.2.0 \
#       --compatible storebox-qemu-aarch64-virt --cert signer.crt --key signer.key \
#       [--keyring ca.crt] --out storebox-1.2.0.raucb
#
#   --rootfs FILE       the ext4 image of slot A/B (rootfs.ext4 of a Buildroot or CI build);
#                       its /usr/lib/storebox/image-version must say the same as --version
#   --version V         the version the box will report once it runs it (1 to 64 of
#                       A-Z a-z 0-9 . - + _); boxes refuse a version older than theirs
#   --compatible C      the board, as in the box's /etc/rauc/system.conf (e.g.
#                       storebox-qemu-aarch64-virt, storebox-raspberrypi4-64)
#   --cert FILE|URL     the signer's certificate (extendedKeyUsage codeSigning), or a PKCS#11 URL
#   --key FILE|URL      its private key, or a PKCS#11 URL (RAUC_PKCS11_MODULE, RAUC_PKCS11_PIN)
#   --keyring FILE      the CA the boxes trust (their /etc/rauc/keyring.pem), to check the
#                       result against; without it, the signature is checked against --cert
#                       itself only
#   --out FILE          the bundle to write (replaced if it exists)
#   --mksquashfs-args A how the bundle's payload is compressed (default "-comp zstd
#                       -Xcompression-level 9": for a 242 MiB root filesystem 77 MB in 6 s of
#                       CPU, where RAUC's default, gzip, makes 80 MB in 46 s; "-comp xz" makes
#                       64 MB in 67 s). The box's kernel needs the matching CONFIG_SQUASHFS_*.
#
# Needs rauc (1.8 or later), mksquashfs (squashfs-tools) and debugfs (e2fsprogs). The
# development keys in board/common/ota-dev/ are for CI and tests only: never ship them.
set -euo pipefail

rootfs="" version="" compatible="" cert="" key="" keyring="" out=""
squashfs_args="-comp zstd -Xcompression-level 9"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "ota-bundle: $*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --rootfs) rootfs=$2; shift ;;
        --version) version=$2; shift ;;
        --compatible) compatible=$2; shift ;;
        --cert) cert=$2; shift ;;
        --key) key=$2; shift ;;
        --keyring) keyring=$2; shift ;;
        --out) out=$2; shift ;;
        --mksquashfs-args) squashfs_args=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
    (($# > 0)) || die "a value is missing"
    shift
done
[[ -n $rootfs && -n $version && -n $compatible && -n $cert && -n $key && -n $out ]] || {
    usage >&2; die "--rootfs, --version, --compatible, --cert, --key and --out are required"; }
for tool in rauc mksquashfs debugfs; do
    command -v "$tool" >/dev/null ||
        die "$tool is missing (apt-get install rauc squashfs-tools e2fsprogs)"
done

# The same rule as the box and the hub (crates/protocol/src/ota.rs, is_valid_version).
if ((${#version} > 64)) || [[ ! $version =~ ^[A-Za-z0-9.+_-]+$ ]]; then
    die "version '$version': 1 to 64 of A-Z a-z 0-9 . - + _"
fi
[[ $compatible =~ ^[A-Za-z0-9.+_-]+$ ]] || die "compatible '$compatible': A-Z a-z 0-9 . - + _ only"
[[ -f $rootfs ]] || die "no $rootfs"
[[ $(od -An -tx2 -j1080 -N2 "$rootfs" | tr -d ' ') == ef53 ]] || die "$rootfs is not an ext4 image"
for f in "$cert" "$key" ${keyring:+"$keyring"}; do
    [[ $f == pkcs11:* || -f $f ]] || die "no $f"
done

# What the box will report once it runs this rootfs must be the bundle's version, or the hub
# would offer the same update again and again.
inside=$(debugfs -R "cat /usr/lib/storebox/image-version" "$rootfs" 2>/dev/null | head -n1) || true
[[ -n $inside ]] || die "$rootfs has no /usr/lib/storebox/image-version (the image's version)"
[[ $inside == "$version" ]] ||
    die "$rootfs says it is version '$inside' (/usr/lib/storebox/image-version), not '$version'"

start=$(date +%s.%N)
out_dir=$(dirname "$out")
mkdir -p "$out_dir"
work=$(mktemp -d "$out_dir/.ota-bundle.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/content"
# A hard link when the image is on the same file system: no copy of a few hundred MB.
ln "$rootfs" "$work/content/rootfs.ext4" 2>/dev/null || cp "$rootfs" "$work/content/rootfs.ext4"
cat >"$work/content/manifest.raucm" <<EOF
[update]
compatible=$compatible
version=$version
description=storebox $version

[bundle]
format=verity

[image.rootfs]
filename=rootfs.ext4
EOF
rm -f "$out"
rauc bundle --cert "$cert" --key "$key" ${squashfs_args:+--mksquashfs-args="$squashfs_args"} \
    "$work/content" "$out" >"$work/bundle.log" 2>&1 || {
    cat "$work/bundle.log" >&2; rm -f "$out"; die "rauc bundle failed"; }

# The check a box makes before installing: the signature chains to the keyring, with the
# codeSigning purpose (as the boxes' system.conf says), and the manifest says what we asked.
if [[ -n $keyring ]]; then
    trust="path=$(realpath "$keyring")"
    against=$keyring
else
    against="the signer's certificate"
    echo "ota-bundle: no --keyring: checking the signature against the signer's certificate only" >&2
    trust="path=$(realpath "$cert")
allow-partial-chain=true"
fi
cat >"$work/system.conf" <<EOF
[system]
compatible=$compatible
bootloader=noop

[keyring]
$trust
check-purpose=codesign
EOF
if ! rauc --conf "$work/system.conf" info "$out" >"$work/info" 2>"$work/info.log"; then
    cat "$work/info.log" >&2
    rm -f "$out"
    die "the bundle does not pass 'rauc info' with $against: removed"
fi
# "Compatible: \t'storebox-...'", "Version: \t'1.2.0'", "Bundle Format: \tverity"
info_field() { sed -n "s/^$1:[[:space:]]*'\\{0,1\\}\\([^']*\\)'\\{0,1\\}\$/\\1/p" "$work/info" | head -n1; }
[[ $(info_field Compatible) == "$compatible" && $(info_field Version) == "$version" &&
    $(info_field "Bundle Format") == verity ]] || {
    cat "$work/info" >&2; rm -f "$out"; die "the bundle's manifest is not what was asked (above)"; }

size=$(stat -c %s "$out")
sha=$(sha256sum "$out" | cut -d' ' -f1)
printf 'ota-bundle: %s: version %s, compatible %s, %s bytes, sha256 %s, signed and checked in %.1f s\n' \
    "$out" "$version" "$compatible" "$size" "$sha" "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')"
