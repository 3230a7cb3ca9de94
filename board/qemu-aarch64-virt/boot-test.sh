#!/usr/bin/env bash
# Boots the CI image under qemu-system-aarch64 (U-Boot, A/B boot script, Debian kernel,
# systemd, our units) and checks the appliance end to end:
#   1. systemd reports storebox (and its migration oneshot) active, and the booted slot is
#      marked good in the boot-state partition;
#   2. a till request through the LAN API (a hostfwd bound to 127.0.0.1) answers with a
#      record the box synced from a storehub on the host (reached through a guestfwd);
#   3. a wedged daemon (the fault-injection build, STOREBOX_FAULT_WEDGE) is killed by
#      systemd's watchdog and restarted;
#   4. A/B fallback: slot A with no attempts left boots slot B.
# Prints the boot-to-READY time.
#
#   board/qemu-aarch64-virt/boot-test.sh --bin-dir DIR --fault-bin FILE [--keep DIR]
#
#   --bin-dir DIR     static aarch64 storebox and storehub (release, as shipped)
#   --fault-bin FILE  storebox built with --features fault-injection (profile fault-test)
#   --keep DIR        keep the disk image and the logs there
#
# The hub runs on the host under qemu-aarch64-static, listening on 127.0.0.1 only. Every
# wait has a time-out; the VM and the hub are stopped on exit, whatever happens.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UBOOT=${STOREBOX_UBOOT:-/usr/lib/u-boot/qemu_arm64/u-boot.bin}
QEMU_USER=${QEMU_USER:-qemu-aarch64-static}
STORE=shop-ci
BOOT_TIMEOUT=${BOOT_TIMEOUT:-240}

bin_dir="" fault_bin="" keep=""
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "boot-test: $*" >&2; exit 1; }
while (($#)); do
    case $1 in
        --bin-dir) bin_dir=$2; shift ;;
        --fault-bin) fault_bin=$2; shift ;;
        --keep) keep=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
    shift
done
[[ -n $bin_dir && -n $fault_bin ]] || { usage >&2; die "--bin-dir and --fault-bin are required"; }
for tool in qemu-system-aarch64 "$QEMU_USER" socat curl; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
[[ -f $UBOOT ]] || die "no U-Boot at $UBOOT (apt-get install u-boot-qemu)"

work=$(mktemp -d)
QEMU_PID="" HUB_PID="" CONSOLE_PID=""
stop() {  # stop PID: TERM, 10 s, KILL
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop "$QEMU_PID"; stop "$CONSOLE_PID"; stop "$HUB_PID"
    if ((rc != 0)); then
        echo "--- serial console (last 60 lines)" >&2
        tail -n 60 "$work/console.log" 2>/dev/null >&2 || true
        echo "--- hub log (last 20 lines)" >&2
        tail -n 20 "$work/hub/hub.log" 2>/dev/null >&2 || true
    fi
    if [[ -n $keep ]]; then
        mkdir -p "$keep"
        cp "$work"/*.log "$keep/" 2>/dev/null || true
        mv "$work/disk.img" "$keep/" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_free() { ! ss -Htln "sport = :$1" | grep -q .; }
PICKED=""
pick_port() {  # pick_port VAR: a free loopback TCP port, not picked before
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 40000))
        [[ " $PICKED " == *" $p "* ]] && continue
        port_free "$p" || continue
        PICKED+=" $p"
        printf -v "$1" '%s' "$p"
        return 0
    done
    die "no free port"
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND every second until it succeeds.
wait_for() {
    local secs=$1 what=$2 deadline=$((SECONDS + $1)); shift 2
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out after $secs s waiting for $what"
        [[ -z $QEMU_PID ]] || kill -0 "$QEMU_PID" 2>/dev/null || die "QEMU exited while waiting for $what"
        sleep 1
    done
}

# --- the hub, on the host, seeded ------------------------------------------------------------
hub_port="" admin_port="" lan_port=""
pick_port hub_port; pick_port admin_port; pick_port lan_port
mkdir -p "$work/hub" "$work/provision"
"$QEMU_USER" "$bin_dir/storehub" init --dir "$work/hub" --store "$STORE" \
    --hub-port "$hub_port" --admin-port "$admin_port" >"$work/hub-init.log" 2>&1 ||
    die "storehub init failed: $(cat "$work/hub-init.log")"
"$QEMU_USER" "$bin_dir/storehub" serve --config "$work/hub/hub.toml" \
    </dev/null >"$work/hub/hub.log" 2>&1 &
HUB_PID=$!
admin=http://127.0.0.1:$admin_port
token=$(<"$work/hub/admin.token")
hub_up() {
    curl -fs --max-time 2 -o /dev/null -H "authorization: Bearer $token" "$admin/admin/v1/stores"
}
wait_for 30 "the hub's admin API" hub_up
# The record the till will ask the box for: it can only come from the hub.
sku="ci-$RANDOM$RANDOM"
curl -fsS --max-time 10 -H "authorization: Bearer $token" \
    --data-binary "{\"id\":\"$sku\",\"name\":\"Boot test $sku\",\"ean13\":\"4006381333931\",\"price_cents\":199}" \
    "$admin/admin/v1/stores/$STORE/modules/catalog/import" >"$work/import.json" ||
    die "importing the test record failed"
echo "boot-test: hub on 127.0.0.1:$hub_port, test record catalog/$sku"

# The box's provisioning, as a technician would do it: store id, the hub's CA, and the
# one-time enrollment token `storehub init` made for the store (the box enrolls with it at
# first start and renews its certificate by itself from then on).
echo "$STORE" >"$work/provision/store_id"
cp "$work/hub/ca.crt" "$work/provision/ca.crt"
sed -n 's/^enroll_token = "\(.*\)"$/\1/p' "$work/hub/boxes/$STORE.toml" >"$work/provision/enroll_token"
[[ -s $work/provision/enroll_token ]] || die "no enroll_token in boxes/$STORE.toml"

# --- the image -----------------------------------------------------------------------------
start=$SECONDS
"$HERE/build-test-image.sh" --bin-dir "$bin_dir" --fault-bin "$fault_bin" \
    --provision "$work/provision" --out "$work"
echo "boot-test: image built in $((SECONDS - start)) s"

# --- the VM --------------------------------------------------------------------------------
mkfifo "$work/serial.in" "$work/serial.out"
: >"$work/console.log"
boot_vm() {
    # The console FIFOs are QEMU's serial port: the reader appends to console.log; a
    # writer is held open on serial.in so QEMU never sees EOF.
    cat "$work/serial.out" >>"$work/console.log" &
    CONSOLE_PID=$!
    exec 7<>"$work/serial.in"
    qemu_start=$SECONDS
    qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 2 -m 1024 -nographic \
        -bios "$UBOOT" \
        -drive "if=none,id=disk,format=raw,file=$work/disk.img" \
        -device virtio-blk-pci,drive=disk \
        -netdev "user,id=lan,hostfwd=tcp:127.0.0.1:$lan_port-:8080,guestfwd=tcp:10.0.2.100:7443-cmd:socat - TCP:127.0.0.1:$hub_port" \
        -device virtio-net-pci,netdev=lan \
        -device i6300esb -action watchdog=reset \
        -chardev "pipe,id=console,path=$work/serial" -serial chardev:console \
        -monitor none </dev/null >"$work/qemu.log" 2>&1 &
    QEMU_PID=$!
}

# console_has TEXT: the console printed TEXT since the last console_mark.
CONSOLE_FROM=0
console_mark() { CONSOLE_FROM=$(stat -c %s "$work/console.log"); }
# Without carriage returns and terminal escapes (bash's bracketed paste, colours).
console_since() {
    tail -c "+$((CONSOLE_FROM + 1))" "$work/console.log" |
        sed -e 's/\r//g' -e 's/\x1b\[[?0-9;]*[a-zA-Z]//g'
}
console_has() { console_since | grep -aqF -- "$1"; }

# run TAG 'shell command': runs it on the serial console; its output comes back as
# "TAG:<output>" lines. Waits 60 s for the tag.
run() {
    local tag=$1 cmd=$2 n
    # Unique per call, though callers run this in $(...) subshells that share no counter.
    n=$RANDOM$RANDOM
    # Output lines start with the tag (the tty's echo of the command never does); the end
    # mark's echo has quotes in it, the mark itself does not.
    printf '%s\n' "( $cmd ) 2>&1 | sed 's/^/$tag$n=/'; echo $tag$n\"\"=END" >&7
    wait_for 60 "the console to run: $cmd" console_has "$tag$n=END"
    console_since | sed -n "s/^$tag$n=//p" | sed '$d'
}

boot_vm
wait_for "$BOOT_TIMEOUT" "a shell on the serial console" console_has "root@storebox"
echo "boot-test: serial console shell after $((SECONDS - qemu_start)) s"
slot_line=$(console_since | grep -a "storebox: booting slot" | tail -n1)
echo "boot-test: U-Boot said: $slot_line"
[[ $slot_line == *"slot A"* ]] || die "expected U-Boot to boot slot A first"

# 1. systemd: the migration ran, the daemon is active, the slot is marked good.
check_active() { [[ $(run A "systemctl is-active storebox.service") == active ]]; }
wait_for 120 "storebox.service active" check_active
ready_us=$(run R "systemctl show -P ActiveEnterTimestampMonotonic storebox.service")
echo "boot-test: storebox READY $(awk -v us="$ready_us" 'BEGIN{printf "%.1f", us/1e6}') s after the kernel started (systemd), $((SECONDS - qemu_start)) s or less after QEMU started"
[[ $(run M "systemctl is-active storebox-migrate.service") == active ]] ||
    die "storebox-migrate.service is not active"
run J "journalctl -b -u storebox-migrate.service -o cat --no-pager | grep schema" |
    sed 's/^/boot-test: migrate: /'
check_good() { [[ $(run G "systemctl is-active storebox-mark-good.service") == active ]]; }
wait_for 60 "storebox-mark-good.service" check_good
env_now=$(run E "fw_printenv")
echo "boot-test: boot state after mark-good: $(tr '\n' ' ' <<<"$env_now")"
grep -qx "BOOT_A_LEFT=3" <<<"$env_now" || die "slot A was not marked good (BOOT_A_LEFT=3)"

# The system around it, as the overlay set it up: the data partition's flash-friendly mount,
# the hardware watchdog driven by systemd, logs in RAM, no swap.
facts=$(run P "echo mount=\$(findmnt -no SOURCE,OPTIONS /var/lib/storebox);
echo watchdog=\$(systemctl show -P RuntimeWatchdogUSec)/\$(ls /dev/watchdog0);
echo journal=run:\$(find /run/log/journal -name '*.journal' | wc -l),var:\$(find /var/log/journal -name '*.journal' 2>/dev/null | wc -l);
echo swap=\$(swapon --noheadings | wc -l)")
echo "boot-test: $(tr '\n' ' ' <<<"$facts")"
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
echo "boot-test: till lookup via https://127.0.0.1:$lan_port (pinned): $(head -c 200 "$work/lookup.json")"
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
    sed 's/^/boot-test: journal: /'
run K2 "journalctl -b -u storebox.service -o cat --no-pager | grep -q 'Watchdog timeout' && echo yes" |
    grep -qx yes || die "the restart was not a watchdog timeout"
echo "boot-test: wedged daemon restarted by the watchdog $((SECONDS - wedge_start)) s after the wedge started"
run C "rm -f /run/systemd/system/storebox.service.d/wedge.conf /etc/storebox/storebox.d/90-wedge-test.toml && systemctl daemon-reload && systemctl restart storebox.service" >/dev/null
wait_for 60 "storebox.service active again" check_active

# 4. A/B fallback: no attempts left on A, so U-Boot boots B, and B is marked good.
run F "fw_setenv BOOT_A_LEFT 0 && sync && echo ok" | grep -qx ok || die "fw_setenv failed"
console_mark
printf 'systemctl reboot\n' >&7
wait_for "$BOOT_TIMEOUT" "U-Boot to boot a slot after the reboot" console_has "storebox: booting slot"
slot_line=$(console_since | grep -a "storebox: booting slot" | tail -n1)
echo "boot-test: U-Boot said: $slot_line"
[[ $slot_line == *"slot B"* ]] || die "expected slot B after A ran out of attempts"
# Typing before the autologin shell is up would be lost: wait for this boot's own prompt.
console_mark
wait_for "$BOOT_TIMEOUT" "the shell after booting slot B" console_has "root@storebox"
wait_for 120 "storebox.service active on slot B" check_active
booted=$(run S "tr ' ' '\n' </proc/cmdline | grep rauc.slot")
[[ $booted == rauc.slot=B ]] || die "expected rauc.slot=B, got '$booted'"
wait_for 60 "slot B marked good" check_good
env_now=$(run E "fw_printenv")
echo "boot-test: boot state on slot B: $(tr '\n' ' ' <<<"$env_now")"
grep -qx "BOOT_ORDER=B A" <<<"$env_now" || die "slot B was not put first"
echo "boot-test: all checks passed"
