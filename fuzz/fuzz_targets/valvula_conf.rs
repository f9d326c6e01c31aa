//! valvula's XML valvula.conf translated to TOML on arbitrary text: no panic, no endless
//! read (`<include src="/dev/zero"/>`), no exponential `<include>` growth.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = valvula_config::valvula_conf::translate(
            text,
            std::path::Path::new("/nonexistent/valvula.conf"),
        );
    }
});
