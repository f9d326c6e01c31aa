//! Identities that have no ticket, remembered until `domain_ticket` changes (SQLite).
//!
//! Most requests a ticket listener sees come from senders without a ticket, and each
//! one cost two queries, the second a scan of every list row (`INSTR` on every
//! `domain_ticket` row). Here a request reads one generation number instead, and the
//! identities found without a ticket at that generation are answered from memory.
//!
//! The generation is a row bumped by triggers whenever a `domain_ticket` row is
//! inserted, deleted, or has its `sasl_user` or `domain` changed: by valvula-ctl, by
//! hand, by another daemon on the same file. Charges change other columns and never
//! bump it. The triggers themselves can go away (a restore, `DROP TRIGGER`, a table
//! rebuilt by hand): every such change bumps SQLite's `schema_version`, which is read
//! with the generation; a schema this module has not checked for its triggers turns
//! the memory off until they are checked (and made again) on a worker thread.
//!
//! Edits apply on the next request as before: the generation is read by every
//! request, before its lookup, in a transaction of its own.
//!
//! MariaDB keeps the two queries: it has no cheap `schema_version`, so a restore
//! without the triggers would go unnoticed.

use std::collections::HashSet;
use std::sync::Mutex;

use valvula_module::{Dialect, Error, Host, Request};

/// The most identities remembered; more (a hostile sender inventing them) start over.
/// With [`MAX_KEY_BYTES`], at most about 20 MB.
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
    /// The `schema_version` at which the triggers were last seen in place; `None`:
    /// not checked (or they could not be made), nothing is remembered.
    schema: Option<i64>,
    generation: i64,
    keys: HashSet<Key>,
}

#[derive(Default)]
pub struct Absent {
    state: Mutex<State>,
}

/// What a request may use: the generation it read, when the memory is usable.
pub enum Generation {
    /// Remembered identities of this generation have no ticket.
    Current(i64),
    /// Not usable now: look the identity up.
    Unusable,
    /// The schema changed since the triggers were checked: look up, and check them
    /// again ([`Absent::check`]) before remembering anything.
    SchemaChanged,
}

fn key(user: Option<&str>, domain: Option<&str>) -> Option<Key> {
    let len = user.map_or(0, str::len) + domain.map_or(0, str::len);
    (len <= MAX_KEY_BYTES).then(|| (user.map(str::to_owned), domain.map(str::to_owned)))
}

impl Absent {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the generation row and its triggers where missing, and records the
    /// schema they were seen in. Blocking: called while preparing the tables, on a
    /// worker thread. A database where they cannot be made works as before, without
    /// the memory.
    pub fn check(&self, host: &Host) {
        let mut st = self.state();
        st.schema = None;
        st.keys.clear();
        if host.dialect() != Dialect::Sqlite {
            return;
        }
        match checked_schema(host) {
            Ok(Some((schema, generation))) => {
                st.schema = Some(schema);
                st.generation = generation;
            }
            Ok(None) => tracing::info!(
                "domain_ticket's schema kept changing while its triggers were checked; \
                 senders without a ticket are looked up every time until the next check"
            ),
            Err(e) => tracing::warn!(
                "cannot make the triggers of {TABLE} ({e}); senders without a ticket are \
                 looked up every time"
            ),
        }
    }

    /// Reads the generation for a request, before its lookup.
    pub async fn generation(&self, host: &Host, req: &Request<'_>) -> Generation {
        let Some(checked) = self.state().schema else {
            return Generation::Unusable;
        };
        let read = host
            .query_async(
                req,
                &format!(
                    "SELECT g.gen, s.schema_version FROM {TABLE} g, pragma_schema_version s \
                     WHERE g.id = 1"
                ),
                &[],
            )
            .await;
        let Ok(rows) = read else {
            // Dropped by hand, or the database is away: the lookup tells which.
            return Generation::SchemaChanged;
        };
        let Some((generation, schema)) = rows
            .rows
            .first()
            .and_then(|r| Some((r.first()?.as_i64()?, r.get(1)?.as_i64()?)))
        else {
            return Generation::SchemaChanged;
        };
        if schema != checked {
            return Generation::SchemaChanged;
        }
        let mut st = self.state();
        if st.schema != Some(checked) {
            // Checked again meanwhile: this reading belongs to the earlier check.
            return Generation::Unusable;
        }
        if st.generation != generation {
            st.keys.clear();
            st.generation = generation;
        }
        Generation::Current(generation)
    }

    /// Whether the identity was found without a ticket at `generation`.
    pub fn known_absent(&self, generation: i64, user: Option<&str>, domain: Option<&str>) -> bool {
        let st = self.state();
        st.schema.is_some()
            && st.generation == generation
            && key(user, domain).is_some_and(|k| st.keys.contains(&k))
    }

    /// Remembers that the identity had no ticket at `generation` (read before the
    /// lookup, so an edit committed during it moves the generation on).
    pub fn remember(&self, generation: i64, user: Option<&str>, domain: Option<&str>) {
        let Some(k) = key(user, domain) else {
            return;
        };
        let mut st = self.state();
        if st.schema.is_none() || st.generation != generation {
            return;
        }
        if st.keys.len() >= MAX_KEYS {
            st.keys.clear();
        }
        st.keys.insert(k);
    }
}

/// The schema version at which the generation row and every trigger exist, and the
/// generation then; `None` when the schema changed during the check.
fn checked_schema(host: &Host) -> Result<Option<(i64, i64)>, Error> {
    for _ in 0..3 {
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
            host.exec(
                &format!(
                    "CREATE TRIGGER IF NOT EXISTS {name} {when} BEGIN \
                     UPDATE {TABLE} SET gen = gen + 1 WHERE id = 1; END"
                ),
                &[],
            )?;
        }
        let r = host.query(
            &format!(
                "SELECT g.gen, s.schema_version, \
                 (SELECT COUNT(*) FROM sqlite_master WHERE type = ? \
                  AND tbl_name = ? AND name IN (?, ?, ?)) \
                 FROM {TABLE} g, pragma_schema_version s WHERE g.id = 1"
            ),
            &[
                "trigger".into(),
                "domain_ticket".into(),
                TRIGGERS[0].0.into(),
                TRIGGERS[1].0.into(),
                TRIGGERS[2].0.into(),
            ],
        )?;
        let row = r.rows.first().ok_or("the generation row is missing")?;
        let (generation, after, triggers) = (
            row[0].as_i64().unwrap_or(0),
            row[1].as_i64().unwrap_or(-1),
            row[2].as_i64().unwrap_or(0),
        );
        // One read: every trigger exists at schema version `after`. One dropped
        // between making it and this read: make it again.
        if triggers == TRIGGERS.len() as i64 {
            return Ok(Some((after, generation)));
        }
    }
    Ok(None)
}
