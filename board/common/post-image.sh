#!/usr/bin/env bash
# Buildroot post-image step of every storebox board: assembles the disk image described by
# <board dir>/genimage.cfg from what the build left in BINARIES_DIR (rootfs.ext4, boot.scr,
# uboot-env.bin from host-uboot-tools, and the board's firmware) plus <board dir>/board.txt.
#
#   BR2_ROOTFS_POST_IMAGE_SCRIPT="$(BR2_EXTERNAL_STOREBOX_PATH)/../board/common/post-image.sh"
#   BR2_ROOTFS_POST_SCRIPT_ARGS="$(BR2_EXTERNAL_STOREBOX_PATH)/../board/<board>"
#
# Buildroot calls it with BINARIES_DIR as $1 and the args after it, and BUILD_DIR, TARGET_DIR
# and host tools (genimage, rauc, mksquashfs, e2fsprogs) in the environment.
#
# With a signing certificate and key it also makes the update bundle of this image
# (scripts/ota-bundle.sh, docs/OTA.md), BINARIES_DIR/<compatible>-<version>.raucb (e.g.
# storebox-raspberrypi4-64-1.4.0.raucb):
#   STOREBOX_OTA_CERT     the signer's certificate (codeSigning), a file or a PKCS#11 URL
#   STOREBOX_OTA_KEY      its key, a file or a PKCS#11 URL; never in this repository nor on a box
#   STOREBOX_OTA_KEYRING  the CA to check the bundle against (default: the image's own
#                         /etc/rauc/keyring.pem, from the retailer's overlay)
set -euo pipefail

board_dir=${2:?"post-image.sh: the board directory is missing (BR2_ROOTFS_POST_SCRIPT_ARGS)"}
binaries=${BINARIES_DIR:?"post-image.sh: run by Buildroot (no BINARIES_DIR)"}

for f in rootfs.ext4 boot.scr uboot-env.bin; do
    [[ -f $binaries/$f ]] || { echo "post-image.sh: $binaries/$f is missing" >&2; exit 1; }
done
cp "$board_dir/board.txt" "$binaries/board.txt"

tmp=${BUILD_DIR:?}/genimage.tmp
bundle_rootfs=$BUILD_DIR/storebox-rootfs-bundle.ext4
root=$(mktemp -d)
trap 'rm -rf "$root" "$bundle_rootfs"' EXIT
rm -rf "$tmp"
# An empty rootpath: the root filesystem is the ready rootfs.ext4, not made by genimage.
genimage --rootpath "$root" --tmppath "$tmp" --inputpath "$binaries" \
    --outputpath "$binaries" --config "$board_dir/genimage.cfg"
echo "post-image.sh: $binaries/disk.img"

if [[ -z ${STOREBOX_OTA_CERT:-} && -z ${STOREBOX_OTA_KEY:-} ]]; then
    echo "post-image.sh: no update bundle (set STOREBOX_OTA_CERT and STOREBOX_OTA_KEY for one)"
    exit 0
fi
[[ -n ${STOREBOX_OTA_CERT:-} && -n ${STOREBOX_OTA_KEY:-} ]] || {
    echo "post-image.sh: set both STOREBOX_OTA_CERT and STOREBOX_OTA_KEY" >&2; exit 1; }
target=${TARGET_DIR:?"post-image.sh: no TARGET_DIR"}
version=$(<"$target/usr/lib/storebox/image-version")
compatible=$(sed -n 's/^compatible=//p' "$target/etc/rauc/system.conf")
keyring=${STOREBOX_OTA_KEYRING:-$target/etc/rauc/keyring.pem}
keyring_arg=(--keyring "$keyring")
if [[ ! -f $keyring ]]; then
    echo "post-image.sh: WARNING: the image has no /etc/rauc/keyring.pem: its boxes refuse every" \
        "update. Add the retailer's CA with a rootfs overlay (docs/OTA.md)." >&2
    keyring_arg=()
fi
# The bundle's copy of the root filesystem at its smallest: RAUC writes it whole, then grows
# it to the slot (resize=true in system.conf).
cp --sparse=always "$binaries/rootfs.ext4" "$bundle_rootfs"
e2fsck -fy "$bundle_rootfs" >/dev/null 2>&1 || (($? == 1)) || {
    echo "post-image.sh: e2fsck of the root filesystem failed" >&2; exit 1; }
resize2fs -M "$bundle_rootfs" >/dev/null 2>&1
"$board_dir/../../scripts/ota-bundle.sh" --rootfs "$bundle_rootfs" \
    --version "$version" --compatible "$compatible" --cert "$STOREBOX_OTA_CERT" \
    --key "$STOREBOX_OTA_KEY" "${keyring_arg[@]}" \
    --out "$binaries/$compatible-$version.raucb"
