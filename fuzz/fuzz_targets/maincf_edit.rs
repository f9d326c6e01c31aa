//! main.cf parsing and hook editing on arbitrary text: no panic; an edit that succeeds
//! can be undone, and the text of an untouched file comes back byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use valvula_postfix::{MainCf, Position, STAGES};

fuzz_target!(|data: &[u8]| {
    let Ok(cf) = MainCf::parse_bytes(data) else {
        return;
    };
    assert_eq!(
        cf.to_text().as_bytes(),
        data,
        "an unedited file must not change"
    );
    for (stage, _) in STAGES {
        let mut cf = MainCf::parse_bytes(data).unwrap();
        let _ = cf.value(stage);
        let target = "inet:127.0.0.1:3579";
        let _ = cf.has_hook(stage, target);
        if let Ok(true) = cf.add_hook(stage, target, Position::First) {
            assert_eq!(cf.has_hook(stage, target).ok(), Some(true), "{stage}");
            let _ = cf.remove_hook(stage, target);
        }
        let _ = cf.add_hook(stage, target, Position::Last);
    }
});
