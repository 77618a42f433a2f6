//! `cellstream serve` when the world misbehaves: a full disk, a read-only output folder, a
//! model file swapped underneath it, the wall clock jumping, batches that vanish or grow
//! after their claim. In every case the daemon reports, keeps or retries the batch, and
//! never loses or half-writes a record: each output that appears equals what
//! `cellstream embed` writes for the same input.

use crate::common;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::daemon::*;

fn error_report(d: &Spooled, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(d.failed.join(format!("{name}.error.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn set_mode(dir: &Path, mode: u32) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A commit that cannot happen: `name` (cells `cells` of pbmc68k) is dropped into a daemon
/// started under `confine` once `fault` has run; the output must never appear, partly or
/// wholly, the input must wait in the spool (not in failed/), the retries are counted and the
/// log `says` why. After `heal`, the retry commits exactly what `embed` writes.
fn a_commit_that_fails_is_retried_until_healed(
    name: &str,
    cells: std::ops::Range<usize>,
    confine: Confinement,
    fault: impl FnOnce(&Spooled),
    says: &str,
    heal: impl FnOnce(&Daemon, &Spooled),
) {
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&[(name, cells)]);
    let root = tmp.path();
    let id = name.trim_end_matches(".csb");
    write_config(root, "", "", "[pipeline]\nthreads = 2\n");
    let daemon = Daemon::start_with(root, &[], confine);
    daemon.wait_ready();
    fault(&d);
    drop_batch(&d.incoming, &src.join(name), name);
    wait_for(Duration::from_secs(60), "a failed commit", || {
        daemon.metric("cellstream_batches_total{outcome=\"retried\"}") >= 2.0
    });
    assert!(
        output(&d, id).is_none(),
        "no partial output is ever visible"
    );
    assert!(names_in(&d.out).is_empty(), "{:?}", names_in(&d.out));
    assert!(
        names_in(&d.failed).is_empty(),
        "a commit that cannot happen is not the input's fault"
    );
    assert!(d.incoming.join(name).exists() || d.processing.join(name).exists());
    assert!(daemon.log_text().contains(says), "the log says why");

    heal(&daemon, &d);
    wait_for(Duration::from_secs(60), "the retried batch", || {
        output(&d, id).is_some()
    });
    assert_eq!(output(&d, id).unwrap(), expected[id]);
    // The input is archived just after its output is committed.
    wait_for(Duration::from_secs(10), "the archived input", || {
        d.done.join(name).exists()
    });
}

#[test]
fn a_full_disk_keeps_the_batch_and_retries_until_it_fits() {
    // Files over 4 KiB cannot be written: the output (tens of KiB) hits "disk full".
    a_commit_that_fails_is_retried_until_healed(
        "full.csb",
        200..230,
        Confinement::MaxFileBytes(4096),
        |_| {},
        "File too large",
        |daemon, _| daemon.lift_file_size_limit(),
    );
}

#[test]
fn a_read_only_output_folder_keeps_the_batch_and_retries_until_it_is_writable() {
    // Run as root, the daemon would write through mode 0555: drop what overrides it.
    a_commit_that_fails_is_retried_until_healed(
        "ro.csb",
        230..250,
        Confinement::PermissionsApply,
        |d| set_mode(&d.out, 0o555),
        "Permission denied",
        |_, d| set_mode(&d.out, 0o755),
    );
}

#[test]
fn replacing_the_model_while_running_changes_nothing_until_a_restart_refuses_it() {
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&[("m.csb", 300..310)]);
    let root = tmp.path();
    let model = root.join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(common::repo().join("models/pbmc-compact")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
    }
    write_config(
        root,
        "",
        "",
        &format!("[model]\ndir = {model:?}\n[pipeline]\nthreads = 1\n"),
    );
    let mut daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    // A deployer swaps in a broken file (write + rename, as package managers do).
    std::fs::write(model.join(".model.onnx.new"), b"not a model").unwrap();
    std::fs::rename(model.join(".model.onnx.new"), model.join("model.onnx")).unwrap();
    drop_batch(&d.incoming, &src.join("m.csb"), "m.csb");
    wait_for(Duration::from_secs(60), "the batch", || {
        output(&d, "m").is_some()
    });
    assert_eq!(
        output(&d, "m").unwrap(),
        expected["m"],
        "the loaded model serves on"
    );
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(30)).unwrap().success());
    // At the next start the package is checked again and refused with a reason.
    let out = common::cellstream(&[
        "serve",
        "--config",
        root.join("cellstream.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("model.onnx"),
        "{}",
        common::stderr(&out)
    );
}

/// libfaketime, which shifts what the daemon reads from the wall clock (CLOCK_REALTIME)
/// by an offset re-read from a file, while the monotonic clock runs on.
fn libfaketime() -> PathBuf {
    let found = ["x86_64-linux-gnu", "aarch64-linux-gnu", ""]
        .iter()
        .map(|arch| {
            Path::new("/usr/lib")
                .join(arch)
                .join("faketime/libfaketime.so.1")
        })
        .find(|p| p.exists());
    found.expect("libfaketime (Debian: apt-get install faketime; .ci/run installs it)")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn the_wall_clock_jumping_changes_no_record_and_no_latency() {
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&[
        ("before", 0..10),
        ("during.csb", 10..400),
        ("after.csb", 400..410),
    ]);
    let root = tmp.path();
    write_config(root, "", "", "[pipeline]\nthreads = 2\n");
    let offset = root.join("clock-offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let lib = libfaketime();
    let daemon = Daemon::start(
        root,
        &[
            ("LD_PRELOAD", lib.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    daemon.wait_ready();
    let junk = root.join("junk.csb");
    std::fs::write(&junk, b"\x00\x01 not a batch").unwrap();

    drop_batch(&d.incoming, &src.join("before"), "before");
    wait_for(Duration::from_secs(60), "the first batch", || {
        output(&d, "before").is_some()
    });
    // NTP steps the clock back 400 days while a batch is in flight.
    drop_batch(&d.incoming, &src.join("during.csb"), "during.csb");
    wait_for(Duration::from_secs(10), "the claim", || {
        d.processing.join("during.csb").exists()
    });
    std::fs::write(&offset, "-400d\n").unwrap();
    drop_batch(&d.incoming, &junk, "junk-back.csb");
    wait_for(Duration::from_secs(60), "the batch in flight", || {
        output(&d, "during").is_some() && d.failed.join("junk-back.csb").exists()
    });
    // Then forward ten years.
    std::fs::write(&offset, "+3650d\n").unwrap();
    drop_batch(&d.incoming, &src.join("after.csb"), "after.csb");
    drop_batch(&d.incoming, &junk, "junk-forward.csb");
    wait_for(Duration::from_secs(60), "the last batches", || {
        output(&d, "after").is_some() && d.failed.join("junk-forward.csb").exists()
    });

    wait_for(Duration::from_secs(10), "the summaries", || {
        ["before", "during", "after"]
            .iter()
            .all(|id| d.out.join(format!("{id}.summary.json")).exists())
    });
    for id in ["before", "during", "after"] {
        assert_eq!(output(&d, id).unwrap(), expected[id], "{id}");
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.out.join(format!("{id}.summary.json"))).unwrap(),
        )
        .unwrap();
        let latency = summary["timings"]["latency"].as_f64().unwrap();
        assert!(
            (0.0..120.0).contains(&latency),
            "{id}: latency {latency} s is measured on the monotonic clock"
        );
    }
    // Error reports carry the wall-clock time as the machine sees it.
    let day = 86_400.0;
    for (name, shift) in [
        ("junk-back.csb", -400.0 * day),
        ("junk-forward.csb", 3650.0 * day),
    ] {
        let at = error_report(&d, name)["failed_at"].as_f64().unwrap();
        assert!(
            (at - (unix_now() + shift)).abs() < day,
            "{name}: failed_at {at}"
        );
    }
    wait_for(Duration::from_secs(10), "the metrics", || {
        daemon.metric("cellstream_batches_total{outcome=\"ok\"}") == 3.0
    });
    assert_eq!(get(&daemon.addr, "/readyz").unwrap().0, 200);
}

#[test]
fn batches_that_vanish_or_grow_after_their_claim_are_reported_and_serving_goes_on() {
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&[
        ("long1.csb", 0..300),
        ("vanishes.csb", 300..310),
        ("long2.csb", 310..610),
        ("grows.csb", 610..620),
        ("good.csb", 620..630),
    ]);
    let root = tmp.path();
    write_config(root, "", "", "[pipeline]\nthreads = 1\n");
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    // While a long batch is in the model, the next one is claimed (in processing/) and
    // waits for the batch thread: that is when another program meddles with it.
    let claimed_behind = |long: &str, next: &str| {
        drop_batch(&d.incoming, &src.join(long), long);
        wait_for(Duration::from_secs(10), "the long batch's claim", || {
            d.processing.join(long).exists()
        });
        drop_batch(&d.incoming, &src.join(next), next);
        wait_for(Duration::from_secs(10), "the claim behind it", || {
            d.processing.join(next).exists()
        });
        let long_id = long.trim_end_matches(".csb");
        assert!(
            output(&d, long_id).is_none(),
            "{long} must still be in the model"
        );
        d.processing.join(next)
    };

    let vanishing = claimed_behind("long1.csb", "vanishes.csb");
    std::fs::remove_file(&vanishing).unwrap();
    wait_for(
        Duration::from_secs(60),
        "the vanished batch's report",
        || d.failed.join("vanishes.csb.error.json").exists(),
    );
    let report = error_report(&d, "vanishes.csb");
    assert_eq!(report["kind"], "vanished", "{report}");
    assert!(report["error"].as_str().unwrap().contains("vanishes.csb"));

    let growing = claimed_behind("long2.csb", "grows.csb");
    // A producer that never learnt the protocol goes on writing into the file.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&growing)
        .unwrap();
    f.write_all(&[0x5a; 4096]).unwrap();
    drop(f);
    wait_for(Duration::from_secs(60), "the grown batch's report", || {
        d.failed.join("grows.csb.error.json").exists()
    });
    let report = error_report(&d, "grows.csb");
    assert_eq!(
        (&report["stage"], &report["kind"]),
        (&"read".into(), &"corrupt".into()),
        "{report}"
    );
    assert!(report["error"].as_str().unwrap().contains("grows.csb"));
    // The report is written first, then the input moves beside it.
    wait_for(
        Duration::from_secs(10),
        "the grown batch in failed/",
        || d.failed.join("grows.csb").exists(),
    );

    drop_batch(&d.incoming, &src.join("good.csb"), "good.csb");
    wait_for(Duration::from_secs(60), "the good batch", || {
        output(&d, "good").is_some()
    });
    for id in ["long1", "long2", "good"] {
        assert_eq!(output(&d, id).unwrap(), expected[id], "{id}");
    }
    wait_for(Duration::from_secs(10), "processing/ to empty", || {
        names_in(&d.processing).is_empty()
    });
    assert_eq!(
        daemon.metric("cellstream_batches_total{outcome=\"failed\"}"),
        2.0
    );
    assert_eq!(get(&daemon.addr, "/readyz").unwrap().0, 200);
}
