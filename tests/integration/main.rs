//! Every integration test, in one binary: each links tract, and eleven binaries took most of
//! CI's build time. Each module is one area, run against the real binary, the shipped model
//! and real cells; `common` holds their helpers (fixtures, running the binary, the daemon).

mod common;

mod bad_input;
mod cli;
mod csb_python;
mod embed;
mod export_scgpt;
mod memory;
mod nats;
mod readers;
mod reference;
mod serve;
mod serve_corpus;
mod serve_faults;
mod soak;
mod tokenize_parity;
mod tokenize_props;
mod watch;
