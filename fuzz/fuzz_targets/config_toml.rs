//! valvulad.toml loading on arbitrary text: errors with keys, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = valvula_config::parse(text, std::path::Path::new("/nonexistent/valvulad.toml"));
    }
});
