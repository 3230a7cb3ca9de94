#!/usr/bin/env bash
# Buildroot post-image step of every storebox board: assembles the disk image described by
# <board dir>/genimage.cfg from what the build left in BINARIES_DIR (rootfs.ext4, boot.scr,
# uboot-env.bin from host-uboot-tools, and the board's firmware) plus <board dir>/board.txt.
#
#   BR2_ROOTFS_POST_IMAGE_SCRIPT="$(BR2_EXTERNAL_STOREBOX_PATH)/../board/common/post-image.sh"
#   BR2_ROOTFS_POST_SCRIPT_ARGS="$(BR2_EXTERNAL_STOREBOX_PATH)/../board/<board>"
#
# Buildroot calls it with BINARIES_DIR as $1 and the args after it, and BUILD_DIR and
# host tools (genimage) in the environment.
set -euo pipefail

board_dir=${2:?"post-image.sh: the board directory is missing (BR2_ROOTFS_POST_SCRIPT_ARGS)"}
binaries=${BINARIES_DIR:?"post-image.sh: run by Buildroot (no BINARIES_DIR)"}

for f in rootfs.ext4 boot.scr uboot-env.bin; do
    [[ -f $binaries/$f ]] || { echo "post-image.sh: $binaries/$f is missing" >&2; exit 1; }
done
cp "$board_dir/board.txt" "$binaries/board.txt"

tmp=${BUILD_DIR:?}/genimage.tmp
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
rm -rf "$tmp"
# An empty rootpath: the root filesystem is the ready rootfs.ext4, not made by genimage.
genimage --rootpath "$root" --tmppath "$tmp" --inputpath "$binaries" \
    --outputpath "$binaries" --config "$board_dir/genimage.cfg"
echo "post-image.sh: $binaries/disk.img"
