#!/usr/bin/env bash
# Builds the CI disk image of the QEMU aarch64 "virt" board: Debian's arm64 packages (kernel,
# systemd, libubootenv) plus our static binaries, with the same rootfs overlay, units, boot
# script and partition layout (genimage.cfg) as the Buildroot images. Boots under
# qemu-system-aarch64 with Debian's U-Boot (boot-test.sh does that).
#
#   board/qemu-aarch64-virt/build-test-image.sh --bin-dir DIR --out DIR [options]
#   board/qemu-aarch64-virt/build-test-image.sh --bin-dir DIR --rootfs-only --rootfs-out FILE [options]
#
#   --bin-dir DIR        storebox (and storehub) static aarch64 release binaries, as shipped
#   --fault-bin FILE     a storebox built with --features fault-injection; installed as
#                        /usr/lib/storebox-test/storebox-fault for the watchdog test only,
#                        with the test overlay (test-overlay/: console autologin, the test
#                        hub's forward, short OTA intervals)
#   --provision DIR      a box's ca.crt, enroll_token and store_id files: filled into
#                        /etc/storebox/ (what a technician does on a real box)
#   --version V          the image's version, /usr/lib/storebox/image-version (default ci-1);
#                        an update bundle of this root filesystem must carry the same
#   --keyring FILE       the CA update bundles must be signed under, /etc/rauc/keyring.pem
#                        (default: the development CA, board/common/ota-dev/dev-ca.crt)
#   --extra-overlay DIR  copied onto the root filesystem last (test variants of an update)
#   --out DIR            where disk.img goes
#   --rootfs-out FILE    also keep the root filesystem image (ext4), for update bundles
#                        (scripts/ota-bundle.sh)
#   --rootfs-only        make only the root filesystem (--rootfs-out), no disk image
#   --cache DIR          the root filesystem tarball and the .deb files, kept between runs
#                        (default $STOREBOX_IMAGE_CACHE or /var/cache/storebox-ci)
#
# The Debian part (mmdebstrap under qemu-user, ~2 to 6 minutes) is cached as a tarball keyed
# by everything that goes into it (suite, mirror, package list, the hook below); our files
# are added on every run, so a change to them never needs a new tarball. A fresh machine
# builds it. Needs root (mmdebstrap --mode=root, file ownership in the images) and
# binfmt_misc with qemu-aarch64 (registered here when missing).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
COMMON=$REPO/board/common

SUITE=${STOREBOX_IMAGE_SUITE:-bookworm}
MIRROR=${STOREBOX_IMAGE_MIRROR:-http://deb.debian.org/debian}
# What the appliance needs from Debian: a kernel and initramfs, systemd with networkd,
# fw_setenv for the boot state, fsck (and resize2fs) for the file systems; RAUC with its
# D-Bus service (rauc-service: rauc.service, D-Bus activated) for updates. socat forwards
# the hub for the test (test-overlay/), nothing more.
PACKAGES=(systemd systemd-sysv udev linux-image-arm64 initramfs-tools kmod e2fsprogs
    libubootenv-tool rauc rauc-service dbus socat)
# Kernel modules a VM never loads: most of the kernel package's size. RAUC's verity bundles
# need loop, squashfs, dm-mod, dm-bufio, dm-verity and reed_solomon (drivers/block,
# fs/squashfs, drivers/md, lib/reed_solomon): keep those.
MODULES_DROP=(drivers/media drivers/gpu drivers/infiniband drivers/iio drivers/staging
    drivers/net/wireless drivers/net/ethernet drivers/net/can drivers/bluetooth drivers/isdn
    drivers/hid drivers/input drivers/usb drivers/scsi drivers/mtd drivers/nfc drivers/hwmon
    drivers/leds drivers/regulator drivers/power drivers/spi drivers/i2c drivers/rtc
    drivers/video sound net/wireless net/bluetooth net/mac80211 net/netfilter lib/test_bpf.ko
    fs/btrfs fs/xfs fs/ocfs2 fs/smb fs/nfs fs/nfsd fs/f2fs fs/ceph fs/gfs2 fs/ubifs fs/afs
    fs/dlm fs/reiserfs fs/nilfs2 fs/jfs fs/jffs2 fs/orangefs net/sunrpc net/ceph)
# The root filesystem is made at its content's size plus this share and this many MiB;
# then the disk image's copy is grown to fill the slot (genimage.cfg), and the copy for update
# bundles (--rootfs-out) is shrunk to its minimum: RAUC writes the whole image into the slot,
# then grows it to the partition (resize=true in system.conf). Less to download and to write.
ROOTFS_MARGIN_PERCENT=20
ROOTFS_MARGIN_MIB=32
SLOT_MIB=$(sed -n '/partition rootfs-a/,/}/s/^[[:space:]]*size = \([0-9]*\)M.*/\1/p' "$HERE/genimage.cfg")

bin_dir="" fault_bin="" provision="" out="" version=ci-1 keyring="" extra_overlay=""
rootfs_out="" rootfs_only=""
cache=${STOREBOX_IMAGE_CACHE:-/var/cache/storebox-ci}

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "build-test-image: $*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --bin-dir) bin_dir=$2; shift ;;
        --fault-bin) fault_bin=$2; shift ;;
        --provision) provision=$2; shift ;;
        --out) out=$2; shift ;;
        --version) version=$2; shift ;;
        --keyring) keyring=$2; shift ;;
        --extra-overlay) extra_overlay=$2; shift ;;
        --rootfs-out) rootfs_out=$2; shift ;;
        --rootfs-only) rootfs_only=1 ;;
        --cache) cache=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
    shift
done
[[ -n $bin_dir ]] || { usage >&2; die "--bin-dir is required"; }
if [[ -n $rootfs_only ]]; then
    [[ -n $rootfs_out ]] || { usage >&2; die "--rootfs-only needs --rootfs-out"; }
else
    [[ -n $out ]] || { usage >&2; die "--out is required (or --rootfs-only)"; }
fi
# The rule of the box and the hub (crates/protocol/src/ota.rs).
if ((${#version} > 64)) || [[ ! $version =~ ^[A-Za-z0-9.+_-]+$ ]]; then
    die "--version '$version': 1 to 64 of A-Z a-z 0-9 . - + _"
fi
keyring=${keyring:-$COMMON/ota-dev/dev-ca.crt}
[[ -f $keyring ]] || die "no $keyring"
[[ -z $extra_overlay || -d $extra_overlay ]] || die "no directory $extra_overlay"
((EUID == 0)) || die "needs root (mmdebstrap --mode=root, owners of the image's files)"
[[ -x $bin_dir/storebox ]] || die "no $bin_dir/storebox"
case $(file -b "$bin_dir/storebox") in
    *aarch64*static*) ;;
    *) die "$bin_dir/storebox is not a static aarch64 binary: $(file -b "$bin_dir/storebox")" ;;
esac
[[ -z $fault_bin || -x $fault_bin ]] || die "no $fault_bin"
for tool in mmdebstrap genimage mkimage mkenvimage mke2fs mkfs.vfat mcopy; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install mmdebstrap genimage u-boot-tools e2fsprogs dosfstools mtools)"
done

work=$(mktemp -d)
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

# --- qemu-user for the arm64 maintainer scripts ----------------------------------------------
binfmt() {
    local dir=/proc/sys/fs/binfmt_misc
    [[ -e $dir/register ]] || mount -t binfmt_misc binfmt_misc "$dir" ||
        die "cannot mount binfmt_misc"
    if [[ ! -e $dir/qemu-aarch64 ]]; then
        [[ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]] ||
            die "qemu-user-static is not installed (no /usr/lib/binfmt.d/qemu-aarch64.conf)"
        cat /usr/lib/binfmt.d/qemu-aarch64.conf >"$dir/register" ||
            die "cannot register qemu-aarch64 with binfmt_misc"
    fi
}

# --- the Debian root filesystem, cached ------------------------------------------------------
# Runs inside mmdebstrap (as a --customize-hook, $1 = the root): turns the Debian system into
# the appliance's base. Part of the cache key, so editing it rebuilds the tarball.
read -r -d '' CUSTOMIZE <<'HOOK' || true
set -eu
root=$1; shift
kver=$(ls "$root/usr/lib/modules" | head -n1)
# U-Boot's booti takes an uncompressed arm64 Image; Debian ships it gzip'ed on some releases.
if gzip -t "$root/boot/vmlinuz-$kver" 2>/dev/null; then
    zcat "$root/boot/vmlinuz-$kver" >"$root/boot/Image"
else
    cp "$root/boot/vmlinuz-$kver" "$root/boot/Image"
fi
rm -f "$root/boot/vmlinuz-$kver" "$root/vmlinuz" "$root/vmlinuz.old" "$root/initrd.img.old"
mv "$root/boot/initrd.img-$kver" "$root/boot/initrd.img"
rm -f "$root/initrd.img"
for m in "$@"; do rm -rf "$root/usr/lib/modules/$kver/kernel/$m"; done
chroot "$root" depmod "$kver"
# What a VM never reads: device trees (QEMU hands U-Boot its own), the kernel's symbol map,
# iconv's converters (everything here is UTF-8), udev's hardware database.
rm -rf "$root/usr/lib/linux-image-$kver" "$root/boot/System.map-$kver" \
    "$root/usr/lib/aarch64-linux-gnu/gconv" "$root/usr/lib/udev/hwdb.bin" \
    "$root/usr/lib/udev/hwdb.d" "$root/etc/udev/hwdb.bin"
# DHCP on the first Ethernet port with systemd-networkd; no other network manager.
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/50-lan.network"
chroot "$root" systemctl enable systemd-networkd.service
# The unit files' mount of the data partition needs its directory in the image.
mkdir -p "$root/var/lib/storebox"
echo storebox >"$root/etc/hostname"
HOOK
# initramfs-tools with only what the VM's root disk needs: fast to build under qemu-user.
read -r -d '' ESSENTIAL <<'HOOK' || true
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
echo MODULES=list >"$1/etc/initramfs-tools/conf.d/storebox.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >"$1/usr/share/initramfs-tools/modules.d/storebox"
HOOK

key=$(printf '%s\n' "v1" "$SUITE" "$MIRROR" "${PACKAGES[@]}" "${MODULES_DROP[@]}" \
    "$CUSTOMIZE" "$ESSENTIAL" | sha256sum | cut -c1-16)
tarball=$cache/rootfs-$SUITE-arm64-$key.tar
mkdir -p "$cache/debs"
if [[ -f $tarball ]]; then
    echo "build-test-image: root filesystem from cache ($tarball)"
    touch "$tarball"  # in use: see the clean-up below
else
    binfmt
    echo "build-test-image: building the Debian root filesystem (cache miss: $tarball)"
    start=$SECONDS
    printf '%s\n' "$CUSTOMIZE" >"$work/customize.sh"
    printf '%s\n' "$ESSENTIAL" >"$work/essential.sh"
    chmod +x "$work/customize.sh" "$work/essential.sh"
    # The .deb files are kept too: a changed package list downloads only what is new.
    # The single-quoted hooks are expanded by mmdebstrap's shell ($1 = the new root).
    # shellcheck disable=SC2016
    if ! mmdebstrap --mode=root --arch=arm64 --variant=minbase \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --skip=download/empty \
        --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
        --setup-hook="sync-in '$cache/debs' /var/cache/apt/archives" \
        --essential-hook="$work/essential.sh \"\$1\"" \
        --customize-hook="sync-out /var/cache/apt/archives '$cache/debs'" \
        --customize-hook="$work/customize.sh \"\$1\" ${MODULES_DROP[*]}" \
        --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
        "$SUITE" "$work/rootfs.tar" "$MIRROR" >"$work/mmdebstrap.log" 2>&1; then
        tail -n 40 "$work/mmdebstrap.log" >&2
        die "mmdebstrap failed (log above)"
    fi
    mv "$work/rootfs.tar" "$tarball.tmp" && mv "$tarball.tmp" "$tarball"
    # Tarballs of other package lists only take space, once no branch has used them for a
    # few days (two branches with different lists would otherwise rebuild in turn).
    find "$cache" -maxdepth 1 -name "rootfs-*.tar" ! -path "$tarball" -mtime +2 -delete
    echo "build-test-image: root filesystem built in $((SECONDS - start)) s"
fi

# --- our files on top --------------------------------------------------------------------
root=$work/root
mkdir -p "$root"
tar -xpf "$tarball" -C "$root"
cp -a "$COMMON/rootfs-overlay/." "$root/"
[[ -d $HERE/rootfs-overlay ]] && cp -a "$HERE/rootfs-overlay/." "$root/"
install -m 0755 "$bin_dir/storebox" "$root/usr/bin/storebox"
if [[ -n $fault_bin ]]; then
    # Test image only: the build with fault switches, beside (never instead of) the shipped one.
    install -D -m 0755 "$fault_bin" "$root/usr/lib/storebox-test/storebox-fault"
    cp -a "$HERE/test-overlay/." "$root/"
fi
# What the box reports as its version (the hub's fleet view, the update checks), and the CA
# whose signers' bundles it installs.
install -d -m 0755 "$root/usr/lib/storebox"
printf '%s\n' "$version" >"$root/usr/lib/storebox/image-version"
install -D -m 0644 "$keyring" "$root/etc/rauc/keyring.pem"
[[ -z $extra_overlay ]] || cp -a "$extra_overlay/." "$root/"
# The system user now, so the credential can be given to its group (as Buildroot does with
# its users table); binfmt runs the arm64 systemd-sysusers.
binfmt
chroot "$root" systemd-sysusers >/dev/null
if [[ -n $provision ]]; then
    for f in ca.crt enroll_token store_id; do
        [[ -f $provision/$f ]] || die "--provision: no $provision/$f"
    done
    store_id=$(<"$provision/store_id")
    sed -i -e "s/@STORE_ID@/$store_id/" -e "s/@HUB_HOST@/127.0.0.1/" \
        "$root/etc/storebox/storebox.toml"
    install -m 0644 "$provision/ca.crt" "$root/etc/storebox/ca.crt"
    # The group as the image knows it, not as this machine does.
    gid=$(awk -F: '$1 == "storebox" { print $3 }' "$root/etc/group")
    [[ -n $gid ]] || die "no group storebox in the image"
    install -d -m 0755 "$root/etc/storebox/storebox.d"
    printf '[hub]\nenroll_token = "%s"\n' "$(<"$provision/enroll_token")" \
        >"$root/etc/storebox/storebox.d/10-enroll.toml"
    chmod 0640 "$root/etc/storebox/storebox.d/10-enroll.toml"
    chgrp "$gid" "$root/etc/storebox/storebox.d/10-enroll.toml"
fi

# --- the images --------------------------------------------------------------------------
mkdir -p "$work/input" "$work/empty"
content_kib=$(du -sk "$root" | cut -f1)
rootfs_mib=$(((content_kib * (100 + ROOTFS_MARGIN_PERCENT) / 100 + 1023) / 1024 + ROOTFS_MARGIN_MIB))
((rootfs_mib <= SLOT_MIB)) || die "the root filesystem ($rootfs_mib MiB) does not fit its slot ($SLOT_MIB MiB)"
# 4 KiB blocks and one inode per 16 KiB whatever the size (mke2fs would pick 1 KiB blocks for
# a "small" file system); resize2fs keeps both.
mke2fs -q -t ext4 -b 4096 -i 16384 -L rootfs -d "$root" "$work/rootfs.ext4" "${rootfs_mib}M" \
    >/dev/null
if [[ -n $rootfs_out ]]; then
    mkdir -p "$(dirname "$rootfs_out")"
    cp --sparse=always "$work/rootfs.ext4" "$rootfs_out.tmp"
    # e2fsck says 1 when it only optimised something: fine for a fresh file system.
    e2fsck -fy "$rootfs_out.tmp" >"$work/e2fsck.log" 2>&1 || (($? == 1)) || {
        cat "$work/e2fsck.log" >&2; die "e2fsck of the new root filesystem failed"; }
    resize2fs -M "$rootfs_out.tmp" >"$work/resize2fs.log" 2>&1 || {
        cat "$work/resize2fs.log" >&2; die "resize2fs -M failed"; }
    mv "$rootfs_out.tmp" "$rootfs_out"
    echo "build-test-image: root filesystem $version for bundles: $rootfs_out" \
        "($(($(stat -c %s "$rootfs_out") / 1048576)) MiB, $((content_kib / 1024)) MiB of files)"
fi
[[ -z $rootfs_only ]] || exit 0
resize2fs "$work/rootfs.ext4" "${SLOT_MIB}M" >"$work/resize2fs.log" 2>&1 || {
    cat "$work/resize2fs.log" >&2; die "resize2fs to the slot's ${SLOT_MIB} MiB failed"; }
mv "$work/rootfs.ext4" "$work/input/rootfs.ext4"
mkdir -p "$out"
mkimage -A arm64 -O linux -T script -C none -n "storebox A/B" \
    -d "$COMMON/boot.cmd" "$work/input/boot.scr" >/dev/null
mkenvimage -s 0x4000 -o "$work/input/uboot-env.bin" "$COMMON/bootstate.txt"
cp "$HERE/board.txt" "$work/input/board.txt"
genimage --config "$HERE/genimage.cfg" --rootpath "$work/empty" --tmppath "$work/genimage" \
    --inputpath "$work/input" --outputpath "$work/output" >"$work/genimage.log" 2>&1 || {
    cat "$work/genimage.log" >&2; die "genimage failed"; }
mv "$work/output/disk.img" "$out/disk.img"
echo "build-test-image: $out/disk.img ($(du -h --apparent-size "$out/disk.img" | cut -f1)," \
    "$(du -h "$out/disk.img" | cut -f1) on disk)"
