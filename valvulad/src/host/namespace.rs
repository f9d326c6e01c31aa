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

/// At most this many bytes of approved statement texts per module (a module that
/// builds its SQL with ever new text only pays the check each time), none longer than
/// [`APPROVED_TEXT_MAX`].
const APPROVED_BYTES: usize = 1 << 20;
const APPROVED_TEXT_MAX: usize = 4096;

/// One module's approved statements.
#[derive(Debug, Default)]
pub(crate) struct Approved {
    generation: u64,
    texts: HashSet<Box<str>>,
    bytes: usize,
}

/// A piece of SQL text as the namespace check sees it.
#[derive(Debug, PartialEq)]
enum Tok {
    /// A name: a bare word (lower case), or a quoted one (`` `x` ``, `"x"`, `[x]`).
    Name {
        text: String,
        quoted: bool,
    },
    Dot,
    Other,
}

/// The tokens of `sql`, comments and string literals left out (a name inside either is
/// no name, and a quote or backtick inside either must not start one).
fn tokens(sql: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut it = sql.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '-' if it.peek() == Some(&'-') => {
                for c in it.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '#' => {
                for c in it.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '/' if it.peek() == Some(&'*') => {
                it.next();
                let mut last = ' ';
                for c in it.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            '\'' => {
                // A string: '' and \' inside it do not end it.
                while let Some(c) = it.next() {
                    match c {
                        '\\' => {
                            it.next();
                        }
                        '\'' if it.peek() == Some(&'\'') => {
                            it.next();
                        }
                        '\'' => break,
                        _ => {}
                    }
                }
                out.push(Tok::Other);
            }
            '`' | '"' | '[' => {
                let close = match c {
                    '[' => ']',
                    q => q,
                };
                let mut text = String::new();
                while let Some(c) = it.next() {
                    if c == close {
                        if it.peek() == Some(&close) && close != ']' {
                            it.next();
                            text.push(c);
                            continue;
                        }
                        break;
                    }
                    text.push(c);
                }
                out.push(Tok::Name {
                    text: text.to_lowercase(),
                    quoted: true,
                });
            }
            '.' => out.push(Tok::Dot),
            c if c.is_alphanumeric() || c == '_' || c == '$' => {
                let mut text = String::from(c);
                while let Some(&n) = it.peek() {
                    if n.is_alphanumeric() || n == '_' || n == '$' {
                        text.push(n);
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Name {
                    text: text.to_lowercase(),
                    quoted: false,
                });
            }
            c if c.is_whitespace() => {}
            _ => out.push(Tok::Other),
        }
    }
    out
}

/// SQL words that are never a table of a module's: not claimed, not matched.
const KEYWORDS: &[&str] = &[
    "add",
    "all",
    "alter",
    "and",
    "as",
    "asc",
    "autoincrement",
    "begin",
    "between",
    "by",
    "case",
    "check",
    "collate",
    "column",
    "commit",
    "constraint",
    "count",
    "create",
    "cross",
    "current_timestamp",
    "default",
    "delete",
    "desc",
    "distinct",
    "drop",
    "each",
    "else",
    "end",
    "exists",
    "for",
    "foreign",
    "from",
    "full",
    "group",
    "having",
    "if",
    "ignore",
    "in",
    "index",
    "inner",
    "insert",
    "integer",
    "int",
    "into",
    "is",
    "join",
    "key",
    "left",
    "like",
    "limit",
    "max",
    "min",
    "new",
    "not",
    "null",
    "of",
    "offset",
    "old",
    "on",
    "or",
    "order",
    "outer",
    "primary",
    "references",
    "replace",
    "returning",
    "right",
    "row",
    "select",
    "set",
    "sum",
    "table",
    "temp",
    "temporary",
    "text",
    "then",
    "to",
    "trigger",
    "union",
    "unique",
    "update",
    "using",
    "values",
    "varchar",
    "view",
    "when",
    "where",
    "with",
];

/// Statements no module runs, whatever they name: they change what a name means
/// (ATTACH), the schema under the host (PRAGMA writable_schema), the pooled
/// connection every module shares (SET), or run SQL text the check never sees
/// (PREPARE, EXECUTE).
const REFUSED_FIRST: &[&str] = &[
    "pragma",
    "attach",
    "detach",
    "set",
    "prepare",
    "execute",
    "deallocate",
    "handler",
    "load",
    "grant",
    "revoke",
    "install",
    "uninstall",
    "flush",
    "kill",
    "shutdown",
    "use",
];

/// Names no statement of a module may hold: dynamic SQL (text the check never sees).
const REFUSED_ANYWHERE: &[&str] = &["prepare", "execute"];
/// SQLite's schema table: read, never written.
const READ_ONLY: &[&str] = &["sqlite_master", "sqlite_schema", "sqlite_temp_master"];

/// The table a `CREATE [OR REPLACE] [TEMPORARY] TABLE [IF NOT EXISTS] [schema.]name`
/// statement creates (`Err` for a name in another schema).
fn created_table(toks: &[Tok]) -> Result<Option<String>, String> {
    let word = |i: usize| match toks.get(i) {
        Some(Tok::Name {
            text,
            quoted: false,
        }) => Some(text.as_str()),
        _ => None,
    };
    if word(0) != Some("create") {
        return Ok(None);
    }
    let mut i = 1;
    if word(i) == Some("or") && word(i + 1) == Some("replace") {
        i += 2;
    }
    if matches!(word(i), Some("temporary" | "temp")) {
        i += 1;
    }
    if word(i) != Some("table") {
        return Ok(None);
    }
    i += 1;
    if word(i) == Some("if") && word(i + 1) == Some("not") && word(i + 2) == Some("exists") {
        i += 3;
    }
    let Some(Tok::Name { text, .. }) = toks.get(i) else {
        return Ok(None);
    };
    if toks.get(i + 1) == Some(&Tok::Dot) {
        let Some(Tok::Name { text: name, .. }) = toks.get(i + 2) else {
            return Ok(None);
        };
        if text != "main" {
            return Err(format!(
                "CREATE TABLE {text}.{name}: a table in another schema"
            ));
        }
        return Ok(Some(name.clone()));
    }
    Ok(Some(text.clone()))
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
    let toks = tokens(sql);
    fn refused<T>(why: String) -> Result<T, StoreError> {
        Err(StoreError::Invalid(why))
    }
    if let Some(Tok::Name {
        text,
        quoted: false,
    }) = toks.first()
        && REFUSED_FIRST.contains(&text.as_str())
    {
        return refused(format!(
            "{} statements are not for modules",
            text.to_uppercase()
        ));
    }
    let names = || {
        toks.iter().filter_map(|t| match t {
            Tok::Name { text, quoted } => Some((text.as_str(), *quoted)),
            _ => None,
        })
    };
    let reads_only = matches!(
        toks.first(),
        Some(Tok::Name { text, quoted: false }) if text == "select"
    );
    for (n, quoted) in names() {
        if !reads_only && READ_ONLY.contains(&n) {
            return refused(format!("{n} is read, never written, by modules"));
        }
        if n.starts_with("vlv_") {
            return refused(format!(
                "{n} is a name of the host's (vlv_...): modules may not name it"
            ));
        }
        if !quoted && REFUSED_ANYWHERE.contains(&n) {
            return refused(format!("{n} is not for modules"));
        }
    }
    {
        let owners = OWNERS.read_now();
        if let Some(owners) = owners.as_ref() {
            for (n, quoted) in names() {
                if !quoted && KEYWORDS.contains(&n) {
                    continue;
                }
                if let Some(owner) = owners.get(n)
                    && owner != module
                {
                    return refused(format!(
                        "table {n} belongs to module {owner}: a module may name only its own tables"
                    ));
                }
            }
        }
    }
    if let Some(table) = created_table(&toks).or_else(refused::<Option<String>>)? {
        if KEYWORDS.contains(&table.as_str()) {
            return refused(format!(
                "a table named {table} (an SQL word) would shadow other modules' statements"
            ));
        }
        let mut owners = OWNERS.write_now();
        let owners = owners.get_or_insert_with(HashMap::new);
        match owners.get(&table) {
            Some(owner) if owner != module => {
                return refused(format!("table {table} belongs to module {owner}"));
            }
            Some(_) => {}
            None => {
                owners.insert(table, module.to_owned());
                GENERATION.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
    let mut a = approved.write_now();
    let now = GENERATION.load(Ordering::Acquire);
    if a.generation != now || a.bytes + sql.len() > APPROVED_BYTES {
        a.texts.clear();
        a.bytes = 0;
        a.generation = now;
    }
    // Long texts are checked each time rather than kept.
    if sql.len() <= APPROVED_TEXT_MAX {
        a.bytes += sql.len();
        a.texts.insert(sql.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(sql: &str) -> Result<Option<String>, String> {
        created_table(&tokens(sql))
    }

    #[test]
    fn created_tables_are_read_as_databases_read_them() {
        let t = |sql: &str| created(sql).unwrap();
        assert_eq!(
            t("CREATE TABLE IF NOT EXISTS `My Table`(id INT, n TEXT DEFAULT '')").as_deref(),
            Some("my table")
        );
        assert_eq!(t("create temporary table t (a int)").as_deref(), Some("t"));
        assert_eq!(t("CREATE OR REPLACE TABLE x (a int)").as_deref(), Some("x"));
        assert_eq!(t("CREATE TABLE /* c */ x (a int)").as_deref(), Some("x"));
        assert_eq!(t("CREATE TABLE \"x y\" (a int)").as_deref(), Some("x y"));
        assert_eq!(t("CREATE TABLE main.x (a int)").as_deref(), Some("x"));
        assert!(created("CREATE TABLE other.x (a int)").is_err());
        assert_eq!(t("CREATE INDEX i ON t (a)"), None);
        assert_eq!(t("SELECT 1"), None);
    }

    #[test]
    fn host_tables_and_other_modules_tables_are_refused() {
        let (a, b) = (RwLock::default(), RwLock::default());
        for sql in [
            "DROP TABLE vlv_counter",
            "select * from VLV_meta",
            "DELETE FROM `vlv_once`",
            "SELECT * FROM \"vlv_meta\"",
            "SELECT * FROM [vlv_meta]",
            "SELECT * FROM main.vlv_meta",
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

    #[test]
    fn quotes_and_comments_do_not_hide_names() {
        let (a, b) = (RwLock::default(), RwLock::default());
        check("hide-a", &a, "CREATE TABLE hide_a_t (id INT)").unwrap();
        for sql in [
            "SELECT * FROM /* ` */ vlv_meta",
            "DELETE /* ` */ FROM hide_a_t",
            "DELETE -- `\n FROM hide_a_t",
            "CREATE TRIGGER hb AFTER INSERT ON hide_b_t BEGIN SELECT '`'; DELETE FROM hide_a_t; END",
            "CREATE PROCEDURE hb_p() BEGIN SELECT '`'; DELETE FROM vlv_meta; END",
            "CREATE VIEW hb_v AS SELECT '`' AS q, * FROM vlv_meta",
            "CREATE TABLE hb_c AS SELECT * FROM hide_a_t",
        ] {
            assert!(check("hide-b", &b, sql).is_err(), "{sql}");
        }
        // A name inside a string is no name.
        check(
            "hide-b",
            &b,
            "CREATE TABLE hide_b_t (n VARCHAR(9) DEFAULT 'vlv_x')",
        )
        .unwrap();
    }

    #[test]
    fn statements_no_module_runs() {
        let a = RwLock::default();
        for sql in [
            "PRAGMA writable_schema=ON",
            "ATTACH DATABASE ? AS other",
            "SET SESSION sql_mode = ?",
            "PREPARE s FROM @q",
            "CREATE PROCEDURE p() BEGIN PREPARE s FROM @q; EXECUTE s; END",
            "UPDATE sqlite_master SET sql = ? WHERE name = ?",
        ] {
            assert!(check("stmts", &a, sql).is_err(), "{sql}");
        }
        // Reading the schema stays allowed (the SDK and the modules do).
        check("stmts", &a, "SELECT name FROM pragma_table_info(?)").unwrap();
        check(
            "stmts",
            &a,
            "SELECT COUNT(*) FROM information_schema.statistics WHERE table_name = ?",
        )
        .unwrap();
    }

    #[test]
    fn sql_words_are_never_tables() {
        let (a, b) = (RwLock::default(), RwLock::default());
        assert!(check("words-b", &b, "CREATE TABLE IF NOT EXISTS `select` (x INT)").is_err());
        check("words-a", &a, "CREATE TABLE words_a_t (id INT)").unwrap();
        check("words-a", &a, "SELECT count(*) FROM words_a_t").unwrap();
    }

    #[test]
    fn the_approved_texts_are_bounded_in_bytes() {
        let a = RwLock::default();
        check("bytes", &a, "CREATE TABLE bytes_t (id INT)").unwrap();
        for i in 0..2000 {
            let sql = format!("SELECT id FROM bytes_t WHERE id = {i} {}", " ".repeat(1000));
            check("bytes", &a, &sql).unwrap();
        }
        assert!(a.read_now().bytes <= APPROVED_BYTES);
        let long = format!("SELECT id FROM bytes_t {}", " ".repeat(100_000));
        check("bytes", &a, &long).unwrap();
        assert!(
            !a.read_now().texts.contains(long.as_str()),
            "long texts are not kept"
        );
    }
}
