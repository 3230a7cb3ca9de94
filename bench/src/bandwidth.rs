//! The bandwidth benchmark: what a shop's link carries, counted by a byte-counting relay
//! between the box and the hub (so TLS records, HTTP/2 frames and handshakes all count),
//! scenario by scenario, next to the seed's reference volumes and the same data under a
//! generic compressor (zstd -19 of the raw JSON Lines, computed in this process).
//!
//! Scenarios, in order, on one box:
//! 1. cold full sync of the generated seed-scale store (`generate_store(1)`);
//! 2. full sync with nothing changed;
//! 3. the day's changes (`day_changes(.., 1)`) by one delta pull;
//! 4. a poll with nothing changed;
//! 5. a full sync after a missed day (`day_changes(.., 2)`), against the delta of the same
//!    changes from the same starting state (the box's data directory is copied before and
//!    put back for the delta);
//! 6. a reconnection after a line cut (TLS 1.3 resumption);
//! 7. the cold full sync again under a 1 Mbit/s download cap (the cap holds);
//! 8. a simulated 14-hour day: the daily full sync, a poll every 5 minutes (168), the day's
//!    changes (`day_changes(.., 3)`) spread over the polls; then 2,000 sales pushed one by one
//!    as they would be at a real till's pace, for the bytes per sale.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{
    bytes_h, call, machine_info, machine_line, ratio, sibling, source_info, write_results, Bins,
    BoxProc, Hub,
};

/// The seed's figures per retrieval (its README): configuration 100 KB every time, catalog
/// and customers 1 MB full or 5 KB per delta, promotions 20 KB.
const SEED_FULL: u64 = 100_000 + 1_000_000 + 1_000_000 + 20_000;
const SEED_DELTA: u64 = 100_000 + 5_000 + 5_000 + 20_000;
/// One full sync and a delta every 5 minutes over 14 hours: about 24 MB.
const SEED_DAY: u64 = SEED_FULL + 168 * SEED_DELTA;

const POLLS: usize = 14 * 12;
const SALES: usize = 2_000;

/// A TCP relay on loopback that counts what crosses it and can cut every connection.
struct Relay {
    addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start(target: SocketAddr) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let (u, d) = (up.clone(), down.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (u, d, mut cuts) = (u.clone(), d.clone(), cuts.clone());
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, u) => {}
                        _ = pump(sr, cw, d) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Ok(Relay {
            addr,
            up,
            down,
            cut,
        })
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::SeqCst),
            self.down.load(Ordering::SeqCst),
        )
    }

    /// Bytes (sent by the box, received by the box) moved by `f`.
    async fn measure<F, Fut, T>(&self, f: F) -> anyhow::Result<(T, u64, u64)>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let (u0, d0) = self.counts();
        let out = f().await?;
        // Let the last TLS records (session tickets, window updates) land.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (u1, d1) = self.counts();
        Ok((out, u1 - u0, d1 - d0))
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::SeqCst);
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn hub_port(hub: &Hub) -> anyhow::Result<u16> {
    let text = std::fs::read_to_string(hub.dir.path().join("hub.toml"))?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("listen")?.trim().strip_prefix('=')?;
            let v = v.trim().trim_matches('"');
            v.parse::<SocketAddr>().ok()
        })
        .map(|a| a.port())
        .context("no sync listen address in hub.toml")
}

async fn apply_changes(hub: &Hub, changes: &storebox_sim::DayChanges) -> anyhow::Result<()> {
    for (module, records) in &changes.upserts {
        hub.import(module, records).await?;
    }
    for (module, ids) in &changes.deletes {
        for id in ids {
            hub.delete(module, id).await?;
        }
    }
    Ok(())
}

fn ok(report: &Value) -> anyhow::Result<()> {
    anyhow::ensure!(report["ok"] == true, "sync failed: {report}");
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

pub async fn run() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let bins = Bins {
        hub: sibling(&exe, "storehub")?,
        storebox: sibling(&exe, "storebox")?,
    };
    let started_at = chrono::Utc::now();
    let store = storebox_sim::generate_store(1);
    let raw: Vec<u8> = storebox_sim::MODULES
        .iter()
        .flat_map(|m| storebox_sim::to_ndjson(&store.modules[*m]).into_bytes())
        .collect();
    // The baseline: the same records as JSON Lines under a generic compressor at its best.
    let zstd19 = zstd::encode_all(raw.as_slice(), 19)?.len() as u64;

    let hub = Hub::start(&bins).await?;
    for module in storebox_sim::MODULES {
        hub.import(module, &store.modules[module]).await?;
    }
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], hub_port(&hub)?))).await?;
    let dropins = hub.dir.path().join("boxes/storebox.d");
    std::fs::create_dir_all(&dropins)?;
    std::fs::write(
        dropins.join("60-relay.toml"),
        format!("[hub]\nurl = \"https://{}\"\n", relay.addr),
    )?;

    let mut rows: Vec<Value> = Vec::new();
    let mut row = |name: &str, sent: u64, received: u64, seed: Option<u64>, note: String| {
        let total = sent + received;
        println!("{name}: {} ({note})", bytes_h(total));
        rows.push(json!({
            "scenario": name, "sent": sent, "received": received, "total": total,
            "seed": seed, "ratio_to_seed": seed.map(|s| ratio(total as f64, s as f64)),
            "note": note,
        }));
    };

    // 1. Cold full sync.
    let (mut boxp, sent, received) = relay
        .measure(|| async {
            let boxp = BoxProc::spawn(&bins, &hub)?;
            boxp.wait_full_sync(Duration::from_secs(120)).await?;
            boxp.wait_full_report(Duration::from_secs(20)).await?;
            Ok(boxp)
        })
        .await?;
    let cold = sent + received;
    row(
        "cold full sync",
        sent,
        received,
        Some(SEED_FULL),
        format!(
            "{:.3} of zstd -19 of the raw JSON Lines ({}; raw {})",
            ratio(cold as f64, zstd19 as f64),
            bytes_h(zstd19),
            bytes_h(raw.len() as u64)
        ),
    );

    // 2. Full sync, nothing changed.
    let (_, sent, received) = relay
        .measure(|| async { ok(&boxp.post_json("/v1/sync/full").await?) })
        .await?;
    row(
        "full sync, nothing changed",
        sent,
        received,
        Some(SEED_FULL),
        "digests compared".into(),
    );

    // 3. The day's changes by delta.
    let day1 = storebox_sim::day_changes(&store, 1, 1);
    let changed: usize = day1.upserts.values().map(Vec::len).sum::<usize>()
        + day1.deletes.values().map(Vec::len).sum::<usize>();
    apply_changes(&hub, &day1).await?;
    let (_, sent, received) = relay
        .measure(|| async { ok(&boxp.post_json("/v1/sync/delta").await?) })
        .await?;
    row(
        "delta carrying the day's changes",
        sent,
        received,
        Some(SEED_DELTA),
        format!("{changed} records changed or deleted"),
    );

    // 4. A poll with nothing changed.
    let (_, sent, received) = relay
        .measure(|| async { ok(&boxp.post_json("/v1/sync/delta").await?) })
        .await?;
    row(
        "poll, nothing changed",
        sent,
        received,
        Some(SEED_DELTA),
        "on the open connection".into(),
    );

    // 5. Full sync after a missed day, against the delta of the same changes.
    let day2 = storebox_sim::day_changes(&store, 1, 2);
    drop(boxp);
    let saved = hub.dir.path().join("saved-box-data");
    let data_dir = hub
        .dir
        .path()
        .join("boxes")
        .join(format!("{}-data", crate::common::STORE));
    copy_dir(&data_dir, &saved)?;
    apply_changes(&hub, &day2).await?;
    // Both measurements below start with a fresh process, so both include one full TLS
    // handshake: the ratio compares like with like.
    boxp = BoxProc::spawn(&bins, &hub)?;
    boxp.wait_full_sync(Duration::from_secs(60)).await?;
    let (full_report, sent, received) = relay
        .measure(|| async { boxp.post_json("/v1/sync/full").await })
        .await?;
    ok(&full_report)?;
    let missed_full = sent + received;
    drop(boxp);
    std::fs::remove_dir_all(&data_dir)?;
    copy_dir(&saved, &data_dir)?;
    boxp = BoxProc::spawn(&bins, &hub)?;
    boxp.wait_full_sync(Duration::from_secs(60)).await?;
    let (_, dsent, dreceived) = relay
        .measure(|| async { ok(&boxp.post_json("/v1/sync/delta").await?) })
        .await?;
    let missed_delta = dsent + dreceived;
    row(
        "full sync after a missed day",
        sent,
        received,
        Some(SEED_FULL),
        format!(
            "{:.2}x the delta of the same changes ({}, handshake included); methods {}",
            ratio(missed_full as f64, missed_delta as f64),
            bytes_h(missed_delta),
            storebox_sim::MODULES
                .iter()
                .map(|m| format!(
                    "{m} {}",
                    full_report["modules"][m]["method"].as_str().unwrap_or("?")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    // 6. A line cut: the next call reconnects with a resumed TLS session.
    relay.cut.send_modify(|n| *n += 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, sent, received) = relay
        .measure(|| async { ok(&boxp.post_json("/v1/sync/delta").await?) })
        .await?;
    let status = boxp.status().await?;
    anyhow::ensure!(
        status["wire"]["resumed_connections"].as_u64() >= Some(1),
        "the reconnection did not resume the TLS session: {}",
        status["wire"]
    );
    row(
        "poll after a line cut (reconnect)",
        sent,
        received,
        None,
        format!(
            "connections {}, of which resumed {}",
            status["wire"]["connections"], status["wire"]["resumed_connections"]
        ),
    );

    // 7. The cold full sync again, under a 1 Mbit/s download cap: the cap holds.
    drop(boxp);
    let aside = hub.dir.path().join("box-data-aside");
    std::fs::rename(&data_dir, &aside)?;
    // A cold box, but the same enrolled one: its identity (key, certificate) stays.
    copy_dir(&aside.join("identity"), &data_dir.join("identity"))?;
    let cap_file = dropins.join("61-cap.toml");
    std::fs::write(
        &cap_file,
        format!(
            "[hub]\nurl = \"https://{}\"\ndownload_cap = \"1Mbit/s\"\n",
            relay.addr
        ),
    )?;
    let started = std::time::Instant::now();
    let (capped, sent, received) = relay
        .measure(|| async {
            let boxp = BoxProc::spawn(&bins, &hub)?;
            boxp.wait_full_sync(Duration::from_secs(120)).await?;
            Ok(boxp)
        })
        .await?;
    let took = started.elapsed().as_secs_f64() - 0.15;
    drop(capped);
    std::fs::remove_file(&cap_file)?;
    std::fs::remove_dir_all(&data_dir)?;
    std::fs::rename(&aside, &data_dir)?;
    row(
        "cold full sync under a 1 Mbit/s download cap",
        sent,
        received,
        None,
        format!(
            "{took:.1} s: {:.2} Mbit/s on average, process start included",
            (sent + received) as f64 * 8.0 / took / 1e6
        ),
    );
    boxp = BoxProc::spawn(&bins, &hub)?;
    boxp.wait_full_sync(Duration::from_secs(60)).await?;

    // 8. A simulated 14-hour day.
    let day3 = storebox_sim::day_changes(&store, 1, 3);
    let mut slices: Vec<storebox_sim::DayChanges> = (0..POLLS)
        .map(|_| storebox_sim::DayChanges {
            upserts: Default::default(),
            deletes: Default::default(),
        })
        .collect();
    let mut i = 0;
    for (module, records) in &day3.upserts {
        for r in records {
            slices[i % POLLS]
                .upserts
                .entry(module.clone())
                .or_default()
                .push(r.clone());
            i += 7;
        }
    }
    for (module, ids) in &day3.deletes {
        for id in ids {
            slices[i % POLLS]
                .deletes
                .entry(module.clone())
                .or_default()
                .push(id.clone());
            i += 7;
        }
    }
    let (_, sent, received) = relay
        .measure(|| async {
            ok(&boxp.post_json("/v1/sync/full").await?)?;
            for slice in &slices {
                apply_changes(&hub, slice).await?;
                ok(&boxp.post_json("/v1/sync/delta").await?)?;
            }
            Ok(())
        })
        .await?;
    let day = sent + received;
    row(
        "simulated 14-hour day, sales excluded",
        sent,
        received,
        Some(SEED_DAY),
        format!("1 full sync, {POLLS} polls, the day's changes spread over them"),
    );

    let (a, b) = crate::core_bench::sale_template(&store, 1)?;
    let (_, sent, received) = relay
        .measure(|| async {
            for n in 0..SALES {
                let body = format!("{a}bw-sale-{n}{b}");
                let auth = crate::common::bench_auth();
                let (status, answer) = call(
                    boxp.lan,
                    Method::POST,
                    "/v1/activity",
                    &[
                        ("content-type", "application/json"),
                        ("authorization", &auth),
                    ],
                    Bytes::from(body),
                )
                .await?;
                anyhow::ensure!(status.is_success(), "posting a sale: {status} {answer}");
                // One push per sale, as at a till's pace (one sale every 25 s): the worst
                // case for the per-sale cost; a busier shop batches.
                crate::common::wait_for(
                    "the sale pushed",
                    &boxp.proc,
                    Duration::from_secs(10),
                    Duration::from_millis(2),
                    || async {
                        let doc = boxp.status().await.ok()?;
                        (doc["activity"]["pending"] == 0).then_some(())
                    },
                )
                .await?;
            }
            Ok(())
        })
        .await?;
    let per_sale = (sent + received) / SALES as u64;
    row(
        "bytes per uploaded sale",
        sent / SALES as u64,
        received / SALES as u64,
        None,
        format!(
            "each of {SALES} sales (~{} B of JSON) pushed alone",
            a.len() + b.len() + 12
        ),
    );

    let results = json!({
        "machine": machine_info(started_at),
        "source": source_info(),
        "baseline": {"raw_jsonl_bytes": raw.len(), "zstd19_bytes": zstd19},
        "scenarios": rows,
        "targets": {
            "cold_full_sync_vs_zstd19": {"value": ratio(cold as f64, zstd19 as f64), "max": 0.8},
            "full_after_missed_day_vs_delta": {"value": ratio(missed_full as f64, missed_delta as f64), "max": 2.0},
            "day_excluding_sales_bytes": {"value": day, "max": 100_000},
            "bytes_per_sale": per_sale,
        },
    });
    let mut table = format!(
        "# Bandwidth: bytes on the shop's link\n\n{}\n\nCounted by a relay between box and hub \
         (TLS and HTTP/2 included). Store: {} records, {} of JSON Lines; zstd -19 of it: {}.\n\n\
         | scenario | sent | received | total | seed | ratio to seed | note |\n|---|---:|---:|---:|---:|---:|---|\n",
        machine_line(&results["machine"]),
        store.modules.values().map(Vec::len).sum::<usize>(),
        bytes_h(raw.len() as u64),
        bytes_h(zstd19),
    );
    for r in results["scenarios"].as_array().into_iter().flatten() {
        let n = |v: &Value| v.as_u64().map(bytes_h).unwrap_or_else(|| "-".into());
        table += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r["scenario"].as_str().unwrap_or(""),
            n(&r["sent"]),
            n(&r["received"]),
            n(&r["total"]),
            n(&r["seed"]),
            r["ratio_to_seed"]
                .as_f64()
                .map(|x| format!("{x:.4}"))
                .unwrap_or_else(|| "-".into()),
            r["note"].as_str().unwrap_or(""),
        );
    }
    write_results("bandwidth", &results, &table)?;
    Ok(())
}
