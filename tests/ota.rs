//! Firmware updates on the host: real RAUC bundles (built and signed here with `rauc bundle`
//! and `openssl`), sent to a running box by `storebox ota install`, checked by `storebox ota
//! apply`. The host has no A/B slots and no device-mapper, so the install itself and the
//! reboots are tested in the emulated image (`board/qemu-aarch64-virt/boot-test.sh`); here
//! every refusal, the resumed upload and the safe moment before a reboot.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;

const COMPATIBLE: &str = "storebox-test-board";
const RUNNING: &str = "1.4.0";

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (is it installed? .ci/run installs rauc, squashfs-tools and openssl)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a code-signing certificate it issued.
struct Signer {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn signer(dir: &Path, name: &str) -> Signer {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem"))
        .args([
            "-days",
            "30",
            "-subj",
            &format!("/CN={name} CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]));
    run(Command::new("openssl")
        .args(["req", "-newkey", "rsa:2048", "-nodes"])
        .arg("-keyout")
        .arg(p("signer.key"))
        .arg("-out")
        .arg(p("signer.csr"))
        .args(["-subj", &format!("/CN={name} signer")]));
    std::fs::write(
        p("ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=codeSigning\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "30"])
        .arg("-in")
        .arg(p("signer.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-CAcreateserial")
        .arg("-out")
        .arg(p("signer.pem"))
        .arg("-extfile")
        .arg(p("ext")));
    Signer {
        ca: p("ca.pem"),
        cert: p("signer.pem"),
        key: p("signer.key"),
    }
}

/// A verity bundle of a small image, as `scripts/ota-bundle.sh` makes them for a board.
fn bundle(dir: &Path, name: &str, signer: &Signer, compatible: &str, version: &str) -> PathBuf {
    let content = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&content).unwrap();
    // Incompressible, so the bundle is as large as the image.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let image: Vec<u8> = (0..512 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(content.join("rootfs.ext4"), image).unwrap();
    std::fs::write(
        content.join("manifest.raucm"),
        format!("[update]\ncompatible={compatible}\nversion={version}\n\n[bundle]\nformat=verity\n\n[image.rootfs]\nfilename=rootfs.ext4\n"),
    )
    .unwrap();
    let out = dir.join(format!("{name}.raucb"));
    run(Command::new("rauc")
        .arg("bundle")
        .arg("--cert")
        .arg(&signer.cert)
        .arg("--key")
        .arg(&signer.key)
        .arg(&content)
        .arg(&out));
    out
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    hub: Hub,
    sb: StoreBox,
    good: PathBuf,
    trusted: Signer,
}

async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let trusted = signer(&dir, "retailer");
    std::fs::write(
        dir.join("system.conf"),
        format!(
            "[system]\ncompatible={COMPATIBLE}\nbootloader=noop\n\n[keyring]\npath={}\ncheck-purpose=codesign\n\n[slot.rootfs.0]\ndevice=/dev/null\ntype=raw\nbootname=A\n",
            trusted.ca.display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("image-version"), format!("{RUNNING}\n")).unwrap();
    let good = bundle(&dir, "good", &trusted, COMPATIBLE, "1.5.0");
    let hub = Hub::start(&["shop-ota"]).await;
    let dropin = format!(
        "[ota]\nenabled = false\nversion_file = \"{}\"\nrauc_conf = \"{}\"\n",
        dir.join("image-version").display(),
        dir.join("system.conf").display()
    );
    let sb = StoreBox::start(&hub, "shop-ota", &dropin).await;
    Setup {
        _dir: tmp,
        dir,
        hub,
        sb,
        good,
        trusted,
    }
}

impl Setup {
    /// `storebox ota install FILE --no-wait`, then the root oneshot's `storebox ota apply`:
    /// returns whether apply succeeded and what both printed.
    fn install(&self, bundle: &Path, extra: &[&str]) -> (bool, String) {
        let mut args = vec!["ota", "install", bundle.to_str().unwrap(), "--no-wait"];
        args.extend_from_slice(extra);
        let (ok, out) = self.sb.cli(&args);
        assert!(ok, "queueing the install failed: {out}");
        let (ok, applied) = self.sb.cli(&["ota", "apply", "--no-reboot"]);
        (ok, format!("{out}\n{applied}"))
    }

    async fn ota(&self) -> Value {
        let (status, doc) = self.sb.get("/v1/ota").await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        doc
    }

    /// Checks that an install was refused for `why`, and that nothing was left behind.
    async fn refused(&self, bundle: &Path, extra: &[&str], why: &str) {
        let (ok, out) = self.install(bundle, extra);
        assert!(!ok, "{} was installed: {out}", bundle.display());
        assert!(out.contains(why), "expected {why:?} in: {out}");
        let doc = self.ota().await;
        assert_eq!(doc["phase"], "idle", "{doc}");
        assert_eq!(doc["last"]["event"], "failed", "{doc}");
        assert!(
            doc["last"]["reason"].as_str().unwrap().contains(why),
            "{doc}"
        );
        assert!(
            doc["incoming"].is_null(),
            "the refused bundle stayed: {doc}"
        );
        assert_eq!(doc["running"], RUNNING);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_that_must_not_run_are_refused_with_their_reason() {
    let s = setup().await;
    // A good bundle passes every check; on this host it then stops at the slot, which a
    // machine without A/B slots does not have.
    let (ok, out) = s.sb.cli(&["ota", "check", s.good.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("version 1.5.0") && out.contains("installable"),
        "{out}"
    );
    let (ok, out) = s.install(&s.good, &[]);
    assert!(!ok && out.contains("booted slot is unknown"), "{out}");

    // Not a bundle at all.
    let junk = s.dir.join("junk.raucb");
    std::fs::write(&junk, vec![0x5au8; 4096]).unwrap();
    s.refused(&junk, &[], "the bundle does not check").await;
    // Signed by a CA the box does not trust.
    let other = signer(&s.dir, "stranger");
    let foreign = bundle(&s.dir, "foreign", &other, COMPATIBLE, "1.5.0");
    s.refused(&foreign, &[], "signature verification failed")
        .await;
    // A truncated bundle, delivered whole.
    let bytes = std::fs::read(&s.good).unwrap();
    let cut = s.dir.join("cut.raucb");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    s.refused(&cut, &[], "the bundle does not check").await;
    // For another board.
    let wrong = bundle(&s.dir, "wrong", &s.trusted, "storebox-other-board", "1.5.0");
    s.refused(&wrong, &[], "this box is \"storebox-test-board\"")
        .await;
    // Older than the running version, or the same: only when forced.
    let older = bundle(&s.dir, "older", &s.trusted, COMPATIBLE, "1.3.9");
    s.refused(&older, &[], "not newer than the running 1.4.0")
        .await;
    let (ok, out) = s.install(&older, &["--force-downgrade"]);
    assert!(
        !ok && out.contains("booted slot is unknown"),
        "forced: {out}"
    );
    let (ok, out) =
        s.sb.cli(&["ota", "check", older.to_str().unwrap(), "--force-downgrade"]);
    assert!(ok, "{out}");

    // The refusals are in the status document and the CLI's view, newest first.
    let doc = s.sb.status().await;
    let events = doc["ota"]["events"].as_array().unwrap();
    assert!(events.len() >= 6, "{doc}");
    let (ok, out) = s.sb.cli(&["ota", "status"]);
    assert!(
        ok && out.contains("running 1.4.0") && out.contains("failed"),
        "{out}"
    );
    drop(s.hub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upload_resumes_and_a_short_one_is_not_installed() {
    let s = setup().await;
    let bytes = std::fs::read(&s.good).unwrap();
    let total = bytes.len();
    let name = s.good.file_name().unwrap().to_str().unwrap().to_owned();
    // The first 100 KiB arrive, then the line is cut.
    let first = 100 * 1024;
    let range = format!("bytes 0-{}/{total}", first - 1);
    let (status, doc) = call(
        s.sb.lan,
        Method::PUT,
        "/v1/ota/bundle",
        &[("content-range", &range), ("x-bundle-name", &name)],
        bytes[..first].to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["received"], first);
    // An incomplete bundle is never handed to the installer.
    let (status, doc) = s.sb.post("/v1/ota/install", "{}").await;
    assert_eq!(status, StatusCode::CONFLICT, "{doc}");
    assert!(
        doc["message"].as_str().unwrap().contains("incomplete"),
        "{doc}"
    );
    // A chunk that does not follow is told where to resume.
    let range = format!("bytes {}-{}/{total}", first + 10, first + 19);
    let (status, doc) = call(
        s.sb.lan,
        Method::PUT,
        "/v1/ota/bundle",
        &[("content-range", &range), ("x-bundle-name", &name)],
        bytes[first + 10..first + 20].to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{doc}");
    assert_eq!(doc["received"], first);
    // The CLI resumes from there and the bundle on the box is the file, byte for byte.
    let (ok, out) =
        s.sb.cli(&["ota", "install", s.good.to_str().unwrap(), "--no-wait"]);
    assert!(ok, "{out}");
    assert!(out.contains("resuming the upload"), "{out}");
    let data_dir = box_data_dir(&s.sb.config);
    assert_eq!(
        std::fs::read(data_dir.join("ota/incoming.raucb")).unwrap(),
        bytes
    );
    assert!(data_dir.join("ota/apply.request").is_file());
    // A bundle larger than the free space is refused before a byte is written.
    s.sb.cli(&["ota", "apply", "--no-reboot"]);
    let huge = format!("bytes 0-9/{}", u64::MAX / 4);
    let (status, doc) = call(
        s.sb.lan,
        Method::PUT,
        "/v1/ota/bundle",
        &[("content-range", &huge)],
        vec![0u8; 10],
    )
    .await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{doc}");
    assert!(
        doc["message"]
            .as_str()
            .unwrap()
            .contains("not enough space"),
        "{doc}"
    );
    assert!(!data_dir.join("ota/incoming.raucb").exists());
    // A till may not upload firmware: the route needs a technician.
    let till = pair_cli(&s.sb.config, "till-ota", false);
    let auth = format!("Bearer {till}");
    let (status, _) = call(
        s.sb.lan,
        Method::GET,
        "/v1/ota",
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_a_reboot_sales_are_committed_pushed_and_new_ones_turned_away() {
    let s = setup().await;
    s.sb.wait_full_sync(&["catalog"]).await;
    for i in 0..5 {
        let sale = json!({"id": format!("ota-sale-{i}"), "type": "sale", "total_cents": 100 + i});
        let (status, doc) = s.sb.post("/v1/activity", sale.to_string()).await;
        assert_eq!(status, StatusCode::CREATED, "{doc}");
    }
    let started = std::time::Instant::now();
    let (status, doc) = s.sb.post("/v1/ota/quiesce", "").await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    // It waited for the tills to be quiet for a few seconds.
    assert!(started.elapsed() >= Duration::from_secs(4), "{doc}");
    assert_eq!(doc["pending"], 0, "{doc}");
    assert_eq!(doc["mark_saved"], true, "{doc}");
    let at_hub = s.hub.activity("shop-ota").await;
    for i in 0..5 {
        let id = format!("ota-sale-{i}");
        assert_eq!(
            at_hub.iter().filter(|e| e["id"] == id.as_str()).count(),
            1,
            "{id}"
        );
    }
    // A sale posted now is turned away with a time to try again, not lost in a reboot.
    let (status, doc) = call(
        s.sb.lan,
        Method::POST,
        "/v1/activity",
        &[],
        json!({"id": "ota-late", "type": "sale"}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{doc}");
    assert_eq!(doc["error"], "restarting", "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_update_is_downloaded_resumed_after_a_cut_checked_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let trusted = signer(dir, "retailer");
    std::fs::write(
        dir.join("system.conf"),
        format!(
            "[system]\ncompatible={COMPATIBLE}\nbootloader=noop\n\n[keyring]\npath={}\ncheck-purpose=codesign\n\n[slot.rootfs.0]\ndevice=/dev/null\ntype=raw\nbootname=A\n",
            trusted.ca.display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("image-version"), format!("{RUNNING}\n")).unwrap();
    let good = bundle(dir, "good", &trusted, COMPATIBLE, "1.5.0");
    let bytes = std::fs::read(&good).unwrap();
    let total = bytes.len() as u64;
    let hub = Hub::start(&["shop-hubota"]).await;
    let (status, doc) = hub
        .admin(Method::PUT, "/admin/v1/ota/bundles/1.5.0", bytes.clone())
        .await;
    assert!(status.is_success(), "{doc}");
    let (status, doc) = hub
        .admin(
            Method::PUT,
            "/admin/v1/stores/shop-hubota/ota",
            json!({"version": "1.5.0"}).to_string(),
        )
        .await;
    assert!(status.is_success(), "{doc}");
    // Paced to about 4 s for the whole bundle, so the box can be stopped in the middle.
    let dropin = format!(
        "[ota]\ncheck_interval = \"1s\"\nwindow = \"always\"\ndownload_cap = \"1Mbit/s\"\n\
         version_file = \"{}\"\nrauc_conf = \"{}\"\n",
        dir.join("image-version").display(),
        dir.join("system.conf").display()
    );
    let mut sb = StoreBox::start(&hub, "shop-hubota", &dropin).await;
    let data_dir = box_data_dir(&sb.config);
    let partial = data_dir.join("ota/incoming.raucb");
    wait_for("the download to start", Duration::from_secs(60), || async {
        let n = std::fs::metadata(&partial).map_or(0, |m| m.len());
        (n > 0 && n < total).then_some(())
    })
    .await;
    // The line is cut (the box stops) in the middle of the download.
    sb.proc.take().unwrap().kill();
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 0 && kept < total, "{kept} of {total}");
    sb.restart().await;
    wait_for("the install request", Duration::from_secs(60), || async {
        data_dir.join("ota/apply.request").is_file().then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read(&partial).unwrap(),
        bytes,
        "the bundle differs"
    );
    // After the restart the box fetched only the rest.
    let doc = sb.status().await;
    let fetched = doc["bytes"]["ota"]["received"].as_u64().unwrap();
    assert!(
        fetched <= total - kept + 16 * 1024,
        "fetched {fetched} after keeping {kept} of {total}"
    );
    // The hub sees the download; the install, refused on this slotless host, is reported
    // with its reason and the version is not taken again.
    wait_for("the Downloaded report", Duration::from_secs(30), || async {
        let (_, v) = hub
            .admin(Method::GET, "/admin/v1/stores/shop-hubota/ota", "")
            .await;
        (v["last_report"]["event"] == "downloaded").then_some(())
    })
    .await;
    let (ok, out) = sb.cli(&["ota", "apply", "--no-reboot"]);
    assert!(!ok && out.contains("booted slot is unknown"), "{out}");
    let report = wait_for("the Failed report", Duration::from_secs(30), || async {
        let (_, v) = hub
            .admin(Method::GET, "/admin/v1/stores/shop-hubota/ota", "")
            .await;
        (v["last_report"]["event"] == "failed").then_some(v)
    })
    .await;
    assert!(
        report["last_report"]["reason"]
            .as_str()
            .unwrap()
            .contains("booted slot is unknown"),
        "{report}"
    );
    assert_eq!(report["running"], RUNNING, "{report}");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let doc = sb.get("/v1/ota").await.1;
    assert_eq!(doc["phase"], "idle", "{doc}");
    assert_eq!(doc["refused"], json!(["1.5.0"]), "{doc}");
    assert!(
        !partial.exists(),
        "the refused version was downloaded again"
    );
}
