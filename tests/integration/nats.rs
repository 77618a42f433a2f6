//! `cellstream serve` with `[nats]` and `cellstream submit`, against a real `nats-server`
//! (Debian's 2.9; `.ci/run` installs it) started on a free loopback port with a temporary
//! store. Without `nats-server` on the PATH these tests say so and pass.
//!
//! Every result is read back from the results stream and held to what `cellstream embed`
//! writes for the same input: each cell record once, in input order, the batch's summary
//! last on its subject, whatever happened to the daemons or the server in between.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cellstream::config::NatsConfig;
use cellstream::nats::{Link, RESULTS_PREFIX};

use crate::common;
use crate::common::daemon::*;

/// A `nats-server` with JetStream on `127.0.0.1:<port>`, storing under `dir`.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    config: PathBuf,
}

impl NatsServer {
    /// `None` (the test is skipped, and says so) when `nats-server` is not installed.
    fn start(root: &Path, max_payload: Option<usize>) -> Option<NatsServer> {
        if server_binary().is_none() {
            eprintln!(
                "skipped: nats-server is not installed (Debian: apt-get install nats-server; .ci/run installs it)"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = root.join("nats-store");
        std::fs::create_dir_all(&store).unwrap();
        let config = root.join("nats-server.conf");
        let mut text =
            format!("listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: {store:?}\n}}\n");
        if let Some(max) = max_payload {
            text.push_str(&format!("max_payload: {max}\n"));
        }
        std::fs::write(&config, text).unwrap();
        let mut server = NatsServer {
            child: None,
            port,
            config,
        };
        server.run();
        Some(server)
    }

    fn run(&mut self) {
        let child = {
            let _turn = common::hdf5_or_spawn();
            Command::new(server_binary().unwrap())
                .arg("-c")
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting nats-server")
        };
        self.child = Some(child);
        wait_for(Duration::from_secs(20), "nats-server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the server vanishes mid-run.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops (`SIGSTOP`) or resumes (`SIGCONT`) the server's process.
    fn pause(&self, stop: bool) {
        let pid = self.child.as_ref().expect("running").id() as libc::pid_t;
        let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Started again on the same port and store.
    fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `nats-server` on the PATH, or where Debian puts it (`/usr/sbin`, not on every PATH).
fn server_binary() -> Option<PathBuf> {
    ["nats-server", "/usr/sbin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|bin| {
            Command::new(bin)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// One message of the results stream.
#[derive(Debug, Clone)]
struct Msg {
    subject: String,
    id: String,
    json: serde_json::Value,
    text: String,
}

/// Reads the results stream (and any other) from the test's side.
struct Reader {
    link: Link,
    next: u64,
    results: Vec<Msg>,
}

impl Reader {
    fn new(url: &str) -> Reader {
        let link = Link::connect(&NatsConfig::with_url(url), None).expect("connecting the reader");
        Reader {
            link,
            next: 1,
            results: Vec::new(),
        }
    }

    /// Reads what was added to the results stream since the last call.
    fn poll(&mut self) -> &[Msg] {
        let new = self.link.block_on(async {
            let Ok(mut s) = self.link.js.get_stream("CELLSTREAM_RESULTS").await else {
                return Vec::new();
            };
            let last = s.info().await.unwrap().state.last_sequence;
            let mut out = Vec::new();
            for seq in self.next..=last {
                out.push(to_msg(s.get_raw_message(seq).await.unwrap()));
            }
            out
        });
        self.next += new.len() as u64;
        self.results.extend(new);
        &self.results
    }

    fn summaries(&mut self) -> usize {
        self.poll()
            .iter()
            .filter(|m| m.subject.starts_with(RESULTS_PREFIX) && m.json["type"] == "batch")
            .count()
    }

    /// Waits for `n` summaries on the results subjects.
    fn wait_summaries(&mut self, n: usize, limit: Duration) {
        wait_for(limit, &format!("{n} batch summaries on NATS"), || {
            self.summaries() >= n
        });
    }

    /// Messages in the results stream, by one request (cheap enough to poll in a tight loop).
    fn results_count(&self) -> u64 {
        self.link.block_on(async {
            match self.link.js.get_stream("CELLSTREAM_RESULTS").await {
                Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
                Err(_) => 0,
            }
        })
    }

    /// Messages waiting in the work stream (0 once every batch is acknowledged).
    fn work_waiting(&self) -> u64 {
        self.link.block_on(async {
            let mut s = self.link.js.get_stream("CELLSTREAM").await.unwrap();
            s.info().await.unwrap().state.messages
        })
    }

    /// Whether the daemon's consumer has every message of the work stream acknowledged (its
    /// ack floor at the stream's last sequence, nothing awaiting ack or delivery), and the
    /// stream and consumer state in words for a failure message.
    fn consumer_done(&self) -> (bool, String) {
        self.link.block_on(async {
            let mut s = self.link.js.get_stream("CELLSTREAM").await.unwrap();
            let st = s.info().await.unwrap().state.clone();
            let c = s.consumer_info("cellstream").await.unwrap();
            let done = c.ack_floor.stream_sequence >= st.last_sequence
                && c.num_ack_pending == 0
                && c.num_pending == 0;
            let state = format!(
                "stream: {} messages, sequences {}..={}; consumer: delivered {}, ack floor {}, \
                 {} awaiting ack, {} pending",
                st.messages,
                st.first_sequence,
                st.last_sequence,
                c.delivered.stream_sequence,
                c.ack_floor.stream_sequence,
                c.num_ack_pending,
                c.num_pending
            );
            (done, state)
        })
    }

    /// Object names in the payload bucket.
    fn objects(&self) -> Vec<String> {
        use futures_util::StreamExt;
        self.link.block_on(async {
            let Ok(store) = self.link.js.get_object_store("CELLSTREAM_PAYLOADS").await else {
                return Vec::new();
            };
            let mut list = store.list().await.unwrap();
            let mut names = Vec::new();
            while let Some(Ok(info)) = list.next().await {
                names.push(info.name);
            }
            names
        })
    }
}

fn to_msg(m: async_nats::jetstream::message::StreamMessage) -> Msg {
    let text = String::from_utf8(m.payload.to_vec()).unwrap();
    Msg {
        subject: m.subject.to_string(),
        id: m
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string())
            .unwrap_or_default(),
        json: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        text,
    }
}

/// Every batch of `expected` is on its subject exactly as `embed` wrote it: each cell record
/// once, in input order, with its message id, then one summary, last.
fn assert_exactly_once(results: &[Msg], expected: &BTreeMap<String, String>) {
    let mut by_subject = BTreeMap::<&str, Vec<&Msg>>::new();
    for m in results {
        by_subject.entry(m.subject.as_str()).or_default().push(m);
    }
    assert_eq!(
        by_subject.len(),
        expected.len(),
        "one subject per batch: {:?}",
        by_subject.keys().collect::<Vec<_>>()
    );
    for (id, want) in expected {
        let subject = format!("{RESULTS_PREFIX}{id}");
        let msgs = by_subject
            .get(subject.as_str())
            .unwrap_or_else(|| panic!("nothing on {subject}"));
        let (summary, cells) = msgs.split_last().unwrap();
        assert_eq!(
            summary.json["type"], "batch",
            "{id}: the summary comes last"
        );
        assert_eq!(summary.id, format!("{id}/summary"));
        assert_eq!(summary.json["batch"], id.as_str());
        assert_eq!(summary.json["cells"], cells.len());
        let mut got = String::new();
        for (i, m) in cells.iter().enumerate() {
            assert_eq!(m.id, format!("{id}/{i}"), "{id}: message ids in order");
            got.push_str(&m.text);
            got.push('\n');
        }
        assert_eq!(
            &got, want,
            "{id}: the records on NATS are not exactly those `embed` writes"
        );
    }
}

/// A daemon root with `[nats]` (and `sections` added), whose scratch goes in its own temp.
fn nats_daemon(root: &Path, url: &str, nats: &str, sections: &str) -> Daemon {
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::write(
        root.join("cellstream.toml"),
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[pipeline]\nthreads = 1\n{sections}\n[nats]\nurl = {url:?}\n{nats}\n"
        ),
    )
    .unwrap();
    let tmp = root.join("tmp").display().to_string();
    Daemon::start(root, &[("TMPDIR", tmp.as_str())])
}

fn submit(url: &str, inputs: &[PathBuf], extra: &[&str]) -> Output {
    let mut args = vec!["submit", "--nats", url];
    args.extend(extra);
    let inputs: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    args.extend(inputs.iter().map(String::as_str));
    let _turn = common::hdf5_or_spawn();
    common::cellstream(&args)
}

fn assert_submitted(out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "submit: {}", common::stderr(out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn two_daemons_share_one_stream_and_every_record_arrives_once() {
    let batches = [
        ("n1.csb", 0..60),
        ("n2", 60..100), // a 10x MTX folder: sent as a tar stream
        ("n3.csb.zst", 100..160),
        ("n4.csb", 160..220),
        ("n5.csb", 220..280),
        ("n6.csb", 280..330), // dropped into A's spool
    ];
    let Setup {
        tmp, src, expected, ..
    } = setup(&batches);
    let Some(server) = NatsServer::start(tmp.path(), None) else {
        return;
    };
    let url = server.url();
    // A serves its spool and NATS, and writes files; B has NATS alone.
    let root_a = tmp.path().join("a");
    let a = nats_daemon(
        &root_a,
        &url,
        "",
        &format!(
            "[spool]\ndir = {:?}\nrescan_seconds = 0.5\n[output]\ndir = {:?}\n",
            root_a.join("spool"),
            root_a.join("out")
        ),
    );
    let b = nats_daemon(&tmp.path().join("b"), &url, "", "");
    a.wait_ready();
    b.wait_ready();

    let inputs: Vec<PathBuf> = batches[..5].iter().map(|(n, _)| src.join(n)).collect();
    let sent = assert_submitted(&submit(&url, &inputs, &[]));
    assert_eq!(sent.len(), 5);
    assert_eq!(sent[1]["batch"], "n2");
    assert!(sent.iter().all(|s| s["via"] == "message"));
    drop_batch(
        &root_a.join("spool/incoming"),
        &src.join("n6.csb"),
        "n6.csb",
    );

    let mut reader = Reader::new(&url);
    reader.wait_summaries(6, Duration::from_secs(180));
    assert_exactly_once(reader.poll(), &expected);

    let (cells_a, cells_b) = (
        a.metric("cellstream_cells_total"),
        b.metric("cellstream_cells_total"),
    );
    assert_eq!(cells_a + cells_b, 330.0);
    assert!(
        cells_a > 0.0 && cells_b > 0.0,
        "both daemons took batches: A {cells_a}, B {cells_b}"
    );
    // A's files are those of the batches it did, as `embed` writes them.
    let files = dirs(&root_a).out;
    for (id, want) in &expected {
        if let Ok(text) = std::fs::read_to_string(files.join(format!("{id}.ndjson"))) {
            assert_eq!(&text, want, "{id}");
        }
    }
    assert!(files.join("n6.ndjson").exists());
    wait_for(Duration::from_secs(10), "every batch acknowledged", || {
        reader.work_waiting() == 0
    });
    // B has no spool: uploads are refused, and say where batches go instead.
    let (status, body) = request(&b.addr, "POST", "/v1/batches?name=x", &[], Some(b"x")).unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("cellstream submit"), "{body}");
    assert!(names_in(&root_a.join("tmp"))
        .iter()
        .all(|d| { names_in(&root_a.join("tmp").join(d)).is_empty() }));
}

#[test]
fn a_daemon_killed_mid_batch_loses_nothing_and_duplicates_nothing() {
    let Setup {
        tmp, src, expected, ..
    } = setup(&[("big.csb", 0..700)]);
    let Some(server) = NatsServer::start(tmp.path(), None) else {
        return;
    };
    let url = server.url();
    let nats = "ack_wait_seconds = 3\nmax_deliver = 3\n";
    let a = nats_daemon(&tmp.path().join("a"), &url, nats, "");
    a.wait_ready();
    assert_submitted(&submit(&url, &[src.join("big.csb")], &[]));
    // Killed mid-publish: once its first records are stored, the server is frozen, so the
    // daemon cannot run further than its window of unacknowledged publishes (256) past them
    // before it dies, and never to the summary.
    let reader = Reader::new(&url);
    let deadline = Instant::now() + Duration::from_secs(120);
    // No pause between polls: a batch's records are published within milliseconds.
    while reader.results_count() == 0 {
        assert!(Instant::now() < deadline, "no records on NATS");
    }
    server.pause(true);
    a.kill9();
    server.pause(false);
    std::thread::sleep(Duration::from_millis(500));
    let mut reader = reader;
    let at_kill = reader.poll().len();
    eprintln!("killed with {at_kill} of 701 messages published");
    assert!(at_kill < 701, "the summary was published before the kill");

    // Another daemon gets the batch once ack_wait has passed, and completes it.
    let b = nats_daemon(&tmp.path().join("b"), &url, nats, "");
    wait_for(Duration::from_secs(120), "the batch acknowledged", || {
        reader.work_waiting() == 0
    });
    reader.wait_summaries(1, Duration::from_secs(10));
    assert_exactly_once(reader.poll(), &expected);
    assert_eq!(b.metric("cellstream_nats_redeliveries_total"), 1.0);
    assert!(
        b.log_text().contains(&format!(
            "an earlier attempt published records 0..{at_kill} "
        )),
        "{}",
        b.log_text()
    );
}

#[test]
fn the_server_restarting_mid_run_delays_batches_and_loses_none() {
    let batches = [
        ("r1.csb", 0..80),
        ("r2.csb", 80..160),
        ("r3.csb", 160..240),
        ("r4.csb", 240..320),
    ];
    let Setup {
        tmp, src, expected, ..
    } = setup(&batches);
    let Some(mut server) = NatsServer::start(tmp.path(), None) else {
        return;
    };
    let url = server.url();
    let d = nats_daemon(&tmp.path().join("d"), &url, "ack_wait_seconds = 3\n", "");
    d.wait_ready();
    let inputs: Vec<PathBuf> = batches.iter().map(|(n, _)| src.join(n)).collect();
    assert_submitted(&submit(&url, &inputs, &[]));
    {
        let mut reader = Reader::new(&url);
        reader.wait_summaries(1, Duration::from_secs(120));
    }

    server.kill();
    wait_for(Duration::from_secs(30), "/readyz to say 503", || {
        get(&d.addr, "/readyz").is_ok_and(|(s, body)| s == 503 && body.contains("unreachable"))
    });
    assert_eq!(get(&d.addr, "/healthz").unwrap().0, 200);
    std::thread::sleep(Duration::from_secs(2));
    server.restart();
    wait_for(Duration::from_secs(60), "/readyz to say 200 again", || {
        get(&d.addr, "/readyz").is_ok_and(|(s, _)| s == 200)
    });
    assert!(d.metric("cellstream_nats_reconnects_total") >= 1.0);

    let mut reader = Reader::new(&url);
    reader.wait_summaries(4, Duration::from_secs(180));
    assert_exactly_once(reader.poll(), &expected);
    // An ack sent while the server was down is lost: that batch comes back after ack_wait and
    // the daemon, finding it committed, acks it then. Under a loaded host that can take a
    // few ack_wait rounds, so allow ack_wait × (max_deliver + 1) and show the log if not.
    // Acknowledged is the consumer's word, not an empty work stream: a server killed with
    // SIGKILL can come back with an acked message still stored (nats-server 2.9: ack floor 4,
    // nothing pending, message 1 left), which no client can remove or be redelivered.
    let deadline = Instant::now() + Duration::from_secs(3 * (5 + 1));
    loop {
        let (done, state) = reader.consumer_done();
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for every batch to be acknowledged ({state}); daemon log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_batch_over_the_message_limit_goes_through_the_object_store() {
    let Setup {
        tmp, src, expected, ..
    } = setup(&[("large.csb", 0..300)]);
    let input = src.join("large.csb");
    let limit = 64 << 10;
    assert!(std::fs::metadata(&input).unwrap().len() > limit as u64);
    let Some(server) = NatsServer::start(tmp.path(), Some(limit)) else {
        return;
    };
    let url = server.url();
    let d = nats_daemon(&tmp.path().join("d"), &url, "", "");
    d.wait_ready();
    let sent = assert_submitted(&submit(&url, &[input], &[]));
    assert_eq!(sent[0]["via"], "object_store");

    let mut reader = Reader::new(&url);
    reader.wait_summaries(1, Duration::from_secs(120));
    assert_exactly_once(reader.poll(), &expected);
    // Acknowledged, then its payload object deleted.
    wait_for(
        Duration::from_secs(10),
        "the payload object deleted",
        || reader.objects().is_empty(),
    );
}

#[test]
fn a_malformed_batch_is_reported_kept_and_acknowledged_while_the_next_is_processed() {
    let Setup {
        tmp, src, expected, ..
    } = setup(&[("good.csb", 0..40)]);
    let Some(server) = NatsServer::start(tmp.path(), None) else {
        return;
    };
    let url = server.url();
    let junk = src.join("junk.csb");
    std::fs::write(&junk, b"this is not a count matrix\n").unwrap();
    let d = nats_daemon(&tmp.path().join("d"), &url, "", "");
    d.wait_ready();
    assert_submitted(&submit(&url, &[junk, src.join("good.csb")], &[]));

    let mut reader = Reader::new(&url);
    reader.wait_summaries(1, Duration::from_secs(120));
    let results: Vec<Msg> = reader
        .poll()
        .iter()
        .filter(|m| m.subject.starts_with(RESULTS_PREFIX))
        .cloned()
        .collect();
    assert_exactly_once(&results, &expected);
    wait_for(Duration::from_secs(10), "the report", || {
        reader
            .poll()
            .iter()
            .any(|m| m.subject == "cellstream.failed.junk")
    });
    let report = reader
        .poll()
        .iter()
        .find(|m| m.subject == "cellstream.failed.junk")
        .unwrap()
        .json
        .clone();
    assert_eq!(report["batch"], "junk");
    assert_eq!(report["stage"], "read");
    assert!(
        report["error"].as_str().unwrap().contains("junk.csb"),
        "{report}"
    );
    assert_eq!(report["deliveries"], 1);
    let kept = report["input"].as_str().unwrap().to_string();
    assert!(
        kept.starts_with("CELLSTREAM_PAYLOADS/failed/junk/"),
        "{kept}"
    );
    assert_eq!(
        reader.objects(),
        vec![kept.trim_start_matches("CELLSTREAM_PAYLOADS/").to_string()]
    );
    assert_eq!(
        d.metric("cellstream_batches_total{outcome=\"failed\"}"),
        1.0
    );
    wait_for(Duration::from_secs(10), "both acknowledged", || {
        reader.work_waiting() == 0
    });
}

#[test]
fn a_batch_that_can_never_be_committed_is_quarantined_after_max_deliver() {
    let Setup { tmp, src, .. } = setup(&[("stuck.csb", 0..20)]);
    let Some(server) = NatsServer::start(tmp.path(), None) else {
        return;
    };
    let url = server.url();
    // Its output folder is read-only: the file sink can never commit.
    let root = tmp.path().join("d");
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::write(
        root.join("cellstream.toml"),
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[pipeline]\nthreads = 1\n[output]\ndir = {out:?}\n[nats]\nurl = {url:?}\nack_wait_seconds = 2\nmax_deliver = 2\n"
        ),
    )
    .unwrap();
    let tmpdir = root.join("tmp").display().to_string();
    let d = Daemon::start_with(
        &root,
        &[("TMPDIR", tmpdir.as_str())],
        Confinement::PermissionsApply,
    );
    d.wait_ready();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    assert_submitted(&submit(&url, &[src.join("stuck.csb")], &[]));
    let mut reader = Reader::new(&url);
    wait_for(Duration::from_secs(120), "the report", || {
        reader
            .poll()
            .iter()
            .any(|m| m.subject == "cellstream.failed.stuck")
    });
    let report = &reader
        .poll()
        .iter()
        .find(|m| m.subject == "cellstream.failed.stuck")
        .unwrap()
        .json;
    assert_eq!(report["kind"], "max_deliver", "{report}");
    assert_eq!(report["deliveries"], 3, "{report}");
    assert!(report["error"]
        .as_str()
        .unwrap()
        .contains("delivered 3 times"));
    assert_eq!(
        d.metric("cellstream_batches_total{outcome=\"retried\"}"),
        2.0
    );
    assert_eq!(d.metric("cellstream_nats_redeliveries_total"), 2.0);
    assert!(
        reader
            .poll()
            .iter()
            .all(|m| !m.subject.starts_with(RESULTS_PREFIX) || m.json["type"] != "batch"),
        "no summary for a batch that was never committed"
    );
    wait_for(Duration::from_secs(10), "the batch acknowledged", || {
        reader.work_waiting() == 0
    });
}

#[test]
fn submit_refuses_unusable_inputs_and_names_the_ones_it_could_not_send() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("ok.csb");
    std::fs::write(&file, b"x").unwrap();
    // Nothing listens on this port.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let out = submit(&url, std::slice::from_ref(&file), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("ok.csb"),
        "{}",
        common::stderr(&out)
    );

    let missing = tmp.path().join("missing.csb");
    let out = submit(&url, &[file.clone(), missing], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("missing.csb"),
        "{}",
        common::stderr(&out)
    );

    let out = submit(&url, std::slice::from_ref(&file), &["--name", "a..b"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("a..b"),
        "{}",
        common::stderr(&out)
    );

    let out = submit(&url, &[file.clone(), file], &["--name", "one"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("--name"),
        "{}",
        common::stderr(&out)
    );
}
