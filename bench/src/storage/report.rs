//! The storage results as a Markdown page: each figure next to its baseline, then the targets.

use std::fmt::Write as _;

use serde_json::Value;

use crate::common::bytes_h;

pub fn markdown(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let m = &r["machine"];
    let fs = &m["data_dir_fs"];
    let a = &r["activity"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# storebox storage benchmark ({} run)\n",
        r["mode"].as_str().unwrap_or("?")
    );
    let _ = writeln!(s, "{}", crate::common::machine_line(m));
    let _ = writeln!(
        s,
        "Load average (1, 5, 15 min) at the start: {}; at the end: {}. The CPUs are shared with \
         whatever else runs: latencies, p99 above all, move with it; flash bytes do not.\n",
        m["loadavg_at_start"].as_str().unwrap_or("?"),
        m["loadavg_at_end"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        s,
        "Data directories (box, SQLite, nginx's files) on {}{}, logical block {} B; the box's \
         journal uses O_DIRECT: {}. Store: {} records, {} products. Flash bytes are \
         `write_bytes` of `/proc/<pid>/io`: the box process for the box, this process for \
         SQLite.\n",
        fs["fstype"].as_str().unwrap_or("?"),
        if fs["on_block_device"] == true {
            " on a block device (not tmpfs)"
        } else {
            ""
        },
        fs["logical_block_bytes"]
            .as_u64()
            .map_or("?".to_owned(), |b| b.to_string()),
        fs["journal_direct_io"],
        u(&r["store"]["records"]),
        u(&r["store"]["catalog_products"]),
    );

    let _ = writeln!(
        s,
        "## Durable activity: {} tills, {} B events\n\nstorebox: `POST /v1/activity` over \
         keep-alive HTTP/1.1, 201 once synced. SQLite {}: {}; {}; same payloads, tills and \
         pacing, no HTTP. Latency from the scheduled send (open loop) or from the send \
         (unpaced).\n",
        u(&a["tills"]),
        u(&a["event_bytes"]),
        a["sqlite"]["version"].as_str().unwrap_or("?"),
        a["sqlite"]["settings"].as_str().unwrap_or("?"),
        a["sqlite"]["connections"].as_str().unwrap_or("?"),
    );
    s.push_str(
        "| Offered | storebox acked/s | storebox p50 / p99 | storebox flash B/event (journal's own) | events/commit | SQLite acked/s | SQLite p50 / p99 | SQLite flash B/event | B/event box/SQLite | events/s box/SQLite |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in a["runs"].as_array().into_iter().flatten() {
        let b = &run["storebox"];
        let q = &run["sqlite"];
        let offered = run["offered_per_s"]
            .as_u64()
            .map_or("unpaced".to_owned(), |r| format!("{r}/s"));
        let _ = writeln!(
            s,
            "| {offered} ({} s) | {:.0} | {:.2} / {:.2} ms | {:.0} ({:.0}) | {:.1} | {:.0} | {:.2} / {:.2} ms | {:.0} | {:.3} | {:.2}× |",
            fmt_secs(f(&b["seconds"])),
            f(&b["events_per_s"]),
            f(&b["p50_ms"]),
            f(&b["p99_ms"]),
            f(&b["flash_bytes_per_event"]),
            f(&b["journal_bytes_per_event"]),
            f(&b["events_per_commit"]),
            f(&q["events_per_s"]),
            f(&q["p50_ms"]),
            f(&q["p99_ms"]),
            f(&q["flash_bytes_per_event"]),
            f(&run["ratio_bytes_per_event"]),
            f(&run["ratio_events_per_s"]),
        );
    }
    let unpaced_sqlite = a["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|run| run["offered_per_s"].is_null())
        .map(|run| f(&run["sqlite"]["p50_ms"]));
    let errors: u64 = a["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|run| u(&run["storebox"]["errors"]) + u(&run["sqlite"]["errors"]))
        .sum();
    let segments: Vec<String> = a["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|run| {
            format!(
                "{}→{}",
                u(&run["storebox"]["journal_segments_before"]),
                u(&run["storebox"]["journal_segments_after"])
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "\nThe box's flash figure includes everything the process wrote in the window: journal \
         commits, new 4 MiB journal segments (zero-filled once when created; segments per run: \
         {}), the push mark saved to redb once a minute when it falls in the window, and \
         anything else (`other_write_bytes` in the JSON). Failed or unanswered posts: \
         {errors}.\n",
        segments.join(", ")
    );
    // The hub shares the disk: what the device took during the box's runs, beyond the box.
    let neighbour: Vec<String> = a["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|run| run["storebox"]["device_write_bytes_all_processes"].is_u64())
        .map(|run| {
            let b = &run["storebox"];
            format!(
                "{}: {} (box {})",
                run["offered_per_s"]
                    .as_u64()
                    .map_or("unpaced".to_owned(), |r| format!("{r}/s")),
                bytes_h(u(&b["device_write_bytes_all_processes"])),
                bytes_h(u(&b["flash_write_bytes"])),
            )
        })
        .collect();
    if !neighbour.is_empty() {
        let _ = writeln!(
            s,
            "The whole device took, during the box's runs, {}: mostly the hub (on the same \
             disk here, unlike in a shop) committing each push to its database. Its syncs \
             compete with the box's commits and can show in the box's tail latency; SQLite's \
             runs have no such neighbour.\n",
            neighbour.join("; ")
        );
    }
    if let Some(p50) = unpaced_sqlite {
        let _ = writeln!(
            s,
            "Unpaced, SQLite's p50 ({p50:.2} ms) is about what one fsync'd commit costs on this \
             disk: it bounds SQLite's rate, while the box shares each commit among the tills \
             waiting and spends its time on HTTP and JSON on the shared CPUs. On a medium whose \
             flush takes milliseconds (SD cards, eMMC) sharing commits counts for more; this \
             run does not measure such a medium.\n"
        );
    }

    let fsu = &r["full_sync"]["unchanged"];
    let fs1 = &r["full_sync"]["catalog_1pct"];
    let _ = writeln!(
        s,
        "## Full-sync write cost (box `write_bytes`)\n\nEach case run {} times (the 1 % case on \
         a different 1 % each time); the run with the median figure is shown, every run's \
         figure in brackets. No activity pending.\n",
        u(&r["full_sync"]["repeats"])
    );
    s.push_str(
        "| Case | Box wrote | Changed records (canonical JSON) | Written / changed size | Sync took |\n|---|---|---|---|---|\n",
    );
    let _ = writeln!(
        s,
        "| `POST /v1/sync/full`, nothing changed | {} ({}) | 0 | – | {} ms |",
        bytes_h(u(&fsu["write_bytes"])),
        runs_h(&fsu["write_bytes_runs"]),
        u(&fsu["box_reported_ms"]),
    );
    let _ = writeln!(
        s,
        "| `POST /v1/sync/full` after {} products (1 % of the catalog) got a new price at the hub | {} ({}) | {} | {:.1}× | {} ms |\n",
        u(&fs1["changed_records"]),
        bytes_h(u(&fs1["write_bytes"])),
        runs_h(&fs1["write_bytes_runs"]),
        bytes_h(u(&fs1["changed_encoded_bytes"])),
        f(&fs1["ratio_write_to_encoded"]),
        u(&fs1["box_reported_ms"]),
    );

    let l = &r["lookup"];
    let _ = writeln!(
        s,
        "## Lookups: {} requests/s from {} keep-alive clients, open loop, {} s per series\n",
        u(&l["rate_per_s"]),
        u(&l["clients"]),
        fmt_secs(f(&l["seconds_per_series"])),
    );
    if l["nginx"]["available"] == true {
        let _ = writeln!(
            s,
            "Baseline: {} serving the same bytes as static files (`catalog/<id>.json`, \
             `catalog/by-ean/<ean>.json`), {}. Series alternate between the two servers.\n",
            l["nginx"]["version"].as_str().unwrap_or("?"),
            l["nginx"]["note"].as_str().unwrap_or(""),
        );
        s.push_str("| Lookup | storebox p50 / p99 | nginx p50 / p99 | p99 box/nginx |\n|---|---|---|---|\n");
    } else {
        let _ = writeln!(
            s,
            "**nginx is not installed: the baseline was skipped** (`apt-get install \
             nginx-light`, then run again).\n"
        );
        s.push_str("| Lookup | storebox p50 / p99 | nginx | |\n|---|---|---|---|\n");
    }
    for (name, key, path) in [
        ("by id", "by_id", "`GET /v1/catalog/{id}`"),
        ("by EAN", "by_ean", "`GET /v1/catalog/by-ean/{ean}`"),
    ] {
        let e = &l[key];
        let b = &e["storebox"];
        let n = &e["nginx"];
        let _ = if n.is_null() {
            writeln!(
                s,
                "| {name}: {path} | {:.0} / {:.0} µs | not measured | – |",
                f(&b["p50_us"]),
                f(&b["p99_us"]),
            )
        } else {
            writeln!(
                s,
                "| {name}: {path} | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.2}× |",
                f(&b["p50_us"]),
                f(&b["p99_us"]),
                f(&n["p50_us"]),
                f(&n["p99_us"]),
                f(&e["ratio_p99"]),
            )
        };
    }

    let mem = &r["memory"];
    let _ = writeln!(
        s,
        "\n## Idle memory\n\nBox VmRSS {:.1} s after its cold full sync, no request meanwhile: \
         **{:.1} MiB** ({:.2} × 10⁶ B). It wrote {} from its start to the end of the cold sync, {} \
         while idle.\n",
        f(&mem["idle_seconds"]),
        f(&mem["idle_rss_kib"]) / 1024.0,
        f(&mem["idle_rss_kib"]) * 1024.0 / 1e6,
        bytes_h(u(&mem["write_bytes_box_start_to_synced"])),
        bytes_h(u(&mem["write_bytes_while_idle"])),
    );

    s.push_str("## Targets\n\n| Target | Threshold | Measured | |\n|---|---|---|---|\n");
    for t in r["targets"].as_array().into_iter().flatten() {
        let verdict = match t["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {verdict} |",
            t["target"].as_str().unwrap_or("?"),
            t["threshold"].as_str().unwrap_or("?"),
            t["measured"].as_str().unwrap_or("?"),
        );
    }
    let _ = writeln!(
        s,
        "\nHub, box, nginx and the load threads share this machine's CPUs; the hub also writes \
         the pushed activity to the same disk during the box's runs (not counted: other \
         process). Details, including whole-device write counts for context, in \
         `storage.json`; method in `bench/src/storage/mod.rs`. Reproduce: `cargo build \
         --release --workspace --bins && cargo run --release -p storebox-bench -- storage{}`.",
        if r["mode"] == "quick" { " --quick" } else { "" },
    );
    s
}

fn runs_h(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|b| bytes_h(b.as_u64().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_secs(x: f64) -> String {
    if (x - x.round()).abs() < 0.05 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}
