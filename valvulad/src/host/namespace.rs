//! Which tables a module's SQL may name.
//!
//! Every module has the database to itself except for two kinds of names: the host's
//! tables (`vlv_` and anything after it: counters, tokens, meta), which no module may
//! name at all, and the tables another module created. A table belongs to the first
//! module that runs `CREATE TABLE` for it in this daemon (modules create theirs, `IF
//! NOT EXISTS`, from `init`, in the configuration's order); a statement of any other
//! module that names it anywhere (as a table, a column or an alias alike) is refused
//! with `VLV_E_INVALID` before it reaches the database. Names are compared without
//! case, as both databases do for tables on the usual file systems.
//!
//! A statement already approved for a module is remembered by its text until a table
//! changes owner, so the requests' statements are checked once, not each time.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use valvula_store::StoreError;
use valvula_store::sync::UnpoisonedRw;

/// Table (lower case) → the module that created it.
static OWNERS: RwLock<Option<HashMap<String, String>>> = RwLock::new(None);
/// Bumped when a table gets an owner: the approved texts are checked again.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// At most this many approved statement texts per module (a module that builds its SQL
/// with ever new text only pays the check each time).
const APPROVED_MAX: usize = 4096;

/// One module's approved statements.
#[derive(Debug, Default)]
pub(crate) struct Approved {
    generation: u64,
    texts: HashSet<Box<str>>,
}

/// The identifiers of `sql`: runs of letters, digits, `_` and `$`, and back-quoted
/// names, in lower case.
fn identifiers(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in sql.chars() {
        if c == '`' {
            if quoted || !cur.is_empty() {
                out.push(std::mem::take(&mut cur).to_lowercase());
            }
            quoted = !quoted;
        } else if quoted || c.is_alphanumeric() || c == '_' || c == '$' {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur).to_lowercase());
        }
    }
    if !cur.is_empty() {
        out.push(cur.to_lowercase());
    }
    out
}

/// The table a `CREATE [TEMPORARY] TABLE [IF NOT EXISTS] name` statement creates.
fn created_table(ids: &[String]) -> Option<&str> {
    let mut it = ids.iter().map(String::as_str);
    if it.next()? != "create" {
        return None;
    }
    let mut w = it.next()?;
    if w == "temporary" || w == "temp" {
        w = it.next()?;
    }
    if w != "table" {
        return None;
    }
    let mut name = it.next()?;
    if name == "if" {
        // IF NOT EXISTS
        it.next()?;
        it.next()?;
        name = it.next()?;
    }
    Some(name)
}

/// Whether `module` may run `sql`; a `CREATE TABLE` of a table without an owner makes
/// `module` its owner.
pub(crate) fn check(
    module: &str,
    approved: &RwLock<Approved>,
    sql: &str,
) -> Result<(), StoreError> {
    let generation = GENERATION.load(Ordering::Acquire);
    {
        let a = approved.read_now();
        if a.generation == generation && a.texts.contains(sql) {
            return Ok(());
        }
    }
    let ids = identifiers(sql);
    if let Some(host) = ids.iter().find(|i| i.starts_with("vlv_")) {
        return Err(StoreError::Invalid(format!(
            "{host} is a name of the host's (vlv_...): modules may not name it"
        )));
    }
    {
        let owners = OWNERS.read_now();
        if let Some(owners) = owners.as_ref() {
            for i in &ids {
                if let Some(owner) = owners.get(i)
                    && owner != module
                {
                    return Err(StoreError::Invalid(format!(
                        "table {i} belongs to module {owner}: a module may name only its own tables"
                    )));
                }
            }
        }
    }
    if let Some(table) = created_table(&ids) {
        let mut owners = OWNERS.write_now();
        let owners = owners.get_or_insert_with(HashMap::new);
        match owners.get(table) {
            Some(owner) if owner != module => {
                return Err(StoreError::Invalid(format!(
                    "table {table} belongs to module {owner}"
                )));
            }
            Some(_) => {}
            None => {
                owners.insert(table.to_owned(), module.to_owned());
                GENERATION.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
    let mut a = approved.write_now();
    let now = GENERATION.load(Ordering::Acquire);
    if a.generation != now || a.texts.len() >= APPROVED_MAX {
        a.texts.clear();
        a.generation = now;
    }
    a.texts.insert(sql.into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_created_tables() {
        let ids = identifiers("CREATE TABLE IF NOT EXISTS `My Table`(id INT, x$y TEXT DEFAULT '')");
        assert_eq!(
            ids[..6],
            ["create", "table", "if", "not", "exists", "my table"]
        );
        assert_eq!(created_table(&ids), Some("my table"));
        assert_eq!(
            created_table(&identifiers("create temporary table t (a int)")),
            Some("t")
        );
        assert_eq!(created_table(&identifiers("CREATE INDEX i ON t (a)")), None);
        assert_eq!(created_table(&identifiers("SELECT 1")), None);
    }

    #[test]
    fn host_tables_and_other_modules_tables_are_refused() {
        let (a, b) = (RwLock::default(), RwLock::default());
        for sql in [
            "DROP TABLE vlv_counter",
            "select * from VLV_meta",
            "DELETE FROM `vlv_once`",
        ] {
            assert!(check("ns-a", &a, sql).is_err(), "{sql}");
        }
        check("ns-a", &a, "CREATE TABLE IF NOT EXISTS ns_a_t (id INT)").unwrap();
        check("ns-a", &a, "INSERT INTO ns_a_t (id) VALUES (?)").unwrap();
        let e = check("ns-b", &b, "DROP TABLE NS_A_T").unwrap_err();
        assert!(e.to_string().contains("belongs to module ns-a"), "{e}");
        assert!(check("ns-b", &b, "CREATE TABLE IF NOT EXISTS ns_a_t (id INT)").is_err());
        // An approved text stays approved, and is refused again for the other module.
        check("ns-a", &a, "INSERT INTO ns_a_t (id) VALUES (?)").unwrap();
        check("ns-b", &b, "CREATE TABLE ns_b_t (id INT)").unwrap();
        assert!(check("ns-a", &a, "SELECT id FROM ns_b_t").is_err());
    }
}
