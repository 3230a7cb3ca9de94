# Helpers of the image tests (boot-test.sh, ota-test.sh), sourced, not run. They need:
#   work      a scratch directory (disk.img, the console FIFOs and logs go there)
#   TEST      the name errors are prefixed with
# and set QEMU_PID, HUB_PID, CONSOLE_PID, HTTP_PID, BG_PID, which test_cleanup stops.
# shellcheck shell=bash
# Variables shared with the sourcing script (work, bin_dir, lan_port...) are set there.
# shellcheck disable=SC2034,SC2154

UBOOT=${STOREBOX_UBOOT:-/usr/lib/u-boot/qemu_arm64/u-boot.bin}
QEMU_USER=${QEMU_USER:-qemu-aarch64-static}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-240}
QEMU_PID="" HUB_PID="" CONSOLE_PID="" HTTP_PID="" BG_PID=""

die() { echo "$TEST: $*" >&2; exit 1; }
say() { echo "$TEST: $*"; }

stop() {  # stop PID: TERM, 10 s, KILL
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# test_cleanup RC KEEP_DIR: stops everything, prints the console's and the hub's tails when
# RC (the script's exit code) is not 0, keeps the logs (and disk.img) in KEEP_DIR when given,
# removes $work, exits with RC. For the EXIT trap: `trap 'test_cleanup $? "$keep"' EXIT`.
test_cleanup() {
    local rc=$1 keep=$2
    stop "$BG_PID"; stop "$QEMU_PID"; stop "$CONSOLE_PID"; stop "$HUB_PID"; stop "$HTTP_PID"
    if ((rc != 0)); then
        echo "--- serial console (last 60 lines)" >&2
        tail -n 60 "$work/console.log" 2>/dev/null | sed -e 's/\r//g' >&2 || true
        echo "--- hub log (last 20 lines)" >&2
        tail -n 20 "$work/hub/hub.log" 2>/dev/null >&2 || true
    fi
    if [[ -n $keep ]]; then
        mkdir -p "$keep"
        cp "$work"/*.log "$keep/" 2>/dev/null || true
        cp "$work/hub/hub.log" "$keep/hub.log" 2>/dev/null || true
        mv "$work/disk.img" "$keep/" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}

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

# --- the hub, on the host ------------------------------------------------------------------
# hub_start BIN_DIR STORE: storehub init + serve under qemu-user on 127.0.0.1; sets hub_port,
# admin_port, admin (the admin API's base URL) and token.
hub_port="" admin_port="" admin="" token=""
hub_start() {
    local bin_dir=$1 store=$2
    pick_port hub_port; pick_port admin_port
    mkdir -p "$work/hub"
    "$QEMU_USER" "$bin_dir/storehub" init --dir "$work/hub" --store "$store" \
        --hub-port "$hub_port" --admin-port "$admin_port" >"$work/hub-init.log" 2>&1 ||
        die "storehub init failed: $(cat "$work/hub-init.log")"
    "$QEMU_USER" "$bin_dir/storehub" serve --config "$work/hub/hub.toml" \
        </dev/null >"$work/hub/hub.log" 2>&1 &
    HUB_PID=$!
    admin=http://127.0.0.1:$admin_port
    token=$(<"$work/hub/admin.token")
    wait_for 30 "the hub's admin API" hub_up
}
hub_up() { hub_call GET /admin/v1/stores -o /dev/null 2>/dev/null; }
# hub_call METHOD PATH [curl arguments]: the admin API, fails on an HTTP error.
hub_call() {
    local method=$1 path=$2; shift 2
    curl -fsS --max-time "${HUB_CALL_TIMEOUT:-10}" -X "$method" \
        -H "authorization: Bearer $token" "$@" "$admin$path"
}

# --- the VM --------------------------------------------------------------------------------
# boot_vm: starts QEMU on $work/disk.img with the serial console on FIFOs (console.log gets
# everything it prints; `run` types into it), the till API forwarded to 127.0.0.1:$lan_port,
# the hub at 10.0.2.100:7443 in the VM, and, when http_port is set, the host's
# 127.0.0.1:$http_port at 10.0.2.101:8000 in the VM.
lan_port="" http_port=""
boot_vm() {
    local netdev
    [[ -e $work/serial.in ]] || mkfifo "$work/serial.in" "$work/serial.out"
    [[ -e $work/console.log ]] || : >"$work/console.log"
    # The reader appends to console.log; a writer is held open on serial.in so QEMU never
    # sees EOF.
    cat "$work/serial.out" >>"$work/console.log" &
    CONSOLE_PID=$!
    exec 7<>"$work/serial.in"
    netdev="user,id=lan,hostfwd=tcp:127.0.0.1:$lan_port-:8080"
    netdev+=",guestfwd=tcp:10.0.2.100:7443-cmd:socat - TCP:127.0.0.1:$hub_port"
    [[ -z $http_port ]] ||
        netdev+=",guestfwd=tcp:10.0.2.101:8000-cmd:socat - TCP:127.0.0.1:$http_port"
    qemu_start=$SECONDS
    qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 2 -m 1024 -nographic \
        -bios "$UBOOT" \
        -drive "if=none,id=disk,format=raw,file=$work/disk.img" \
        -device virtio-blk-pci,drive=disk \
        -netdev "$netdev" -device virtio-net-pci,netdev=lan \
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
# "TAG:<output>" lines. Waits RUN_TIMEOUT (60) s for it to finish; `run_rc` gives the exit
# code of the command's last run (via its own line).
RUN_TIMEOUT=60
run() {
    local tag=$1 cmd=$2 n
    # Unique per call, though callers run this in $(...) subshells that share no counter.
    n=$RANDOM$RANDOM
    # Output lines start with the tag (the tty's echo of the command never does); the end
    # mark's echo has quotes in it, the mark itself does not.
    printf '%s\n' "( $cmd ) 2>&1 | sed 's/^/$tag$n=/'; echo $tag$n\"\"=END" >&7
    wait_for "$RUN_TIMEOUT" "the console to run: $cmd" console_has "$tag$n=END"
    console_since | sed -n "s/^$tag$n=//p" | sed '$d'
}
# run_status TAG 'shell command': like run, with a last line "rc=N", the command's exit code.
run_status() {
    run "$1" "$2; echo rc=\$?"
}

# --- checks on the box -----------------------------------------------------------------------
check_active() { [[ $(run A "systemctl is-active storebox.service") == active ]]; }
check_good() { [[ $(run G "systemctl is-active storebox-mark-good.service") == active ]]; }
booted_slot() { run S "tr ' ' '\n' </proc/cmdline | sed -n 's/^rauc.slot=//p'"; }
boot_state() { run E "fw_printenv" | sort | tr '\n' ' ' | sed 's/ $//'; }

# wait_boot SLOT WHAT: after a reboot started (console_mark first): U-Boot picks SLOT (or
# any slot when SLOT is empty), then a shell. Sets boot_line (U-Boot's line).
boot_line=""
wait_boot() {
    local slot=$1 what=$2
    wait_for "$BOOT_TIMEOUT" "U-Boot to boot a slot ($what)" console_has "storebox: booting slot"
    boot_line=$(console_since | grep -a "storebox: booting slot" | tail -n1)
    say "U-Boot said: $boot_line"
    [[ -z $slot || $boot_line == *"slot $slot"* ]] || die "expected slot $slot ($what)"
    # Typing before the autologin shell is up would be lost: wait for this boot's own prompt,
    # printed after U-Boot's line.
    CONSOLE_FROM=$(grep -abo "storebox: booting slot" "$work/console.log" | tail -n1 | cut -d: -f1)
    wait_for "$BOOT_TIMEOUT" "the shell ($what)" console_has "root@storebox"
}
