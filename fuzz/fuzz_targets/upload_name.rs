//! The name a client gives an upload (`POST /v1/batches?name=…`, after URL decoding): an
//! accepted name can never leave `incoming/` or hide as a temporary file.
#![no_main]

use cellstream::source::spool::check_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ok) = check_name(name) {
        let path = std::path::Path::new(ok);
        assert_eq!(path.components().count(), 1, "{ok:?}");
        assert!(matches!(
            path.components().next(),
            Some(std::path::Component::Normal(_))
        ));
        assert!(!ok.starts_with('.') && !ok.contains('\0') && !ok.contains('/'));
        assert!(!cellstream::fsutil::is_temporary(ok));
    }
});
