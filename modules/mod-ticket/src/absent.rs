//! Identities that have no ticket, remembered until `domain_ticket` changes (SQLite).
//!
//! Most requests a ticket listener sees come from senders without a ticket, and each
//! one cost two queries, the second a scan of every list row (`INSTR` on every
//! `domain_ticket` row). Now:
//! - a sender remembered without a ticket reads one generation number; unchanged, it
//!   still has none;
//! - a sender last found with an exact match reads its match alone, as before (the
//!   match is always read fresh; the hint only spares it the generation);
//! - any other sender reads the generation in the exact-match query itself (one more
//!   branch of the same statement) and, found nowhere, is remembered at it.
//!
//! The generation is a row bumped by triggers whenever a `domain_ticket` row is
//! inserted, deleted, or has its `sasl_user` or `domain` changed: by valvula-ctl, by
//! hand, by another daemon on the same file. Charges change other columns and never
//! bump it. The triggers themselves can go away (a restore, `DROP TRIGGER`, a table
//! rebuilt by hand): every such change bumps SQLite's `schema_version`, which is read
//! with the generation. A schema this module has not seen its triggers in turns the
//! memory off: requests look senders up. A read (at most once a second) turns it on
//! again when the triggers are all there (a `VACUUM`, an index added); missing ones are
//! made by the minute tick, on a worker thread, which also reads whether they are all
//! there (a sender with a ticket reads no schema version). Requests never write or wait
//! for the write lock for this.
//!
//! Edits apply on the next request as before: the generation is read before the
//! memory answers, in a snapshot of its own or in the exact matches' snapshot.
//!
//! MariaDB keeps the two queries: it has no cheap `schema_version`, so a restore
//! without the triggers would go unnoticed.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use valvula_module::{Dialect, Error, Host, Request, Value};

/// The most identities remembered, without a ticket and with an exact match each; more
/// (a hostile sender inventing them) start over. With [`MAX_KEY_BYTES`], at most about
/// 20 MB each.
const MAX_KEYS: usize = 65_536;
/// Longer identities are looked up every time rather than held in memory.
const MAX_KEY_BYTES: usize = 256;

const TABLE: &str = "domain_ticket_generation";

/// The triggers that bump the generation, by name, with their SQLite definition.
const TRIGGERS: [(&str, &str); 3] = [
    ("domain_ticket_gen_insert", "AFTER INSERT ON domain_ticket"),
    ("domain_ticket_gen_delete", "AFTER DELETE ON domain_ticket"),
    (
        "domain_ticket_gen_update",
        "AFTER UPDATE OF sasl_user, domain ON domain_ticket",
    ),
];

type Key = (Option<String>, Option<String>);

#[derive(Default)]
struct State {
    /// The `schema_version` at which every trigger was seen in place; `None`: the
    /// memory is off.
    schema: Option<i64>,
    generation: i64,
    /// Moves on whenever the memory is turned on or off: a request's reading from
    /// before that can no longer add to it.
    epoch: u64,
    keys: HashSet<Key>,
}

impl State {
    fn off(&mut self) {
        self.schema = None;
        self.epoch += 1;
        self.keys.clear();
    }

    fn on(&mut self, schema: i64, generation: i64) -> Seen {
        self.schema = Some(schema);
        self.generation = generation;
        self.epoch += 1;
        self.keys.clear();
        Seen {
            epoch: self.epoch,
            generation,
        }
    }
}

pub struct Absent {
    sqlite: bool,
    state: Mutex<State>,
    /// Identities last found with an exact match: their lookups skip the generation
    /// (a hint only: the exact matches are always read, fresh).
    present: Mutex<HashSet<Key>>,
    /// When a request last read whether the triggers are back (at most once a second).
    verified_at: AtomicI64,
}

/// A request's reading of the generation, before its lookup.
#[derive(Clone, Copy)]
pub struct Seen {
    epoch: u64,
    generation: i64,
}

/// What was last found for an identity.
pub enum Hint {
    /// Remembered without a ticket: the generation alone may answer.
    Absent,
    /// An exact match last time: look it up without the generation.
    Present,
    Unknown,
}

/// The memory's state when a request started its lookup.
#[derive(Clone, Copy)]
pub struct Probe {
    schema: i64,
    epoch: u64,
}

/// The generation and the schema version, read together (`TABLE`).
const GENERATION_SQL: &str = "SELECT g.gen, s.schema_version FROM domain_ticket_generation g, \
     pragma_schema_version s WHERE g.id = 1";

/// A branch for the exact-match query (`mod-ticket`'s `candidates`, same 15 columns):
/// the generation and the schema version, with `pri` 0 so that it comes first.
pub const GENERATION_BRANCH: &str = "SELECT g.gen, s.schema_version, NULL, NULL, NULL, NULL, \
     NULL, NULL, NULL, NULL, 0, NULL, NULL, NULL, NULL \
     FROM domain_ticket_generation g, pragma_schema_version s WHERE g.id = 1";

/// Takes the [`GENERATION_BRANCH`] row out of the exact matches: (generation, schema
/// version), or `None` when the row is missing.
pub fn take_generation(rows: &mut Vec<Vec<Value>>) -> Option<(i64, i64)> {
    let first = rows.first()?;
    if first.get(10)?.as_i64()? != 0 {
        return None;
    }
    let reading = (first.first()?.as_i64()?, first.get(1)?.as_i64()?);
    rows.remove(0);
    Some(reading)
}

fn key(user: Option<&str>, domain: Option<&str>) -> Option<Key> {
    let len = user.map_or(0, str::len) + domain.map_or(0, str::len);
    (len <= MAX_KEY_BYTES).then(|| (user.map(str::to_owned), domain.map(str::to_owned)))
}

/// The generation, the schema version and how many of the triggers exist on
/// `domain_ticket`, in one read (one snapshot).
fn verify_sql() -> (String, Vec<Value>) {
    let mut params: Vec<Value> = vec!["trigger".into(), "domain_ticket".into()];
    params.extend(TRIGGERS.iter().map(|(name, _)| (*name).into()));
    (
        format!(
            "SELECT g.gen, s.schema_version, \
             (SELECT COUNT(*) FROM sqlite_master WHERE type = ? AND tbl_name = ? \
              AND name IN (?, ?, ?)) \
             FROM {TABLE} g, pragma_schema_version s WHERE g.id = 1"
        ),
        params,
    )
}

/// (generation, schema version, triggers in place) from a [`verify_sql`] row.
fn verified(rows: &[Vec<Value>]) -> Option<(i64, i64, bool)> {
    let r = rows.first()?;
    Some((
        r.first()?.as_i64()?,
        r.get(1)?.as_i64()?,
        r.get(2)?.as_i64()? == TRIGGERS.len() as i64,
    ))
}

impl Absent {
    pub fn new(dialect: Dialect) -> Absent {
        Absent {
            sqlite: dialect == Dialect::Sqlite,
            state: Mutex::default(),
            present: Mutex::default(),
            verified_at: AtomicI64::new(i64::MIN),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns the memory on when the triggers are in place, making what is missing
    /// first. Blocking (it may wait for the write lock, only when something is
    /// missing): called while preparing the tables and by the minute tick, on a worker
    /// thread, never for a request. Where they cannot be made, senders are looked up every
    /// time, as before.
    pub fn check(&self, host: &Host) {
        if !self.sqlite {
            return;
        }
        let (sql, params) = verify_sql();
        let read = || -> Result<Option<(i64, i64, bool)>, Error> {
            Ok(verified(&host.query(&sql, &params)?.rows))
        };
        let outcome = match read() {
            Ok(Some((g, schema, true))) => Ok((g, schema)),
            _ => {
                // Requests that find a ticket read no generation, so the memory may
                // not have noticed yet that the triggers are gone.
                self.state().off();
                make(host).and_then(|()| match read()? {
                    Some((g, schema, true)) => Ok((g, schema)),
                    _ => Err("the triggers were gone again right after they were made".into()),
                })
            }
        };
        match outcome {
            Ok((generation, schema)) => {
                let mut st = self.state();
                if st.schema != Some(schema) {
                    st.on(schema, generation);
                }
            }
            Err(e) => tracing::warn!(
                "cannot put the triggers of {TABLE} in place ({e}); senders without a \
                 ticket are looked up every time until the next minute's check"
            ),
        }
    }

    /// Whether a request should read the generation with its lookup: the memory is
    /// on (`None`: off, see [`Absent::verify`]).
    pub fn probe(&self) -> Option<Probe> {
        if !self.sqlite {
            return None;
        }
        let st = self.state();
        st.schema.map(|schema| Probe {
            schema,
            epoch: st.epoch,
        })
    }

    /// What a request read ([`take_generation`]; `None`: nothing) under `probe`: the
    /// reading it may use, or the memory turned off when the schema changed (the
    /// triggers may be gone) or the generation row is gone.
    pub fn observe(&self, probe: Probe, reading: Option<(i64, i64)>) -> Option<Seen> {
        let mut st = self.state();
        if st.epoch != probe.epoch {
            // Turned off or on meanwhile: this reading belongs to the earlier state.
            return None;
        }
        match reading {
            Some((generation, schema)) if schema == probe.schema => {
                if st.generation != generation {
                    st.keys.clear();
                    st.generation = generation;
                }
                Some(Seen {
                    epoch: st.epoch,
                    generation,
                })
            }
            _ => {
                st.off();
                None
            }
        }
    }

    /// While the memory is off: one read, at most once a second, of whether every
    /// trigger is in place; if so, the memory is on again from this reading.
    pub async fn verify(&self, host: &Host, req: &Request<'_>, now: i64) -> Option<Seen> {
        if !self.sqlite {
            return None;
        }
        let last = self.verified_at.load(Ordering::Relaxed);
        if now <= last
            || self
                .verified_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let epoch = self.state().epoch;
        let (sql, params) = verify_sql();
        let rows = host.query_async(req, &sql, &params).await.ok()?;
        let (generation, schema, complete) = verified(&rows.rows)?;
        let mut st = self.state();
        (complete && st.epoch == epoch && st.schema.is_none()).then(|| st.on(schema, generation))
    }

    /// What was last found for the identity, to choose the cheapest lookup.
    pub fn hint(&self, user: Option<&str>, domain: Option<&str>) -> Hint {
        if !self.sqlite {
            return Hint::Unknown;
        }
        let Some(k) = key(user, domain) else {
            return Hint::Unknown;
        };
        if self.state().keys.contains(&k) {
            return Hint::Absent;
        }
        if self
            .present
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&k)
        {
            return Hint::Present;
        }
        Hint::Unknown
    }

    /// Records whether the identity has an exact match now.
    pub fn set_present(&self, user: Option<&str>, domain: Option<&str>, present: bool) {
        if !self.sqlite {
            return;
        }
        let Some(k) = key(user, domain) else {
            return;
        };
        let mut set = self.present.lock().unwrap_or_else(|e| e.into_inner());
        if !present {
            set.remove(&k);
            return;
        }
        if set.len() >= MAX_KEYS {
            set.clear();
        }
        set.insert(k);
    }

    /// The generation alone (for an identity remembered without a ticket), when the
    /// memory is on.
    pub async fn read_generation(&self, host: &Host, req: &Request<'_>) -> Option<Seen> {
        let probe = self.probe()?;
        let read = host.query_async(req, GENERATION_SQL, &[]).await;
        let reading = read.ok().and_then(|r| {
            let row = r.rows.first()?;
            Some((row.first()?.as_i64()?, row.get(1)?.as_i64()?))
        });
        self.observe(probe, reading)
    }

    /// Whether the identity was found without a ticket at this reading's generation.
    pub fn known_absent(&self, seen: Seen, user: Option<&str>, domain: Option<&str>) -> bool {
        let st = self.state();
        st.schema.is_some()
            && st.epoch == seen.epoch
            && st.generation == seen.generation
            && key(user, domain).is_some_and(|k| st.keys.contains(&k))
    }

    /// Remembers that the identity had no ticket (the reading was made before the
    /// lookup, so an edit committed during it moved the generation on).
    pub fn remember(&self, seen: Seen, user: Option<&str>, domain: Option<&str>) {
        let Some(k) = key(user, domain) else {
            return;
        };
        let mut st = self.state();
        if st.schema.is_none() || st.epoch != seen.epoch || st.generation != seen.generation {
            return;
        }
        if st.keys.len() >= MAX_KEYS {
            st.keys.clear();
        }
        st.keys.insert(k);
    }
}

/// Makes the generation row and whatever trigger is missing. A trigger of one of these
/// names on another table (`domain_ticket` renamed: its triggers went with it) is
/// dropped and made again on `domain_ticket`.
fn make(host: &Host) -> Result<(), Error> {
    host.exec(
        &format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1), \
             gen INTEGER NOT NULL DEFAULT 0)"
        ),
        &[],
    )?;
    host.exec(
        &format!("INSERT OR IGNORE INTO {TABLE} (id, gen) VALUES (1, 0)"),
        &[],
    )?;
    for (name, when) in TRIGGERS {
        let on = host.query(
            "SELECT tbl_name FROM sqlite_master WHERE type = ? AND name = ?",
            &["trigger".into(), name.into()],
        )?;
        match on
            .rows
            .first()
            .and_then(|r| r.first()?.as_str().map(str::to_owned))
        {
            Some(table) if table == "domain_ticket" => continue,
            Some(_) => {
                host.exec(&format!("DROP TRIGGER IF EXISTS {name}"), &[])?;
            }
            None => {}
        }
        host.exec(
            &format!(
                "CREATE TRIGGER IF NOT EXISTS {name} {when} BEGIN \
                 UPDATE {TABLE} SET gen = gen + 1 WHERE id = 1; END"
            ),
            &[],
        )?;
    }
    Ok(())
}
