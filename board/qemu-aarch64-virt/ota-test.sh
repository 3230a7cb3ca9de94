# Over-the-air update scenarios of the image test, sourced by boot-test.sh and run on the VM
# it booted (one boot fewer than a test of their own). Needs test-lib.sh and boot-test.sh's
# state: work, bin_dir, fault_bin, STORE, the running VM (slot A, image version v1), the
# paired till (lan), the hub (hub_call) and http_port (the host's bundle server, at
# http://10.0.2.101:8000/ in the VM).
#
#   ota_prepare    (on the host, in the background while the VM boots) the root filesystem
#                  variants v2, v3 and v4 (v4's daemon never starts) and their bundles,
#                  signed with the development keys, plus the bundles that must be refused
#   ota_scenarios  a. LAN update A->B (v2) from the host's HTTP server
#                  b. refusals, boot state unchanged: tampered payload, another CA, wrong
#                     compatible, older version
#                  c. hub update B->A (v3) through the hub's admin API
#                  d. rollback: v4 fails its health check three boots in a row, U-Boot goes
#                     back to v3, the box reports RolledBack
#                  e. the sales posted before each update are at the hub exactly once
# shellcheck shell=bash
# Variables shared with the sourcing script (work, bin_dir, lan_port...) are set there.
# shellcheck disable=SC2034,SC2154

OTA_COMPATIBLE=storebox-qemu-aarch64-virt
OTA_KEYS=${OTA_KEYS:-$REPO/board/common/ota-dev}
# The install itself (download, checks, rauc install) and the wait for a new slot to be
# healthy; a reboot has BOOT_TIMEOUT.
OTA_INSTALL_TIMEOUT=${OTA_INSTALL_TIMEOUT:-900}
OTA_HEALTH_TIMEOUT=${OTA_HEALTH_TIMEOUT:-300}
# health_timeout in test-overlay/etc/storebox/storebox.d/50-ota-test.toml, plus a boot.
OTA_TRIAL_BOOT_TIMEOUT=$((BOOT_TIMEOUT + 120 + 120))

ota_log() { echo "$TEST: ota: $*"; }

# --- on the host: variants and bundles ------------------------------------------------------
# Runs in the background (ota_prepare &), writing $work/ota/*.raucb and ota/prepare.log.
ota_build() {
    local dir=$work/ota keys=$OTA_KEYS v extra
    mkdir -p "$dir/broken/etc/systemd/system/storebox.service.d" "$dir/tiny/usr/lib/storebox"
    # v4: a release whose daemon exits at once, so it never gets healthy.
    printf '%s\n' "# Test variant v4 (ota-test.sh): a daemon that fails at every start." \
        "[Service]" "ExecStart=" "ExecStart=/bin/false" \
        >"$dir/broken/etc/systemd/system/storebox.service.d/99-broken.conf"
    for v in v2 v3 v4; do
        extra=()
        [[ $v != v4 ]] || extra=(--extra-overlay "$dir/broken")
        "$HERE/build-test-image.sh" --bin-dir "$bin_dir" --fault-bin "$fault_bin" \
            --version "$v" --rootfs-only --rootfs-out "$dir/$v.ext4" "${extra[@]}" || return 1
    done
    bundle() {  # bundle VERSION ROOTFS OUT [COMPATIBLE]
        "$REPO/scripts/ota-bundle.sh" --rootfs "$2" --version "$1" \
            --compatible "${4:-$OTA_COMPATIBLE}" --cert "$keys/dev-signer.crt" \
            --key "$keys/dev-signer.key" --keyring "$keys/dev-ca.crt" --out "$3"
    }
    for v in v2 v3 v4 v1; do
        bundle "$v" "$dir/$v.ext4" "$work/www/$v.raucb" || return 1
        rm -f "$dir/$v.ext4"
    done
    # Refused ones, offered while the box runs v2, so each is newer and only what it is
    # meant to test is wrong. Tampered: four bytes of v3's payload changed after signing (the
    # signature and the manifest are intact, only reading the payload shows it).
    cp "$work/www/v3.raucb" "$work/www/tampered.raucb"
    printf '\xde\xad\xbe\xef' |
        dd of="$work/www/tampered.raucb" bs=1 seek=$(($(stat -c %s "$work/www/v3.raucb") / 3)) \
            conv=notrunc status=none
    # Another CA: v3 signed by an unrelated development CA the box does not trust.
    "$REPO/board/common/ota-dev/make-dev-keys.sh" "$dir/other-ca" "another CA" || return 1
    printf '%s\n' "[system]" "compatible=$OTA_COMPATIBLE" "bootloader=noop" "[keyring]" \
        "path=$dir/other-ca/dev-ca.crt" "check-purpose=codesign" >"$dir/other-ca/system.conf"
    rauc --conf "$dir/other-ca/system.conf" --keyring "$dir/other-ca/dev-ca.crt" resign \
        --no-verify --cert "$dir/other-ca/dev-signer.crt" --key "$dir/other-ca/dev-signer.key" \
        "$work/www/v3.raucb" "$work/www/other-ca.raucb" >"$dir/resign.log" 2>&1 || {
        cat "$dir/resign.log"; return 1; }
    # Wrong compatible (the Raspberry Pi's), a version above every other: the box must refuse
    # it on its manifest, so its payload is a small file system of no use.
    echo v9 >"$dir/tiny/usr/lib/storebox/image-version"
    head -c 1048576 /dev/urandom >"$dir/tiny/usr/lib/storebox/filler"
    mke2fs -q -t ext4 -d "$dir/tiny" "$dir/tiny.ext4" 8M || return 1
    bundle v9 "$dir/tiny.ext4" "$work/www/wrong-compatible.raucb" storebox-raspberrypi4-64 ||
        return 1
    ls -l "$work/www"
}
ota_prepare() {
    mkdir -p "$work/ota" "$work/www"
    (
        start=$SECONDS
        ota_build && echo "ota-prepare: done in $((SECONDS - start)) s"
    ) >"$work/ota/prepare.log" 2>&1 &
    BG_PID=$!
}
ota_wait_prepared() {
    wait "$BG_PID" || { tail -n 40 "$work/ota/prepare.log" >&2; die "preparing the bundles failed"; }
    BG_PID=""
    grep "ota-bundle:\|ota-prepare:" "$work/ota/prepare.log" | sed "s|$work/||; s/^/$TEST: /"
}

# --- on the box ------------------------------------------------------------------------------
# ota_sales TAG N: posts N sales through the till API; their ids go to $work/ota/sales.
ota_sales() {
    local tag=$1 n=$2 i id code
    for ((i = 1; i <= n; i++)); do
        id="ota-$tag-$i-$RANDOM$RANDOM"
        code=$(curl -sS --max-time 10 -o "$work/ota/sale.json" -w '%{http_code}' \
            --cacert "$work/lan.crt" -H "authorization: Bearer $till_token" \
            -H 'content-type: application/json' \
            --data "{\"id\":\"$id\",\"type\":\"sale\",\"total_cents\":$((100 * i + 99)),\"lines\":[{\"sku\":\"$sku\",\"qty\":$i}]}" \
            "https://127.0.0.1:$lan_port/v1/activity") || die "POST /v1/activity failed"
        [[ $code == 201 ]] || die "POST /v1/activity: HTTP $code $(cat "$work/ota/sale.json")"
        echo "$id" >>"$work/ota/sales"
    done
    ota_log "posted $n sales ($tag)"
}

# ota_install URL VERSION: `storebox ota install URL` on the console, which must say it
# installed (normally with the version: "installed v2 into slot B in 61.2 s; ...") and end in
# a reboot. Typed as is (no `run`): the box may reboot before the shell gets to print
# anything after it. Leaves the console mark before the reboot.
ota_install() {
    local url=$1 version=$2
    console_mark
    # The quotes keep the typed line's echo from matching the result line.
    printf '%s\n' "storebox ota install $url; echo ota\"\"-install-rc=\$?" >&7
    wait_for "$OTA_INSTALL_TIMEOUT" "the install of $url to end or reboot" ota_install_done
    if console_has "ota-install-rc=" && ! console_has "ota-install-rc=0"; then
        console_since | tail -n 20 >&2
        die "storebox ota install $url failed"
    fi
    console_since | grep -a "^installed" | grep -aq -- "$version" ||
        console_since | grep -aq "^installed" ||
        die "storebox ota install $url printed no line saying it installed $version"
    console_since | grep -a "^installed" | tail -n1 | sed "s/^/$TEST: box: /"
}
ota_install_done() { console_has "ota-install-rc=" || console_has "storebox: booting slot"; }

# ota_refused NAME WHY WORD: `storebox ota install` of a bundle the box must refuse: non-zero,
# "storebox: error: ..." naming WORD (so it was refused for that reason), no reboot, the boot
# state as it was.
ota_refused() {
    local name=$1 why=$2 word=$3 before after out
    before=$(boot_state)
    RUN_TIMEOUT=$OTA_INSTALL_TIMEOUT
    out=$(run_status O "storebox ota install http://10.0.2.101:8000/$name.raucb")
    RUN_TIMEOUT=60
    [[ $(tail -n1 <<<"$out") =~ ^rc=[1-9] ]] || {
        echo "$out" >&2; die "the $why bundle was not refused (storebox ota install: $(tail -n1 <<<"$out"))"; }
    grep -q "storebox: error: " <<<"$out" || {
        echo "$out" >&2; die "refusing the $why bundle printed no 'storebox: error:' line"; }
    ota_log "$why: $(grep "storebox: error: " <<<"$out" | tail -n1)"
    grep "storebox: error: " <<<"$out" | grep -qiF -- "$word" ||
        die "the $why bundle was refused, but not for that reason (no '$word' in the error)"
    after=$(boot_state)
    [[ $after == "$before" ]] ||
        die "the $why bundle changed the boot state: '$before' became '$after'"
    console_has "storebox: booting slot" && die "the box rebooted after refusing the $why bundle"
    return 0
}

# ota_healthy SLOT VERSION: the booted slot is SLOT running VERSION, marked good by
# storebox-mark-good.service (first in BOOT_ORDER, 3 attempts).
ota_healthy() {
    local slot=$1 version=$2 other state
    [[ $slot == A ]] && other=B || other=A
    wait_for 120 "storebox.service active on slot $slot" check_active
    wait_for "$OTA_HEALTH_TIMEOUT" "slot $slot ($version) marked good" check_good
    [[ $(booted_slot) == "$slot" ]] || die "expected rauc.slot=$slot, got '$(booted_slot)'"
    [[ $(run V "cat /usr/lib/storebox/image-version") == "$version" ]] ||
        die "slot $slot does not run $version: $(run V "cat /usr/lib/storebox/image-version")"
    state=$(boot_state)
    ota_log "slot $slot runs $version; boot state: $state"
    [[ " $state " == *" BOOT_ORDER=$slot $other "* && " $state " == *" BOOT_${slot}_LEFT=3 "* ]] ||
        die "slot $slot is not marked good: $state"
}

# ota_status: the box's GET /v1/status "ota" block, one line.
ota_status() {
    lan "/v1/status" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin).get("ota")))'
}
# has_event JSON_LIST_PATH EVENT VERSION [reason]: the JSON on stdin has, in the list at
# JSON_LIST_PATH (dot-separated keys), an entry with that event and version (and a reason).
has_event() {
    python3 -c '
import json, sys
path, event, version, need_reason = sys.argv[1], sys.argv[2], sys.argv[3], len(sys.argv) > 4
doc = json.load(sys.stdin)
for key in path.split("."):
    doc = (doc or {}).get(key)
ok = any(e.get("event") == event and e.get("version") == version and (e.get("reason") or not need_reason)
         for e in doc or [])
sys.exit(0 if ok else 1)' "$@"
}
box_has_rollback() { ota_status | has_event events rolled_back v4 reason; }
# hub_ota_has EVENT VERSION [reason]: the hub's view of the store has that report.
hub_ota_has() {
    hub_call GET "/admin/v1/stores/$STORE/ota" 2>/dev/null | has_event reports "$@"
}

ota_scenarios() {
    local t0 elapsed n
    : >"$work/ota/sales"
    ota_wait_prepared
    ota_log "box: $(ota_status)"

    # a. A LAN update, A -> B: the bundle from a laptop on the shop's LAN (here the host).
    ota_sales lan 3
    t0=$SECONDS
    ota_install "http://10.0.2.101:8000/v2.raucb" v2
    wait_boot B "the reboot into the update v2"
    ota_healthy B v2
    elapsed=$((SECONDS - t0))
    ota_log "a. LAN update to v2: ${elapsed} s from 'storebox ota install' to healthy on slot B"

    # b. Refusals: each leaves the boot state as it was, and no reboot.
    console_mark
    ota_refused tampered "tampered" payload
    ota_refused other-ca "signed by another CA" signature
    ota_refused wrong-compatible "wrong compatible" storebox-raspberrypi4-64
    ota_refused v1 "older version (v1 < v2, no --force-downgrade)" v1
    [[ $(booted_slot) == B ]] || die "not on slot B any more after the refusals"
    ota_log "b. four bad bundles refused, boot state unchanged"

    # c. A hub update, B -> A: the bundle uploaded to the hub, the store's target set; the
    # box finds it at its next check ([ota] check_interval), downloads, installs, reboots.
    ota_sales hub 2
    HUB_CALL_TIMEOUT=300 hub_call PUT "/admin/v1/ota/bundles/v3" \
        -H 'content-type: application/octet-stream' --data-binary "@$work/www/v3.raucb" \
        -o /dev/null || die "uploading v3 to the hub failed"
    hub_call PUT "/admin/v1/stores/$STORE/ota" -H 'content-type: application/json' \
        --data '{"version":"v3"}' -o /dev/null || die "setting the store's target to v3 failed"
    t0=$SECONDS
    console_mark
    wait_for "$OTA_INSTALL_TIMEOUT" "the box to install v3 from the hub and reboot" \
        console_has "storebox: booting slot"
    wait_boot A "the reboot into the update v3"
    ota_healthy A v3
    wait_for 120 "the hub to show v3 healthy" hub_ota_has healthy v3
    ota_log "c. hub update to v3: $((SECONDS - t0)) s from the target set to healthy on slot A"
    ota_log "hub: $(hub_call GET "/admin/v1/stores/$STORE/ota" | head -c 600)"

    # d. Rollback: v4's daemon never starts. Each boot of slot B costs one attempt;
    # `storebox ota mark-good` gives up after health_timeout and reboots; after three, U-Boot
    # boots A (v3) again, and the box reports the rollback.
    ota_sales rollback 2
    t0=$SECONDS
    ota_install "http://10.0.2.101:8000/v4.raucb" v4
    for n in 1 2 3; do
        wait_boot B "boot $n of the failing v4"
        [[ $boot_line == *"B $((3 - n)) left"* ]] ||
            die "boot $n of v4 should leave B $((3 - n)) attempts: $boot_line"
        console_mark
        ((n < 3)) || break
        wait_for "$OTA_TRIAL_BOOT_TIMEOUT" "v4 to give up and reboot (boot $n)" \
            console_has "storebox: booting slot"
    done
    wait_for "$OTA_TRIAL_BOOT_TIMEOUT" "v4 to give up a third time and U-Boot to go back" \
        console_has "storebox: booting slot"
    wait_boot A "the fallback to v3"
    ota_healthy A v3
    ota_log "d. rollback: v4 failed three boots, back on v3 after $((SECONDS - t0)) s"
    wait_for 60 "the box's status (GET /v1/status) to report v4 rolled back with a reason" \
        box_has_rollback
    ota_log "box: $(ota_status | head -c 600)"
    wait_for 120 "the hub to show v4 rolled back with a reason" hub_ota_has rolled_back v4 reason
    ota_log "hub: $(hub_call GET "/admin/v1/stores/$STORE/ota" | head -c 600)"

    # e. Every sale posted before the updates is at the hub, once.
    wait_for 120 "the hub to hold every sale posted before the updates" ota_sales_at_hub
    ota_log "e. the $(wc -l <"$work/ota/sales") sales posted before the updates are at the hub exactly once"
}
# ota_sales_at_hub: each id of $work/ota/sales is at the hub once; fails (saying which)
# while one is missing, dies when one is there twice.
ota_sales_at_hub() {
    local after=0 page
    : >"$work/ota/hub-ids"
    while :; do
        page=$(hub_call GET "/admin/v1/stores/$STORE/activity?after=$after&limit=1000") || return 1
        python3 -c '
import json, sys
page = json.load(sys.stdin)
for e in page["events"]:
    print(e.get("id", ""))
print("next", page.get("next") or 0, len(page["events"]), file=sys.stderr)' \
            <<<"$page" >>"$work/ota/hub-ids" 2>"$work/ota/hub-page" || return 1
        read -r _ after count <"$work/ota/hub-page"
        ((count > 0)) || break
    done
    python3 - "$work/ota/sales" "$work/ota/hub-ids" <<'PY'
import collections, sys
posted = [l.strip() for l in open(sys.argv[1]) if l.strip()]
seen = collections.Counter(l.strip() for l in open(sys.argv[2]) if l.strip())
twice = [i for i in posted if seen[i] > 1]
if twice:
    print("ota-test: at the hub more than once: %s" % ", ".join(twice), file=sys.stderr)
    sys.exit(2)
missing = [i for i in posted if seen[i] == 0]
sys.exit(1 if missing else 0)
PY
    case $? in
        0) return 0 ;;
        2) die "a sale reached the hub twice" ;;
        *) return 1 ;;
    esac
}
