# U-Boot boot script of the storebox images: A/B root filesystems with boot counting.
#
# Built into boot.scr (mkimage -T script) and found by U-Boot's distro boot on the first
# partition, which sets devtype, devnum and distro_bootpart. The layout is the same on every
# board (board/*/genimage.cfg): 1 boot, 2 boot-state, 3 rootfs A, 4 rootfs B, 5 data.
#
# Boot state lives in partition 2 as a plain U-Boot environment image (CRC32 + NUL-separated
# text, 16 KiB), the format of mkenvimage and of fw_setenv from Linux (/etc/fw_env.config).
# A board's own environment storage is not used: on QEMU saveenv to pflash does not work, and
# a raw partition behaves the same on every board. The variables are RAUC's U-Boot ones:
#   BOOT_ORDER     slots to try, in order ("A B")
#   BOOT_A_LEFT    attempts left for A; this script takes one before booting A
#   BOOT_B_LEFT    the same for B
# storebox-mark-good.service gives the booted slot its attempts back once storebox is READY;
# a slot that fails three boots in a row is skipped for the next one in BOOT_ORDER.
#
# Per-board settings (the console) come from board.txt beside this script.

setenv bs_part 2
setenv bs_blocks 0x20
setenv bs_size 0x4000
setenv bs_addr ${scriptaddr}
setexpr bs_addr ${bs_addr} + 0x100000

${devtype} dev ${devnum}

# Board settings: board_bootargs.
if load ${devtype} ${devnum}:${distro_bootpart} ${bs_addr} board.txt; then
	env import -t ${bs_addr} ${filesize} board_bootargs
fi

# Boot state. Only these three names are taken from the partition, so nothing written from
# Linux can change the rest of U-Boot's environment.
setenv BOOT_ORDER
setenv BOOT_A_LEFT
setenv BOOT_B_LEFT
part start ${devtype} ${devnum} ${bs_part} bs_start
if ${devtype} read ${bs_addr} ${bs_start} ${bs_blocks} && env import -c ${bs_addr} ${bs_size} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
	echo "storebox: boot state: order ${BOOT_ORDER}, A ${BOOT_A_LEFT} left, B ${BOOT_B_LEFT} left"
else
	echo "storebox: no valid boot state in partition ${bs_part}; starting afresh"
fi
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv boot_slot
for slot in ${BOOT_ORDER}; do
	if test -n "${boot_slot}"; then
		true
	elif test "${slot}" = "A" && test ${BOOT_A_LEFT} -gt 0; then
		setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
		setenv boot_slot A
		setenv slot_part 3
	elif test "${slot}" = "B" && test ${BOOT_B_LEFT} -gt 0; then
		setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
		setenv boot_slot B
		setenv slot_part 4
	fi
done

if test -z "${boot_slot}"; then
	# Every slot used up its attempts: an appliance must still come up somewhere, so start
	# over rather than stop here with nobody at the console.
	echo "storebox: no slot has attempts left; resetting the counters"
	setenv BOOT_A_LEFT 3
	setenv BOOT_B_LEFT 3
	setenv boot_slot A
	setenv slot_part 3
	setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
fi

# Save the decremented counter before booting: a kernel that hangs or panics then costs
# this slot one attempt.
env export -c -s ${bs_size} ${bs_addr} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
if ${devtype} write ${bs_addr} ${bs_start} ${bs_blocks}; then
	echo "storebox: booting slot ${boot_slot} (partition ${slot_part}); A ${BOOT_A_LEFT} left, B ${BOOT_B_LEFT} left"
else
	echo "storebox: could not save the boot state; booting slot ${boot_slot} anyway"
fi

part uuid ${devtype} ${devnum}:${slot_part} root_partuuid
setenv bootargs "${board_bootargs} root=PARTUUID=${root_partuuid} rootwait rw rauc.slot=${boot_slot} systemd.gpt_auto=0 panic=10"

load ${devtype} ${devnum}:${slot_part} ${kernel_addr_r} /boot/Image || reset
# The device tree is the one U-Boot was handed (by QEMU, or by the Raspberry Pi firmware,
# which fills in memory, MAC address and overlays): it lives outside the slots.
# An initramfs is optional: the Debian-based CI image has one, Buildroot's kernels do not.
if load ${devtype} ${devnum}:${slot_part} ${ramdisk_addr_r} /boot/initrd.img; then
	booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdt_addr}
else
	booti ${kernel_addr_r} - ${fdt_addr}
fi
echo "storebox: slot ${boot_slot} did not boot; resetting"
reset
