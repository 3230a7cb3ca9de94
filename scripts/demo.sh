#!/usr/bin/env bash
# The storebox demo: a hub, a box and simulated tills on loopback, with a seed-scale store.
#
#   ./scripts/demo.sh            # about a minute of sales, then a summary
#   DEMO_SECONDS=300 ./scripts/demo.sh
#
# Everything lives in ./demo-run (recreated at each run) and listens on 127.0.0.1 only.
# Ports: hub 17443 (HTTPS, boxes), admin 17080, box LAN 18080 (HTTPS); override with DEMO_HUB_PORT,
# DEMO_ADMIN_PORT, DEMO_LAN_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${DEMO_SECONDS:-60}
hub_port=${DEMO_HUB_PORT:-17443}
admin_port=${DEMO_ADMIN_PORT:-17080}
lan_port=${DEMO_LAN_PORT:-18080}
store=shop-001
run=demo-run
bin=target/release

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "Building storebox, storehub and storesim (release)"
cargo build --release --locked --bins --workspace

rm -rf "$run"
mkdir -p "$run"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

say "Setting up a hub for store $store"
"$bin/storehub" init --dir "$run" --store "$store" \
    --hub-port "$hub_port" --admin-port "$admin_port" --lan-port "$lan_port"
token=$(cat "$run/admin.token")
admin="http://127.0.0.1:$admin_port/admin/v1/stores/$store"
box_config="$run/boxes/$store.toml"
# Pull the day's changes every 20 s so the demo shows them arriving.
mkdir -p "$run/boxes/storebox.d"
printf '[sync]\ndelta_interval = "20s"\n' > "$run/boxes/storebox.d/50-demo.toml"

"$bin/storehub" serve --config "$run/hub.toml" 2> "$run/hub.log" &
pids+=($!)
for _ in $(seq 100); do
    curl -fsS -o /dev/null -H "Authorization: Bearer $token" "http://127.0.0.1:$admin_port/admin/v1/stores" 2>/dev/null && break
    sleep 0.1
done

say "Generating a seed-scale store (5,000 products, 5,000 customers) and importing it"
"$bin/storesim" generate --out "$run/store" --seed 1
for module in config catalog customers promotions; do
    printf '  %-11s ' "$module"
    curl -fsS -X POST -H "Authorization: Bearer $token" --data-binary "@$run/store/$module.ndjson" \
        "$admin/modules/$module/import"
    echo
done

say "Starting the box: it makes its device key, enrolls with the token storehub init gave it, and runs its first full sync"
"$bin/storebox" serve --config "$box_config" 2> "$run/box.log" &
pids+=($!)
# The till API is HTTPS with a certificate made on the box; curl trusts exactly that one.
lan_cert="$run/boxes/$store-data/lan/lan.crt"
lan="https://127.0.0.1:$lan_port"
for _ in $(seq 300); do
    if [ -e "$lan_cert" ] && curl -fsS --cacert "$lan_cert" "$lan/v1/status" 2>/dev/null | grep -q '"last_full_ok":"'; then break; fi
    sleep 0.2
done
"$bin/storebox" status --config "$box_config"

say "Pairing the demo's tills (a provisioning shortcut; tills normally pair with a code a manager confirms)"
till_token=$("$bin/storebox" pair --config "$box_config" --name demo-tills --approve)
fingerprint=$("$bin/storebox" status --json --config "$box_config" | sed -n 's/.*"fingerprint": *"\([0-9a-f]*\)".*/\1/p' | head -1)
echo "  LAN certificate SHA-256 (tills pin it): $fingerprint"
auth="Authorization: Bearer $till_token"

say "A till looks up a product by EAN and a customer by loyalty card"
ean=$(head -1 "$run/store/catalog.ndjson" | sed 's/.*"ean13":"\([0-9]*\)".*/\1/')
card=$(head -1 "$run/store/customers.ndjson" | sed 's/.*"loyalty_card":"\([0-9]*\)".*/\1/')
curl -fsS --cacert "$lan_cert" -H "$auth" "$lan/v1/catalog/by-ean/$ean"; echo
curl -fsS --cacert "$lan_cert" -H "$auth" "$lan/v1/customers/by-card/$card"; echo

say "Four tills sell for $seconds s (progress every 10 s)"
STORESIM_TOKEN=$till_token "$bin/storesim" tills --box "$lan" --fingerprint "$fingerprint" \
    --tills 4 --rate 2 --seed 1 --duration "$seconds" --report-every 10 &
tills=$!
pids+=($tills)

sleep $((seconds / 3))
say "Meanwhile the back office publishes the day's changes at the hub"
"$bin/storesim" day --out "$run/day" --seed 1 --day 1
for f in "$run"/day/*.ndjson; do
    module=$(basename "$f" .ndjson)
    printf '  %-11s ' "$module"
    curl -fsS -X POST -H "Authorization: Bearer $token" --data-binary "@$f" "$admin/modules/$module/import"
    echo
done
for f in "$run"/day/*.deletes; do
    [ -e "$f" ] || continue
    module=$(basename "$f" .deletes)
    while read -r id; do
        curl -fsS -o /dev/null -X DELETE -H "Authorization: Bearer $token" "$admin/modules/$module/records/$id"
    done < "$f"
    echo "  $module      deleted $(wc -l < "$f")"
done
say "The box pulls them (a delta pull, run now rather than waiting for the next period)"
"$bin/storebox" sync delta --config "$box_config"

wait "$tills" || true
sleep 2
say "Final state of the box"
"$bin/storebox" status --config "$box_config"
say "The hub's view of the store"
curl -fsS -H "Authorization: Bearer $token" "$admin/status"; echo
echo
echo "Logs: $run/hub.log, $run/box.log. Setup and data stay in $run/."
