//! The daemon's TOML config: any text gives a config or a message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = cellstream::config::Config::parse(text) {
            assert!(cfg.pipeline.threads >= 1);
            assert!(cfg.rescan_interval().as_secs_f64() > 0.0);
            let (merged, _) = cfg.reload(cfg.clone());
            assert_eq!(merged, cfg);
        }
    }
});
