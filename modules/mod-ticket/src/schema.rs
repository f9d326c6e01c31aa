//! valvula's tables, created when missing and completed with missing columns, never
//! dropped or retyped (`valvulad_db_ensure_table`), so an existing valvula database is
//! used as it is.

use valvula_module::{Column, Dialect, Error, Host};

const fn col<'a>(name: &'a str, sqlite: &'a str, mysql: &'a str) -> Column<'a> {
    Column {
        name,
        sqlite,
        mysql,
    }
}

const ID: Column<'static> = col(
    "id",
    "INTEGER PRIMARY KEY",
    "INT AUTO_INCREMENT PRIMARY KEY",
);
const INT: (&str, &str) = ("INTEGER DEFAULT NULL", "INT DEFAULT NULL");

const fn int(name: &'static str) -> Column<'static> {
    col(name, INT.0, INT.1)
}

/// Table, columns (first one creates the table), in valvula's creation order.
pub const TABLES: [(&str, &[Column<'static>]); 6] = [
    (
        "ticket_plan",
        &[
            ID,
            col(
                "name",
                "VARCHAR(250) DEFAULT NULL",
                "VARCHAR(250) DEFAULT NULL",
            ),
            col(
                "description",
                "VARCHAR(500) DEFAULT NULL",
                "VARCHAR(500) DEFAULT NULL",
            ),
            int("total_limit"),
            int("day_limit"),
            int("month_limit"),
        ],
    ),
    (
        "domain_ticket",
        &[
            ID,
            col("domain", "TEXT DEFAULT NULL", "TEXT DEFAULT NULL"),
            col("sasl_user", "TEXT DEFAULT NULL", "TEXT DEFAULT NULL"),
            int("total_used"),
            int("current_day_usage"),
            int("current_month_usage"),
            int("valid_until"),
            int("ticket_plan_id"),
            int("block_ticket"),
            int("has_outgoing_ip"),
            int("outgoing_ip_id"),
        ],
    ),
    (
        "domain_ticket_history",
        &[ID, int("domain_ticket_id"), int("stamp"), int("day_usage")],
    ),
    (
        "domain_month_ticket_history",
        &[
            ID,
            int("domain_ticket_id"),
            int("stamp"),
            int("month_usage"),
        ],
    ),
    (
        "outgoing_ip",
        &[
            ID,
            int("is_active"),
            col(
                "outgoing_ip",
                "VARCHAR(32) DEFAULT NULL",
                "VARCHAR(32) DEFAULT NULL",
            ),
            col(
                "transport",
                "VARCHAR(256) DEFAULT NULL",
                "VARCHAR(256) DEFAULT NULL",
            ),
            col(
                "label",
                "VARCHAR(256) DEFAULT NULL",
                "VARCHAR(256) DEFAULT NULL",
            ),
            col(
                "description",
                "VARCHAR(512) DEFAULT NULL",
                "VARCHAR(512) DEFAULT NULL",
            ),
        ],
    ),
    (
        "time_tracking",
        &[
            int("day"),
            int("month"),
            // Not valvula's: the zone the day and month are seen in (see rollover.rs).
            col(
                "time_zone",
                "VARCHAR(64) DEFAULT NULL",
                "VARCHAR(64) DEFAULT NULL",
            ),
        ],
    ),
];

/// Indexes for the per-request lookups (valvula has none: every request scanned
/// `domain_ticket`). Extra indexes change nothing for valvula itself.
const INDEXES: [(&str, &str); 2] = [
    ("domain_ticket_sasl_user", "sasl_user"),
    ("domain_ticket_domain", "domain"),
];

/// Creates what is missing; returns `table.column` (or the index name) for everything
/// added.
pub fn ensure(host: &Host) -> Result<Vec<String>, Error> {
    let mut added = Vec::new();
    for (table, columns) in TABLES {
        for c in host.ensure_table(table, columns)? {
            added.push(format!("{table}.{c}"));
        }
    }
    for (name, column) in INDEXES {
        match ensure_index(host, name, column) {
            Ok(true) => added.push(name.to_owned()),
            Ok(false) => {}
            // An account without the INDEX privilege still works, only slower.
            Err(e) => tracing::warn!("cannot create index {name} on domain_ticket: {e}"),
        }
    }
    Ok(added)
}

fn ensure_index(host: &Host, name: &str, column: &str) -> Result<bool, Error> {
    // MySQL 8 has no CREATE INDEX IF NOT EXISTS: look first, on both.
    let (look, params, create) = match host.dialect() {
        Dialect::Sqlite => (
            "SELECT COUNT(*) FROM sqlite_master WHERE type = ? AND name = ?",
            ["index", name],
            // NOCASE: the lookups compare case-insensitively, as valvula's MySQL does.
            format!("CREATE INDEX {name} ON domain_ticket ({column} COLLATE NOCASE)"),
        ),
        Dialect::Mysql => (
            "SELECT COUNT(*) FROM information_schema.statistics \
             WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
            ["domain_ticket", name],
            // TEXT needs a prefix; 191 characters fit InnoDB's key limit in utf8mb4.
            format!("CREATE INDEX {name} ON domain_ticket ({column}(191))"),
        ),
        Dialect::None => return Ok(false),
    };
    let exists = || -> Result<bool, Error> {
        let r = host.query(look, &[params[0].into(), params[1].into()])?;
        Ok(r.rows.first().and_then(|row| row[0].as_i64()).unwrap_or(0) > 0)
    };
    if exists()? {
        return Ok(false);
    }
    if let Err(e) = host.exec(&create, &[]) {
        // Another daemon may have made it meanwhile ("duplicate key name").
        if exists()? {
            return Ok(false);
        }
        return Err(e.into());
    }
    Ok(true)
}
