//! The modules' ticks: every minute boundary of the host clock, with the hour, day and
//! month boundaries crossed in the calendar zone, so modules see a day end when the
//! counters do.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use valvula_store::sync::Unpoisoned;

use super::State;

/// Calls every module's tick hook at each minute boundary of the modules' clock, until
/// `stop`.
pub(super) fn spawn(state: Arc<Mutex<State>>, stop: CancellationToken) {
    let clock = state.locked().modules.clock.clone();
    tokio::spawn(async move {
        let mut last = clock.now();
        loop {
            let now = clock.now();
            let wait = 60 - now.rem_euclid(60);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(wait as u64)) => {}
            }
            let now = clock.now();
            run(&state, last, now).await;
            last = now;
        }
    });
}

pub(super) async fn run(state: &Mutex<State>, before: i64, after: i64) {
    let zone = state.locked().config.storage.zone;
    let kinds = tick_kinds(zone, before, after);
    if kinds == 0 {
        return;
    }
    let mods: Vec<_> = {
        let st = state.locked();
        st.modules.iter().cloned().collect()
    };
    for m in mods {
        m.tick(kinds, after).await;
    }
}

/// The `VLV_TICK_*` boundaries crossed between two host times, in the zone of calendar
/// windows (`[storage] time_zone`), so modules see a day end when the counters do.
pub fn tick_kinds(zone: valvula_store::Zone, before: i64, after: i64) -> u32 {
    use valvula_store::window::Period;
    let mut k = 0;
    if before.div_euclid(60) != after.div_euclid(60) {
        k |= valvula_abi::VLV_TICK_MINUTE;
    }
    for (period, bit) in [
        (Period::Hour, valvula_abi::VLV_TICK_HOUR),
        (Period::Day, valvula_abi::VLV_TICK_DAY),
        (Period::Month, valvula_abi::VLV_TICK_MONTH),
    ] {
        if zone.period(period, before).0 != zone.period(period, after).0 {
            k |= bit;
        }
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_boundaries() {
        let t = 1_700_000_000 - 1_700_000_000 % 86_400; // a UTC midnight
        // In any time zone, one second across a minute boundary is a minute tick.
        let utc = valvula_store::Zone::UTC;
        assert_ne!(
            tick_kinds(utc, t + 59, t + 60) & valvula_abi::VLV_TICK_MINUTE,
            0
        );
        assert_eq!(tick_kinds(utc, t + 10, t + 20), 0);
        // 40 days apart: a new month whatever the zone.
        let k = tick_kinds(utc, t, t + 40 * 86_400);
        assert_eq!(k, 0xF);
        // A UTC midnight is no day boundary in Tokyo (09:00 there).
        let tokyo = valvula_store::Zone::parse("Asia/Tokyo").unwrap();
        assert_eq!(tick_kinds(tokyo, t - 1, t) & valvula_abi::VLV_TICK_DAY, 0);
        assert_ne!(tick_kinds(utc, t - 1, t) & valvula_abi::VLV_TICK_DAY, 0);
    }
}
