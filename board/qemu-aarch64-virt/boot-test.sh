#!/usr/bin/env bash
# Boots the CI image under qemu-system-aarch64 (U-Boot, A/B boot script, Debian kernel,
# systemd, our units) and checks the appliance end to end:
#   1. systemd reports storebox (and its migration oneshot) active, and the booted slot is
#      marked good in the boot-state partition;
#   2. a till request through the LAN API (a hostfwd bound to 127.0.0.1) answers with a
#      record the box synced from a storehub on the host (reached through a guestfwd);
#   3. a wedged daemon (the fault-injection build, STOREBOX_FAULT_WEDGE) is killed by
#      systemd's watchdog and restarted;
#   4. over-the-air updates (ota-test.sh): from the LAN (A->B), refusals of bad bundles,
#      from the hub (B->A), a rollback by U-Boot's boot counting after a release that never
#      gets healthy, and the sales posted before each update at the hub exactly once.
# Prints the boot-to-READY time and how long each update took.
#
#   board/qemu-aarch64-virt/boot-test.sh --bin-dir DIR --fault-bin FILE [--no-ota] [--keep DIR]
#
#   --bin-dir DIR     static aarch64 storebox and storehub (release, as shipped)
#   --fault-bin FILE  storebox built with --features fault-injection (profile fault-test)
#   --no-ota          checks 1 to 3 only (one boot, a few minutes)
#   --keep DIR        keep the disk image and the logs there
#
# The hub runs on the host under qemu-aarch64-static, listening on 127.0.0.1 only; so does
# the HTTP server of the update bundles. Every wait has a time-out; the VM, the hub and the
# server are stopped on exit, whatever happens. Needs rauc, mksquashfs and debugfs on the
# host for the bundles (scripts/ota-bundle.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TEST=boot-test
STORE=shop-ci
work=$(mktemp -d)
# shellcheck source=test-lib.sh
source "$HERE/test-lib.sh"
# shellcheck source=ota-test.sh
source "$HERE/ota-test.sh"

bin_dir="" fault_bin="" keep="" ota=1
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
while (($#)); do
    case $1 in
        --bin-dir) bin_dir=$2; shift ;;
        --fault-bin) fault_bin=$2; shift ;;
        --no-ota) ota="" ;;
        --keep) keep=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
    shift
done
[[ -n $bin_dir && -n $fault_bin ]] || { usage >&2; die "--bin-dir and --fault-bin are required"; }
for tool in qemu-system-aarch64 "$QEMU_USER" socat curl python3 ${ota:+rauc mksquashfs debugfs}; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
[[ -f $UBOOT ]] || die "no U-Boot at $UBOOT (apt-get install u-boot-qemu)"

trap 'test_cleanup $? "$keep"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the hub, on the host, seeded ------------------------------------------------------------
mkdir -p "$work/provision"
hub_start "$bin_dir" "$STORE"
pick_port lan_port
# The record the till will ask the box for: it can only come from the hub.
sku="ci-$RANDOM$RANDOM"
hub_call POST "/admin/v1/stores/$STORE/modules/catalog/import" \
    --data-binary "{\"id\":\"$sku\",\"name\":\"Boot test $sku\",\"ean13\":\"4006381333931\",\"price_cents\":199}" \
    >"$work/import.json" || die "importing the test record failed"
say "hub on 127.0.0.1:$hub_port, test record catalog/$sku"

# The box's provisioning, as a technician would do it: store id, the hub's CA, and the
# one-time enrollment token `storehub init` made for the store (the box enrolls with it at
# first start and renews its certificate by itself from then on).
echo "$STORE" >"$work/provision/store_id"
cp "$work/hub/ca.crt" "$work/provision/ca.crt"
sed -n 's/^enroll_token = "\(.*\)"$/\1/p' "$work/hub/boxes/$STORE.toml" >"$work/provision/enroll_token"
[[ -s $work/provision/enroll_token ]] || die "no enroll_token in boxes/$STORE.toml"

# --- the image -----------------------------------------------------------------------------
# Version v1; its root filesystem is kept for the downgrade bundle of the update checks.
start=$SECONDS
"$HERE/build-test-image.sh" --bin-dir "$bin_dir" --fault-bin "$fault_bin" \
    --provision "$work/provision" --version v1 --out "$work" \
    ${ota:+--rootfs-out "$work/ota/v1.ext4"}
say "image built in $((SECONDS - start)) s"
if [[ -n $ota ]]; then
    # The update bundles, made while the VM boots; served to the VM over plain HTTP.
    ota_prepare
    pick_port http_port
    python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$http_port" \
        >"$work/http.log" 2>&1 &
    HTTP_PID=$!
fi

# --- the VM --------------------------------------------------------------------------------
boot_vm
wait_for "$BOOT_TIMEOUT" "a shell on the serial console" console_has "root@storebox"
say "serial console shell after $((SECONDS - qemu_start)) s"
slot_line=$(console_since | grep -a "storebox: booting slot" | tail -n1)
say "U-Boot said: $slot_line"
[[ $slot_line == *"slot A"* ]] || die "expected U-Boot to boot slot A first"

# 1. systemd: the migration ran, the daemon is active, the slot is marked good.
wait_for 120 "storebox.service active" check_active
ready_us=$(run R "systemctl show -P ActiveEnterTimestampMonotonic storebox.service")
say "storebox READY $(awk -v us="$ready_us" 'BEGIN{printf "%.1f", us/1e6}') s after the kernel started (systemd), $((SECONDS - qemu_start)) s or less after QEMU started"
[[ $(run M "systemctl is-active storebox-migrate.service") == active ]] ||
    die "storebox-migrate.service is not active"
run J "journalctl -b -u storebox-migrate.service -o cat --no-pager | grep schema" |
    sed "s/^/$TEST: migrate: /"
wait_for 60 "storebox-mark-good.service" check_good
env_now=$(boot_state)
say "boot state after mark-good: $env_now"
[[ " $env_now " == *" BOOT_A_LEFT=3 "* ]] || die "slot A was not marked good (BOOT_A_LEFT=3)"

# The system around it, as the overlay set it up: the data partition's flash-friendly mount,
# the hardware watchdog driven by systemd, logs in RAM, no swap.
facts=$(run P "echo mount=\$(findmnt -no SOURCE,OPTIONS /var/lib/storebox);
echo watchdog=\$(systemctl show -P RuntimeWatchdogUSec)/\$(ls /dev/watchdog0);
echo journal=run:\$(find /run/log/journal -name '*.journal' | wc -l),var:\$(find /var/log/journal -name '*.journal' 2>/dev/null | wc -l);
echo swap=\$(swapon --noheadings | wc -l)")
say "$(tr '\n' ' ' <<<"$facts")"
grep -q '^mount=/dev/vda5 .*noatime.*commit=60' <<<"$facts" ||
    die "/var/lib/storebox is not the data partition with noatime,commit=60"
grep -qx 'watchdog=30s//dev/watchdog0' <<<"$facts" || die "no hardware watchdog driven by systemd"
grep -qE '^journal=run:[1-9][0-9]*,var:0$' <<<"$facts" || die "the journal is not in RAM only"
grep -qx 'swap=0' <<<"$facts" || die "swap is in use"

# 2. A till's lookup through the LAN API answers with the record synced from the hub. The
# till API is HTTPS with the box's own certificate (the till pins it) and wants a paired
# till's token: paired here as a provisioning script would, on the box.
till_token=$(run T "storebox pair --config /etc/storebox/storebox.toml --name boot-test --approve" | tail -n1)
[[ -n $till_token ]] || die "storebox pair printed no token"
run L "cat /var/lib/storebox/lan/lan.crt" >"$work/lan.crt"
grep -q "BEGIN CERTIFICATE" "$work/lan.crt" || die "no LAN certificate on the box"
lan() {
    curl -fsS --max-time 5 --cacert "$work/lan.crt" -H "authorization: Bearer $till_token" \
        "https://127.0.0.1:$lan_port$1"
}
lookup() {
    lan "/v1/catalog/$sku" >"$work/lookup.json" 2>/dev/null &&
        grep -q "Boot test $sku" "$work/lookup.json"
}
wait_for 120 "GET /v1/catalog/$sku to answer the hub's record" lookup
say "till lookup via https://127.0.0.1:$lan_port (pinned): $(head -c 200 "$work/lookup.json")"
status=$(lan "/v1/status")
grep -q '"state":"up"' <<<"$status" || die "the box does not see the hub up: $status"

# 3. The watchdog: run the fault-injection build with its delta loop wedged.
restarts_before=$(run N "systemctl show -P NRestarts storebox.service")
run W "mkdir -p /run/systemd/system/storebox.service.d /etc/storebox/storebox.d &&
printf '[Service]\nExecStart=\nExecStart=/usr/lib/storebox-test/storebox-fault serve --config /etc/storebox/storebox.toml\nEnvironment=STOREBOX_FAULT_WEDGE=delta\nWatchdogSec=10s\n' >/run/systemd/system/storebox.service.d/wedge.conf &&
printf '[sync]\ndelta_interval = \"1s\"\n' >/etc/storebox/storebox.d/90-wedge-test.toml &&
systemctl daemon-reload && systemctl restart storebox.service && echo restarted" >/dev/null
wedge_start=$SECONDS
restarted() {
    local n
    n=$(run N "systemctl show -P NRestarts storebox.service")
    ((n > restarts_before))
}
wait_for 120 "systemd to restart the wedged daemon" restarted
run K "journalctl -b -u storebox.service -o cat --no-pager | grep -E 'Watchdog timeout|test fault|SIGABRT' | tail -n 4" |
    sed "s/^/$TEST: journal: /"
run K2 "journalctl -b -u storebox.service -o cat --no-pager | grep -q 'Watchdog timeout' && echo yes" |
    grep -qx yes || die "the restart was not a watchdog timeout"
say "wedged daemon restarted by the watchdog $((SECONDS - wedge_start)) s after the wedge started"
run C "rm -f /run/systemd/system/storebox.service.d/wedge.conf /etc/storebox/storebox.d/90-wedge-test.toml && systemctl daemon-reload && systemctl restart storebox.service" >/dev/null
wait_for 60 "storebox.service active again" check_active

# 4. Over-the-air updates (ota-test.sh).
if [[ -n $ota ]]; then
    ota_scenarios
fi
say "all checks passed"
