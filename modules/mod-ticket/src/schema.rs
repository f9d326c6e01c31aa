//! valvula's tables, created when missing and completed with missing columns, never
//! dropped or retyped (`valvulad_db_ensure_table`), so an existing valvula database is
//! used as it is.

use valvula_module::{Column, Error, Host};

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
    ("time_tracking", &[int("day"), int("month")]),
];

/// Creates what is missing; returns `table.column` for everything added.
pub fn ensure(host: &Host) -> Result<Vec<String>, Error> {
    let mut added = Vec::new();
    for (table, columns) in TABLES {
        for c in host.ensure_table(table, columns)? {
            added.push(format!("{table}.{c}"));
        }
    }
    Ok(added)
}
