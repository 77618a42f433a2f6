//! `cellstream serve` end to end: the real binary, a temporary spool, real PBMC cells.
//!
//! Every output is compared with `cellstream embed` on the same input (same seed): the
//! daemon must write exactly the records the one-shot command writes, whatever happens
//! to it in between.

use crate::common;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::daemon::*;

#[test]
fn dropped_batches_come_out_as_files_on_the_stream_and_in_metrics() {
    let batches = [("b1", 0..30), ("b2.csb", 30..70), ("b3.csb.zst", 70..95)];
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&batches);
    let root = tmp.path();

    write_config(root, "", "", "[pipeline]\nthreads = 2\n");
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    let mut ndjson = StreamClient::open(&daemon.addr, "application/x-ndjson");
    let mut sse = StreamClient::open(&daemon.addr, "text/event-stream");
    wait_for(Duration::from_secs(10), "two stream clients", || {
        daemon.metric("cellstream_stream_clients") == 2.0
    });
    for (name, _) in &batches {
        drop_batch(&d.incoming, &src.join(name), name);
    }

    // The NDJSON stream: each batch's cell records, then its summary.
    let mut streamed = HashMap::<String, String>::new();
    let mut summaries = Vec::new();
    while summaries.len() < batches.len() {
        let line = ndjson.next_line().expect("the stream goes on");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "batch" {
            summaries.push(v);
        } else {
            let text = streamed
                .entry(v["batch"].as_str().unwrap().into())
                .or_default();
            text.push_str(&line);
            text.push('\n');
        }
    }
    for (id, want) in &expected {
        let file = output(&d, id).unwrap_or_else(|| panic!("no output for {id}"));
        assert_eq!(&file, want, "{id}: the file differs from `embed`");
        assert_eq!(&streamed[id], want, "{id}: the stream differs from `embed`");
        for (i, line) in file.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["index"], i, "{id}: records in input order");
        }
    }
    for (s, (name, cells)) in summaries.iter().zip(&batches) {
        let id = cellstream::batch::batch_id_of(Path::new(name));
        assert_eq!(s["batch"], id.as_str());
        assert_eq!(s["cells"], cells.len());
        let labelled: u64 = s["labels"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(labelled, cells.len() as u64);
        assert!(s["timings"]["latency"].as_f64().unwrap() > 0.0);
        let on_disk: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.out.join(format!("{id}.summary.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(on_disk, *s);
    }

    // The same records as Server-Sent Events.
    let (mut cells, mut batches_seen) = (0, 0);
    while batches_seen < batches.len() {
        let line = sse.next_line().expect("the SSE stream goes on");
        match line.as_str() {
            "event: cell" => cells += 1,
            "event: batch" => batches_seen += 1,
            _ => {}
        }
    }
    assert_eq!(cells, 95);

    assert_eq!(daemon.metric("cellstream_cells_total"), 95.0);
    assert_eq!(
        daemon.metric("cellstream_batches_total{outcome=\"ok\"}"),
        3.0
    );
    assert_eq!(daemon.metric("cellstream_batch_latency_seconds_count"), 3.0);
    assert_eq!(
        daemon.metric("cellstream_stage_seconds_count{stage=\"infer\"}"),
        3.0
    );
    assert_eq!(names_in(&d.done), ["b1", "b2.csb", "b3.csb.zst"]);
    assert!(names_in(&d.incoming).is_empty() && names_in(&d.processing).is_empty());
}

/// A small deterministic generator for the kill schedule (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Every committed output is complete and equal to the reference; every dropped batch is in
/// exactly one spool folder; nothing failed.
fn check_spool_invariants(d: &Spooled, expected: &BTreeMap<String, String>, dropped: &[String]) {
    for name in names_in(&d.out) {
        if name.starts_with('.') {
            continue; // an uncommitted temporary of the killed run, removed at the next start
        }
        if let Some(id) = name.strip_suffix(".ndjson") {
            assert_eq!(
                output(d, id).as_ref(),
                Some(&expected[id]),
                "{id}: a committed output must be complete and equal to the clean run"
            );
        }
    }
    for name in dropped {
        let places = [&d.incoming, &d.processing, &d.done]
            .iter()
            .filter(|dir| dir.join(name).exists())
            .count();
        assert_eq!(places, 1, "{name} must be in exactly one spool folder");
    }
    assert!(names_in(&d.failed).is_empty(), "nothing may fail");
}

#[test]
fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let rounds: usize = env_or("CELLSTREAM_KILL_ROUNDS", 10);
    let seed: u64 = env_or("CELLSTREAM_KILL_SEED", 0x5eed);
    // Larger batches keep a release build busy long enough for most kills to land
    // mid-batch (tools/kill9.sh uses 35: all 700 pbmc68k cells).
    let cells: usize = env_or("CELLSTREAM_KILL_CELLS", 12).clamp(1, 35);
    let tmp = tempfile::tempdir().unwrap();
    let (root, d) = (tmp.path(), dirs(tmp.path()));
    let base = pbmc68k();
    let src = root.join("src");
    std::fs::create_dir(&src).unwrap();
    let names: Vec<String> = (0..20)
        .map(|i| match i % 3 {
            0 => format!("k{i:02}"),
            1 => format!("k{i:02}.csb"),
            _ => format!("k{i:02}.csb.zst"),
        })
        .collect();
    let inputs: Vec<PathBuf> = names.iter().map(|n| src.join(n)).collect();
    for (i, path) in inputs.iter().enumerate() {
        write_batch(&base.select(i * cells..(i + 1) * cells), path);
    }
    let expected = embed_reference(&inputs, root);
    write_config(root, "", "", "[pipeline]\nthreads = 2\n");

    let mut rng = Rng(seed | 1);
    let mut dropped: Vec<String> = Vec::new();
    let per_round = names.len().div_ceil(rounds.min(10));
    let mut mid_batch_kills = 0;
    for round in 0..rounds {
        let daemon = Daemon::start(root, &[]);
        for name in names.iter().skip(dropped.len()).take(per_round) {
            drop_batch(&d.incoming, &src.join(name), name);
            dropped.push(name.clone());
        }
        let after = Duration::from_millis(100 + rng.below(2400));
        std::thread::sleep(after);
        daemon.kill9();
        if !names_in(&d.processing).is_empty() {
            mid_batch_kills += 1;
        }
        eprintln!(
            "round {round}: killed after {after:?}; {} done, {} in processing",
            names_in(&d.done).len(),
            names_in(&d.processing).len()
        );
        check_spool_invariants(&d, &expected, &dropped);
    }
    for name in names.iter().skip(dropped.len()) {
        drop_batch(&d.incoming, &src.join(name), name);
        dropped.push(name.clone());
    }
    let mut daemon = Daemon::start(root, &[]);
    wait_for(Duration::from_secs(300), "every batch to be done", || {
        names_in(&d.done).len() == names.len()
    });
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(60)).unwrap().success());
    check_spool_invariants(&d, &expected, &dropped);
    for id in expected.keys() {
        assert!(output(&d, id).is_some(), "{id}: output missing");
    }
    let temporaries: Vec<String> = names_in(&d.out)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(temporaries.is_empty(), "left behind: {temporaries:?}");
    eprintln!("{mid_batch_kills} of {rounds} kills landed with a batch in processing/");
    assert!(
        mid_batch_kills > 0,
        "no kill landed during a batch: the test did not test the crash path"
    );
}

#[test]
fn a_malformed_batch_is_quarantined_while_the_next_is_processed() {
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&[("good.csb", 0..10)]);
    let root = tmp.path();
    let base = pbmc68k();
    let csb = std::fs::read(src.join("good.csb")).unwrap();
    std::fs::write(
        src.join("garbage.csb"),
        b"\x89\x00\x01 these bytes are no batch\xff",
    )
    .unwrap();
    std::fs::write(src.join("truncated.csb"), &csb[..csb.len() / 2]).unwrap();

    write_config(root, "", "", "[pipeline]\nthreads = 1\n");
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    drop_batch(&d.incoming, &src.join("garbage.csb"), "garbage.csb");
    drop_batch(&d.incoming, &src.join("truncated.csb"), "truncated.csb");
    // A symlink could point anywhere; the spool refuses it.
    std::os::unix::fs::symlink("/etc/passwd", d.incoming.join(".link.tmp")).unwrap();
    std::fs::rename(d.incoming.join(".link.tmp"), d.incoming.join("link.csb")).unwrap();
    // An MTX directory whose matrix is a FIFO: reading it must not block the daemon.
    let fifo_dir = src.join("fifo");
    write_mtx_dir(&base.select(0..3), &fifo_dir);
    std::fs::remove_file(fifo_dir.join("matrix.mtx")).unwrap();
    let c_path = std::ffi::CString::new(fifo_dir.join("matrix.mtx").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    std::fs::rename(&fifo_dir, d.incoming.join("fifo")).unwrap();
    drop_batch(&d.incoming, &src.join("good.csb"), "good.csb");

    wait_for(Duration::from_secs(60), "the good batch", || {
        output(&d, "good").is_some()
    });
    assert_eq!(output(&d, "good").unwrap(), expected["good"]);
    wait_for(Duration::from_secs(10), "four quarantined", || {
        names_in(&d.failed).len() == 8
    });
    for (name, stage, kind, says) in [
        (
            "garbage.csb",
            "read",
            "unknown_format",
            "not a readable batch",
        ),
        ("truncated.csb", "read", "corrupt", "truncated.csb"),
        ("link.csb", "claim", "not_a_batch", "symbolic link"),
        ("fifo", "read", "invalid", "not a regular file"),
    ] {
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.failed.join(format!("{name}.error.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(report["stage"], stage, "{name}: {report}");
        assert_eq!(report["kind"], kind, "{name}: {report}");
        let error = report["error"].as_str().unwrap();
        assert!(
            error.contains(name) && error.contains(says),
            "{name}: {error}"
        );
        assert!(
            d.failed.join(name).symlink_metadata().is_ok(),
            "{name} kept"
        );
    }
    assert_eq!(
        daemon.metric("cellstream_batches_total{outcome=\"failed\"}"),
        4.0
    );
    // Counted just after the output is committed.
    wait_for(Duration::from_secs(10), "the good batch counted", || {
        daemon.metric("cellstream_batches_total{outcome=\"ok\"}") == 1.0
    });
    assert_eq!(
        get(&daemon.addr, "/readyz").unwrap().0,
        200,
        "still serving"
    );
}

#[test]
fn uploads_are_capped_refused_when_the_queue_is_full_and_never_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, d) = (tmp.path(), dirs(tmp.path()));
    let base = pbmc68k();
    let src = root.join("up.csb");
    write_batch(&base.select(100..120), &src);
    let body = std::fs::read(&src).unwrap();
    let cap = 256 * 1024;
    assert!(body.len() < cap);
    write_config(
        root,
        "max_queued = 4",
        &format!("max_upload_bytes = {cap}\nmax_concurrent_uploads = 2"),
        "[pipeline]\nthreads = 2\n",
    );
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    let addr = daemon.addr.clone();
    let post = |query: &str, headers: &[(&str, &str)], body: &[u8]| {
        request(
            &addr,
            "POST",
            &format!("/v1/batches{query}"),
            headers,
            Some(body),
        )
        .unwrap()
    };

    let (status, reply) = post("?name=up1.csb", &[], &body);
    assert_eq!(status, 202, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["batch"], "up1");
    wait_for(Duration::from_secs(60), "the uploaded batch", || {
        output(&d, "up1").is_some_and(|o| o.lines().count() == 20)
    });

    let huge = (cap * 4).to_string();
    assert_eq!(post("", &[("Content-Length", &huge)], b"").0, 413);
    assert_eq!(post("?name=..%2Fescape.csb", &[], &body).0, 400);
    assert_eq!(post("?name=.hidden", &[], &body).0, 400);
    assert_eq!(post("?name=empty.csb", &[], b"").0, 400);
    assert_eq!(
        post_chunked(&addr, cap + 1),
        413,
        "a chunked body over the cap"
    );
    assert!(
        names_in(&d.incoming).is_empty(),
        "refused uploads leave nothing"
    );

    // A flood: 6 clients × 12 uploads while the daemon works. Some are refused with 429;
    // every accepted one is processed.
    let flood = |bodies: &[u8], per_client: usize, tag: &str| -> Vec<(String, u16)> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|t| {
                    let addr = &addr;
                    s.spawn(move || {
                        (0..per_client)
                            .map(|i| {
                                let name = format!("{tag}{t}-{i:02}.csb");
                                let path = format!("/v1/batches?name={name}");
                                let status = request(addr, "POST", &path, &[], Some(bodies))
                                    .map_or(0, |(s, _)| s);
                                (name, status)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    };
    let results = flood(&body, 12, "f");
    let accepted: Vec<&String> = results
        .iter()
        .filter(|(_, s)| *s == 202)
        .map(|(n, _)| n)
        .collect();
    let refused = results.iter().filter(|(_, s)| *s == 429).count();
    eprintln!(
        "flood: {} accepted, {refused} refused with 429",
        accepted.len()
    );
    assert!(!accepted.is_empty() && refused > 0, "{results:?}");
    assert_eq!(accepted.len() + refused, results.len(), "{results:?}");
    for name in &accepted {
        let id = name.trim_end_matches(".csb");
        wait_for(Duration::from_secs(120), "every accepted upload", || {
            output(&d, id).is_some_and(|o| o.lines().count() == 20)
        });
    }
    assert!(daemon.metric("cellstream_uploads_total{outcome=\"queue_full\"}") > 0.0);

    // Bodies stream to disk: 6 × 25 uploads of nearly the cap (~37 MiB in all) leave the
    // daemon's peak memory where it was. (The accepted ones are junk and get quarantined.)
    let rss_before = daemon.peak_rss();
    let junk = vec![0x5au8; cap - 1];
    let results = flood(&junk, 25, "j");
    assert!(
        results.iter().all(|(_, s)| [202, 429].contains(s)),
        "{results:?}"
    );
    wait_for(
        Duration::from_secs(60),
        "the junk to be quarantined",
        || names_in(&d.incoming).is_empty() && names_in(&d.processing).is_empty(),
    );
    let growth = daemon.peak_rss().saturating_sub(rss_before);
    eprintln!(
        "peak RSS {} MiB before {} MiB of uploads, grew {} KiB",
        rss_before >> 20,
        (junk.len() * results.len()) >> 20,
        growth >> 10
    );
    assert!(
        growth < 16 << 20,
        "memory grew {growth} bytes under the flood"
    );
}

/// POSTs `n` bytes with chunked transfer encoding; the status.
fn post_chunked(addr: &str, n: usize) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /v1/batches?name=chunked.csb HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'x'; 16 * 1024];
    let mut sent = 0;
    while sent < n {
        let len = chunk.len().min(n - sent);
        let wrote = write!(s, "{len:x}\r\n")
            .and_then(|_| s.write_all(&chunk[..len]))
            .and_then(|_| s.write_all(b"\r\n"));
        if wrote.is_err() {
            break; // the server already answered and closed
        }
        sent += len;
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn sigterm_during_a_batch_finishes_it_and_exits_0() {
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&[("long.csb", 0..400), ("next.csb", 400..410)]);
    let root = tmp.path();
    write_config(
        root,
        "",
        "",
        "[pipeline]\nthreads = 2\ndrain_seconds = 120\n",
    );
    let mut daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    drop_batch(&d.incoming, &src.join("long.csb"), "long.csb");
    wait_for(Duration::from_secs(10), "the claim", || {
        d.processing.join("long.csb").exists()
    });
    drop_batch(&d.incoming, &src.join("next.csb"), "next.csb");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        output(&d, "long").is_none(),
        "the batch must still be in flight"
    );
    let sent = Instant::now();
    daemon.signal("TERM");
    let status = daemon
        .wait_exit(Duration::from_secs(120))
        .expect("exit within the drain limit");
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    eprintln!("exited {:?} after SIGTERM", sent.elapsed());
    assert_eq!(output(&d, "long").as_ref(), Some(&expected["long"]));
    assert!(d.done.join("long.csb").exists());
    // The waiting batch was not started: it is still in the spool, and the next start
    // processes it.
    assert!(output(&d, "next").is_none());
    assert!(d.incoming.join("next.csb").exists() || d.processing.join("next.csb").exists());
    let _daemon = Daemon::start(root, &[]);
    wait_for(Duration::from_secs(60), "the waiting batch", || {
        output(&d, "next").is_some()
    });
    assert_eq!(output(&d, "next").unwrap(), expected["next"]);
}

#[test]
fn sigterm_while_the_model_loads_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    write_config(tmp.path(), "", "", "[pipeline]\nthreads = 1\n");
    let mut daemon = Daemon::start(tmp.path(), &[]);
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(60)).expect("an exit");
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
}

#[test]
fn systemd_notifications_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_config(root, "", "", "[pipeline]\nthreads = 1\n");
    let socket_path = root.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut daemon = Daemon::start(
        root,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let first = recv();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert_eq!(
        get(&daemon.addr, "/readyz").unwrap().0,
        200,
        "READY=1 only once /readyz says ready"
    );
    let start = Instant::now();
    for _ in 0..3 {
        assert_eq!(recv(), "WATCHDOG=1");
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "fed every half period"
    );
    daemon.signal("TERM");
    loop {
        let msg = recv();
        if msg.lines().any(|l| l == "STOPPING=1") {
            break;
        }
        assert_eq!(msg, "WATCHDOG=1");
    }
    assert!(daemon.wait_exit(Duration::from_secs(30)).unwrap().success());
}

/// Drops `cells` of pbmc68k as one batch into a daemon with a `watchdog_usec` watchdog and
/// `pipeline` settings; returns the times WATCHDOG=1 arrived until the batch was committed
/// (and fed again), and the daemon's log.
fn watchdog_feeds(cells: usize, pipeline: &str, watchdog_usec: &str) -> (Vec<Duration>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let (root, d) = (tmp.path(), dirs(tmp.path()));
    let src = root.join("slow.csb");
    write_batch(&pbmc68k().select(0..cells), &src);
    write_config(
        root,
        "",
        "",
        &format!("[pipeline]\nthreads = 1\n{pipeline}\n"),
    );
    let socket_path = root.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let daemon = Daemon::start(
        root,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", watchdog_usec),
        ],
    );
    daemon.wait_ready();
    drop_batch(&d.incoming, &src, "slow.csb");
    let mut feeds = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while start.elapsed() < Duration::from_secs(120) {
        if let Ok(n) = socket.recv(&mut buf) {
            if &buf[..n] == b"WATCHDOG=1" {
                feeds.push(start.elapsed());
            }
        }
        if output(&d, "slow").is_some()
            && feeds
                .last()
                .is_some_and(|t| start.elapsed() - *t < Duration::from_millis(200))
        {
            break;
        }
    }
    assert!(output(&d, "slow").is_some(), "the batch completes");
    (feeds, daemon.log_text())
}

fn longest_gap(feeds: &[Duration]) -> Duration {
    let gap = feeds.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    eprintln!("{} feeds; longest gap {gap:?}", feeds.len());
    gap
}

#[test]
fn the_watchdog_is_not_fed_while_a_stage_makes_no_progress() {
    // A token budget that puts all 120 cells into one model batch (about a second in a
    // debug build): the batch stage is busy without progress for longer than the 100 ms
    // period. Feeding must pause, as it would for a truly stuck pipeline, and resume once
    // the batch is committed.
    let (feeds, log) = watchdog_feeds(120, "token_budget = 65536", "100000");
    assert!(
        longest_gap(&feeds) > Duration::from_millis(300),
        "feeding paused while a model batch ran longer than the period"
    );
    assert!(log.contains("made no progress"), "and the log says so");
}

#[test]
fn the_watchdog_is_fed_through_a_large_batch_that_makes_progress() {
    // 600 cells in small model batches take seconds, each model batch milliseconds: the
    // stage progresses all along, so feeding never pauses (it once did, until the end of
    // the batch's submission, which for a large enough batch would get a healthy daemon
    // killed by systemd).
    let (feeds, log) = watchdog_feeds(600, "", "300000");
    assert!(feeds.last().unwrap().as_secs_f64() > 1.0, "{feeds:?}");
    assert!(
        longest_gap(&feeds) < Duration::from_millis(290),
        "fed every half period"
    );
    assert!(!log.contains("made no progress"), "{log}");
}

#[test]
fn sighup_reloads_the_config_and_a_bad_one_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_config(root, "", "", "[pipeline]\nthreads = 1\n");
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    // Idle means idle: no rescan loop woken by its own scans, no spinning threads.
    let before = daemon.cpu_seconds();
    std::thread::sleep(Duration::from_secs(2));
    let idle = daemon.cpu_seconds() - before;
    assert!(idle < 0.2, "an idle daemon used {idle} s of CPU in 2 s");
    write_config(root, "max_queued = 7", "", "[pipeline]\nthreads = 2\n");
    daemon.signal("HUP");
    wait_for(Duration::from_secs(10), "the reload", || {
        daemon.log_text().contains("SIGHUP: reloaded")
    });
    assert!(daemon
        .log_text()
        .contains("pipeline.threads changed but take effect only at a restart"));
    std::fs::write(root.join("cellstream.toml"), "[spool]\nnot = 'valid'\n").unwrap();
    daemon.signal("HUP");
    wait_for(Duration::from_secs(10), "the refusal", || {
        daemon.log_text().contains("config not reloaded")
    });
    assert_eq!(get(&daemon.addr, "/readyz").unwrap().0, 200);
    assert_eq!(get(&daemon.addr, "/healthz").unwrap().0, 200);
}

#[test]
fn a_bad_config_is_exit_2_naming_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write_config(tmp.path(), "", "listne = 1", "");
    let out = common::cellstream(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(
        err.contains("cellstream.toml") && err.contains("listne"),
        "{err}"
    );
    let out = common::cellstream(&["serve", "--config", "/nonexistent/cellstream.toml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let Ok(probe) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIPPED: systemd-analyze is not installed (.ci/run installs it)");
        return;
    };
    assert!(probe.status.success());
    let tmp = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(common::repo().join("systemd/cellstream.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/cellstream serve"));
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = unit.replace(
        "/usr/local/bin/cellstream",
        env!("CARGO_BIN_EXE_cellstream"),
    );
    let path = tmp.path().join("cellstream.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = common::stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("cellstream.service"), "warnings: {err}");

    // The hardening, as systemd rates it (exposure 0 = locked down, 10 = none).
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for cellstream.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}{}", common::stderr(&out)));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");
}

#[test]
fn a_token_guards_every_endpoint_but_healthz() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let token = "s3cret-token-0123456789";
    std::fs::write(root.join("token"), format!("{token}\n")).unwrap();
    write_config(
        root,
        "",
        &format!("token_file = {:?}", root.join("token")),
        "[pipeline]\nthreads = 1\n",
    );
    let daemon = Daemon::start(root, &[]);
    let bearer = format!("Bearer {token}");
    let with = [("Authorization", bearer.as_str())];
    let wrong = [("Authorization", "Bearer s3cret-token-0123456780")];
    let status = |method: &str, path: &str, headers: &[(&str, &str)]| {
        let body = (method == "POST").then_some(&b"x"[..]);
        request(&daemon.addr, method, path, headers, body)
            .unwrap()
            .0
    };
    wait_for(Duration::from_secs(60), "ready", || {
        status("GET", "/readyz", &with) == 200
    });
    assert_eq!(status("GET", "/healthz", &[]), 200);
    for (method, path) in [
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/v1/stream"),
        ("POST", "/v1/batches?name=x.csb"),
    ] {
        assert_eq!(status(method, path, &[]), 401, "{method} {path}");
        assert_eq!(status(method, path, &wrong), 401, "{method} {path}");
    }
    assert_eq!(status("GET", "/metrics", &with), 200);
    assert!(names_in(&dirs(root).incoming).is_empty());
    // A token file that is too short is a config error (exit 2), not an open door.
    std::fs::write(root.join("token"), "short").unwrap();
    let out = common::cellstream(&[
        "serve",
        "--config",
        root.join("cellstream.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    assert!(common::stderr(&out).contains("token_file"));
}
