//! The daemon's log: one line per event on stderr, where journald (or a terminal) reads it.
//! Each line carries a syslog priority prefix that journald turns into the entry's level
//! (`SyslogLevelPrefix=`, on by default) when stderr is the journal.

use std::io::Write;

fn line(priority: u8, level: &str, msg: &str) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut err = std::io::stderr().lock();
    let _ = if journal {
        writeln!(err, "<{priority}>{msg}")
    } else {
        writeln!(err, "cellstream[{level}]: {msg}")
    };
}

pub fn info(msg: &str) {
    line(6, "info", msg);
}

pub fn warn(msg: &str) {
    line(4, "warn", msg);
}

pub fn error(msg: &str) {
    line(3, "error", msg);
}
