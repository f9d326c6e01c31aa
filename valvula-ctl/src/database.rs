//! Plans, tickets and rate-limit overrides without SQL, on the database valvulad's
//! configuration names (SQLite or MySQL/MariaDB), through valvulad's own store.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{Local, NaiveDate, NaiveDateTime, TimeZone};
use clap::Subcommand;
use mod_ratelimit::inspect::{self, Inspect};
use valvula_store::{Rows, Stmt, StorageConfig, Store, Value, Window, WindowKind};

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// Add a plan (-1: no limit).
    Add {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
        total: i64,
        #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
        day: i64,
        #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
        month: i64,
    },
    List,
    /// Change a plan's limits or name.
    Set {
        id: i64,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        total: Option<i64>,
        #[arg(long, allow_hyphen_values = true)]
        day: Option<i64>,
        #[arg(long, allow_hyphen_values = true)]
        month: Option<i64>,
    },
    /// Remove a plan no ticket uses.
    Remove {
        id: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum TicketCmd {
    /// Bind a SASL user, a domain, or a comma-separated list of either to a plan.
    Add {
        #[arg(long, conflicts_with = "domain", required_unless_present = "domain")]
        user: Option<String>,
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        plan: i64,
        /// never, YYYY-MM-DD (through that day), "YYYY-MM-DD HH:MM", +30d, or a Unix time.
        #[arg(long = "valid-until", default_value = "never")]
        valid_until: String,
    },
    List,
    /// Set a ticket's expiry (never, YYYY-MM-DD, "YYYY-MM-DD HH:MM", +30d, Unix time).
    Valid {
        id: i64,
        until: String,
    },
    Block {
        id: i64,
        #[arg(long, default_value_t = 1)]
        flag: i64,
    },
    Unblock {
        id: i64,
    },
    Remove {
        id: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum OverrideCmd {
    /// Limits for one identity of a policy, e.g. `hour=50,day=200`.
    Set {
        policy: String,
        identity: String,
        limits: String,
        /// Keep the override after its window (otherwise it ends with it).
        #[arg(long)]
        persist: bool,
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        text: Option<String>,
    },
    List,
    /// Back to the configured rule.
    Remove {
        policy: String,
        identity: String,
    },
}

/// Runs `f` with a store opened on `storage` (a runtime of its own for MySQL). An
/// administrator's command checks the database's calendar zone but never records its
/// own (a shell's TZ must not become the database's), and may take longer than a
/// request: it scans what a daemon looks up by key.
pub fn with_store<T>(
    storage: &StorageConfig,
    f: impl FnOnce(&Arc<Store>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let storage = StorageConfig {
        record_zone: false,
        timeout: storage.timeout.max(ADMIN_TIMEOUT),
        ..storage.clone()
    };
    let store = Store::open(&storage, rt.handle().clone())?;
    f(&store)
}

/// How long one of an administrator's storage calls may take.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn open<T>(config: &Path, f: impl FnOnce(&Arc<Store>) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let c = valvula_config::load_file(config)?.config;
    with_store(&c.storage, |s| {
        s.ping()
            .with_context(|| format!("database {}", s.describe()))?;
        f(s)
    })
}

/// `None` when the table a query reads does not exist (the module never ran here);
/// every other error is the command's (an unnoticed timeout once made `usage` say
/// "nothing counted" for a customer being refused).
fn absent_table_ok<T>(r: Result<T, valvula_store::StoreError>) -> anyhow::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if e.to_string().contains("no such table")
                || e.to_string().contains("doesn't exist") =>
        {
            Ok(None)
        }
        Err(e) => Err(hint(e)),
    }
}

/// A storage error, with a hint when the module's tables do not exist yet.
fn hint(e: valvula_store::StoreError) -> anyhow::Error {
    let m = e.to_string();
    if m.contains("no such table") || m.contains("doesn't exist") {
        anyhow::anyhow!(
            "{m}: the module's tables are made when valvulad first runs it (start valvulad once)"
        )
    } else {
        anyhow::anyhow!(m)
    }
}

fn query(s: &Store, sql: &str, params: Vec<Value>) -> anyhow::Result<Rows> {
    s.query(Stmt::new(sql, params)).map_err(hint)
}

fn execute(
    s: &Store,
    sql: impl Into<String>,
    params: Vec<Value>,
) -> anyhow::Result<valvula_store::Exec> {
    s.exec(Stmt::new(sql, params)).map_err(hint)
}

fn affected(s: &Store, sql: &str, params: Vec<Value>) -> anyhow::Result<u64> {
    Ok(execute(s, sql, params)?.affected)
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Text(t) => t.clone(),
        Value::Blob(_) => "<blob>".into(),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::Text(t) => t.parse().unwrap_or(0),
        _ => 0,
    }
}

fn table(rows: &Rows) {
    let mut w: Vec<usize> = rows.columns.iter().map(String::len).collect();
    for r in &rows.rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(cell(c).len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(rows.columns.clone());
    for r in &rows.rows {
        line(r.iter().map(cell).collect());
    }
}

/// Expiry as mod-ticket stores it: -1 for never, else a Unix time that fits valvula's
/// 32-bit `valid_until` column.
pub fn parse_until(s: &str) -> anyhow::Result<i64> {
    let t = parse_time(s)?;
    if t > i64::from(i32::MAX) {
        bail!(
            "{s:?} is after 2038-01-19: valvula's valid_until column is a 32-bit integer; use a date before it, or never"
        );
    }
    Ok(t)
}

fn parse_time(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    if s == "never" || s == "-1" {
        return Ok(-1);
    }
    if let Some(d) = s.strip_prefix('+').and_then(|d| d.strip_suffix('d')) {
        let days: i64 = d
            .parse()
            .with_context(|| format!("{s:?}: write +N d, e.g. +30d"))?;
        return Ok(Local::now().timestamp() + days * 86_400);
    }
    if let Ok(t) = s.parse::<i64>() {
        return Ok(t);
    }
    let local = |n: NaiveDateTime| {
        Local
            .from_local_datetime(&n)
            .earliest()
            .map(|d| d.timestamp())
            .with_context(|| format!("{s:?} does not exist in the local time zone"))
    };
    if let Ok(n) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M") {
        return local(n);
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        // Valid through that day.
        return local(d.and_hms_opt(23, 59, 59).expect("a valid time"));
    }
    bail!("{s:?} is not a date: never, YYYY-MM-DD, \"YYYY-MM-DD HH:MM\", +30d or a Unix time")
}

pub fn plan(config: &Path, cmd: &PlanCmd) -> anyhow::Result<()> {
    open(config, |s| match cmd {
        PlanCmd::Add {
            name,
            description,
            total,
            day,
            month,
        } => {
            let e = execute(
                s,
                "INSERT INTO ticket_plan (name, description, total_limit, day_limit, month_limit) VALUES (?, ?, ?, ?, ?)",
                vec![
                    name.as_str().into(),
                    description.as_str().into(),
                    (*total).into(),
                    (*day).into(),
                    (*month).into(),
                ],
            )?;
            println!(
                "INFO: plan {} added: {name} total={total} day={day} month={month}",
                e.last_insert_id
            );
            Ok(())
        }
        PlanCmd::List => {
            table(&query(
                s,
                "SELECT id, name, total_limit, day_limit, month_limit FROM ticket_plan ORDER BY id",
                vec![],
            )?);
            Ok(())
        }
        PlanCmd::Set {
            id,
            name,
            total,
            day,
            month,
        } => {
            let mut sets = Vec::new();
            let mut params: Vec<Value> = Vec::new();
            for (col, v) in [
                ("total_limit", total),
                ("day_limit", day),
                ("month_limit", month),
            ] {
                if let Some(v) = v {
                    sets.push(format!("{col} = ?"));
                    params.push((*v).into());
                }
            }
            if let Some(n) = name {
                sets.push("name = ?".into());
                params.push(n.as_str().into());
            }
            if sets.is_empty() {
                bail!("nothing to change: give --name, --total, --day or --month");
            }
            params.push((*id).into());
            let n = affected(
                s,
                &format!("UPDATE ticket_plan SET {} WHERE id = ?", sets.join(", ")),
                params,
            )?;
            if n == 0 {
                bail!("no plan {id}");
            }
            println!("INFO: plan {id} changed; it applies to the next request");
            Ok(())
        }
        PlanCmd::Remove { id } => {
            let used = query(
                s,
                "SELECT COUNT(*) FROM domain_ticket WHERE ticket_plan_id = ?",
                vec![(*id).into()],
            )?;
            let n = used.rows.first().map_or(0, |r| int(&r[0]));
            if n > 0 {
                bail!("plan {id} is used by {n} ticket(s); move or remove them first");
            }
            if affected(
                s,
                "DELETE FROM ticket_plan WHERE id = ?",
                vec![(*id).into()],
            )? == 0
            {
                bail!("no plan {id}");
            }
            println!("INFO: plan {id} removed");
            Ok(())
        }
    })
}

pub fn ticket(config: &Path, cmd: &TicketCmd) -> anyhow::Result<()> {
    open(config, |s| match cmd {
        TicketCmd::Add {
            user,
            domain,
            plan,
            valid_until,
        } => {
            let until = parse_until(valid_until)?;
            let p = query(
                s,
                "SELECT id FROM ticket_plan WHERE id = ?",
                vec![(*plan).into()],
            )?;
            if p.rows.is_empty() {
                bail!("no plan {plan}; add it first (plan add)");
            }
            let (col, who) = match (user, domain) {
                (Some(u), _) => ("sasl_user", u),
                (None, Some(d)) => ("domain", d),
                (None, None) => bail!("give --user or --domain"),
            };
            let e = execute(
                s,
                format!(
                    "INSERT INTO domain_ticket ({col}, valid_until, ticket_plan_id, total_used, current_day_usage, current_month_usage, block_ticket) VALUES (?, ?, ?, 0, 0, 0, 0)"
                ),
                vec![who.as_str().into(), until.into(), (*plan).into()],
            )?;
            println!(
                "INFO: ticket {} added: {col} {who} on plan {plan}, valid until {}",
                e.last_insert_id,
                show_until(until)
            );
            Ok(())
        }
        TicketCmd::List => {
            table(&query(
                s,
                "SELECT id, sasl_user, domain, ticket_plan_id AS plan, total_used, current_day_usage AS day_used, \
                 current_month_usage AS month_used, valid_until, block_ticket AS blocked FROM domain_ticket ORDER BY id",
                vec![],
            )?);
            Ok(())
        }
        TicketCmd::Valid { id, until } => {
            let t = parse_until(until)?;
            set(
                s,
                *id,
                "valid_until",
                t,
                &format!("valid until {}", show_until(t)),
            )
        }
        TicketCmd::Block { id, flag } => set(s, *id, "block_ticket", *flag, "blocked"),
        TicketCmd::Unblock { id } => set(s, *id, "block_ticket", 0, "unblocked"),
        TicketCmd::Remove { id } => {
            if affected(
                s,
                "DELETE FROM domain_ticket WHERE id = ?",
                vec![(*id).into()],
            )? == 0
            {
                bail!("no ticket {id}");
            }
            println!("INFO: ticket {id} removed");
            Ok(())
        }
    })
}

fn set(s: &Store, id: i64, col: &str, v: i64, what: &str) -> anyhow::Result<()> {
    if affected(
        s,
        &format!("UPDATE domain_ticket SET {col} = ? WHERE id = ?"),
        vec![v.into(), id.into()],
    )? == 0
    {
        bail!("no ticket {id}");
    }
    println!("INFO: ticket {id} {what}");
    Ok(())
}

fn show_until(t: i64) -> String {
    if t == -1 {
        return "never expires".into();
    }
    Local.timestamp_opt(t, 0).single().map_or_else(
        || t.to_string(),
        |d| d.format("%Y-%m-%d %H:%M:%S %Z").to_string(),
    )
}

pub fn override_cmd(config: &Path, cmd: &OverrideCmd) -> anyhow::Result<()> {
    open(config, |s| match cmd {
        OverrideCmd::Set {
            policy,
            identity,
            limits,
            persist,
            action,
            text,
        } => {
            inspect::parse_override_limits(limits).map_err(anyhow::Error::msg)?;
            if let Some(rl) = ratelimit_or_warn(&valvula_config::load_file(config)?.config) {
                rl.check_override_target(policy, identity)
                    .map_err(anyhow::Error::msg)?;
            }
            let identity = inspect::override_identity(identity);
            let params = |with_key: bool| {
                let mut p: Vec<Value> = vec![
                    limits.as_str().into(),
                    action.clone().into(),
                    text.clone().into(),
                    i64::from(*persist).into(),
                ];
                if with_key {
                    p.push(policy.as_str().into());
                    p.push(identity.as_str().into());
                }
                p
            };
            // period_start NULL: the override's window starts with its next request.
            let n = affected(
                s,
                "UPDATE ratelimit_override SET limits = ?, action = ?, text = ?, persist = ?, period_start = NULL \
                 WHERE policy = ? AND identity = ?",
                params(true),
            )?;
            if n == 0 {
                let mut p = vec![policy.as_str().into(), identity.as_str().into()];
                p.extend(params(false));
                affected(
                    s,
                    "INSERT INTO ratelimit_override (policy, identity, limits, action, text, persist) VALUES (?, ?, ?, ?, ?, ?)",
                    p,
                )?;
            }
            println!(
                "INFO: {policy}/{identity}: {limits}{}; applies to the next request",
                if *persist {
                    " (persistent)"
                } else {
                    " (until its window ends)"
                }
            );
            Ok(())
        }
        OverrideCmd::List => {
            table(&query(
                s,
                "SELECT policy, identity, limits, action, text, persist FROM ratelimit_override \
                 WHERE limits IS NOT NULL OR action IS NOT NULL OR text IS NOT NULL ORDER BY policy, identity",
                vec![],
            )?);
            Ok(())
        }
        OverrideCmd::Remove { policy, identity } => {
            // The row is the override: without it the configured rule applies.
            let n = affected(
                s,
                "DELETE FROM ratelimit_override WHERE policy = ? AND identity = ?",
                vec![
                    policy.as_str().into(),
                    valvula_module::bounded(&identity.to_ascii_lowercase(), 255)
                        .into_owned()
                        .into(),
                ],
            )?;
            if n == 0 {
                bail!("no override for {identity} in policy {policy}");
            }
            println!("INFO: {policy}/{identity} back to the configured rule");
            Ok(())
        }
    })
}

fn when(t: i64) -> String {
    Local
        .timestamp_opt(t, 0)
        .single()
        .map_or_else(|| t.to_string(), |d| d.format("%Y-%m-%d %H:%M").to_string())
}

/// mod-ratelimit's own reading of its configuration, when the configuration has it.
fn ratelimit(config: &valvula_config::Config) -> anyhow::Result<Option<Inspect>> {
    let Some(section) = config.module_sections.get(inspect::NAMESPACE) else {
        return Ok(None);
    };
    let json = serde_json::to_string(section).context("[module.mod-ratelimit]")?;
    Inspect::from_section_json(&json)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("[module.mod-ratelimit]: {e}"))
}

/// [`ratelimit`], or `None` with a warning when the section is one the module would
/// refuse: the daemon then runs on its previous settings (a reload is refused), and that
/// is when an operator most needs `usage`; overrides still show and can be set.
fn ratelimit_or_warn(config: &valvula_config::Config) -> Option<Inspect> {
    ratelimit(config).unwrap_or_else(|e| {
        eprintln!("WARNING: {e:#}; mod-ratelimit limits show from override rows only");
        None
    })
}

/// The limits mod-ratelimit applies to a policy's identity: its override row's, else
/// the configured ones (the module decides which).
fn ratelimit_limits(rl: Option<&Inspect>, s: &Store, policy: &str, identity: &str) -> Vec<Window> {
    let row = s
        .query(Stmt::new(
            inspect::OVERRIDE_LIMITS_QUERY,
            vec![policy.into(), identity.into()],
        ))
        .ok();
    let limits = row
        .as_ref()
        .and_then(|r| match r.rows.first().map(|r| &r[0]) {
            Some(Value::Text(l)) => Some(l.as_str()),
            _ => None,
        });
    match rl {
        Some(rl) => rl
            .effective_limits(policy, identity, limits)
            .unwrap_or_default(),
        // Without the module's settings, an override row still says its limits.
        None => limits
            .and_then(|l| inspect::parse_override_limits(l).ok())
            .unwrap_or_default(),
    }
}

pub fn usage(config: &Path, identity: Option<&str>) -> anyhow::Result<()> {
    let rl = ratelimit_or_warn(&valvula_config::load_file(config)?.config);
    open(config, |s| {
        let now = valvula_store::Clock::system().now();
        let mut shown = 0;
        // mod-ticket.
        let tickets = match identity {
            Some(i) => s.query(Stmt::new(
                "SELECT t.id, t.sasl_user, t.domain, t.total_used, t.current_day_usage, t.current_month_usage, \
                 p.total_limit, p.day_limit, p.month_limit, t.valid_until, t.block_ticket FROM domain_ticket t \
                 LEFT JOIN ticket_plan p ON p.id = t.ticket_plan_id \
                 WHERE LOWER(t.sasl_user) = LOWER(?) OR LOWER(t.domain) = LOWER(?) \
                 OR INSTR(LOWER(t.sasl_user), LOWER(?)) > 0 OR INSTR(LOWER(t.domain), LOWER(?)) > 0 ORDER BY t.id",
                vec![i.into(), i.into(), i.into(), i.into()],
            )),
            None => s.query(Stmt::new(
                "SELECT t.id, t.sasl_user, t.domain, t.total_used, t.current_day_usage, t.current_month_usage, \
                 p.total_limit, p.day_limit, p.month_limit, t.valid_until, t.block_ticket FROM domain_ticket t \
                 LEFT JOIN ticket_plan p ON p.id = t.ticket_plan_id ORDER BY t.id",
                vec![],
            )),
        };
        if let Some(r) = absent_table_ok(tickets)? {
            let day_end = calendar_end(s, WindowKind::Day, now);
            let month_end = calendar_end(s, WindowKind::Month, now);
            for row in &r.rows {
                let who = match (&row[1], &row[2]) {
                    (Value::Text(u), _) if !u.is_empty() => format!("user {u}"),
                    (_, Value::Text(d)) => format!("domain {d}"),
                    _ => "?".into(),
                };
                println!(
                    "mod-ticket #{} {who}{}{}",
                    int(&row[0]),
                    if int(&row[10]) != 0 { " BLOCKED" } else { "" },
                    match int(&row[9]) {
                        -1 => String::new(),
                        t if t < now => format!(" EXPIRED ({})", when(t)),
                        t => format!(" valid until {}", when(t)),
                    }
                );
                for (name, used, limit, reset) in [
                    ("total", int(&row[3]), int(&row[6]), None),
                    ("day", int(&row[4]), int(&row[7]), Some(day_end)),
                    ("month", int(&row[5]), int(&row[8]), Some(month_end)),
                ] {
                    println!("  {}", line(name, used, limit, reset));
                }
                shown += 1;
            }
        }
        // mod-ratelimit.
        if let Some(r) = absent_table_ok(s.query(Stmt::new(
            // Sliding windows on SQLite have buckets only, no counter row.
            "SELECT ckey, win FROM vlv_counter WHERE ns = ? \
             UNION SELECT ckey, win FROM vlv_slide WHERE ns = ? ORDER BY ckey, win",
            vec![inspect::NAMESPACE.into(), inspect::NAMESPACE.into()],
        )))? {
            for row in &r.rows {
                let (Value::Text(key), Value::Text(win)) = (&row[0], &row[1]) else {
                    continue;
                };
                let Some((policy, ident)) = inspect::parse_counter_key(key) else {
                    continue;
                };
                if identity.is_some_and(|i| !inspect::bare_identity(ident).eq_ignore_ascii_case(i))
                {
                    continue;
                }
                let Some(kind) = WindowKind::from_id(win) else {
                    continue;
                };
                let p = s.peek(
                    inspect::NAMESPACE,
                    key,
                    0,
                    &[Window { kind, limit: -1 }],
                    now,
                )?;
                let limit = ratelimit_limits(rl.as_ref(), s, policy, ident)
                    .into_iter()
                    .find(|w| w.kind == kind)
                    .map_or(-1, |w| w.limit);
                let w = p.windows[0];
                println!("mod-ratelimit {policy} {ident}");
                println!(
                    "  {}",
                    line(&kind.to_string(), w.used, limit, Some(w.resets_at))
                );
                shown += 1;
            }
        }
        if shown == 0 {
            println!(
                "INFO: no usage{}",
                identity.map(|i| format!(" for {i}")).unwrap_or_default()
            );
        }
        Ok(())
    })
}

fn calendar_end(s: &Store, kind: WindowKind, now: i64) -> i64 {
    kind.span(s.zone(), now).1
}

fn line(name: &str, used: i64, limit: i64, reset: Option<i64>) -> String {
    let lim = if limit > 0 {
        limit.to_string()
    } else {
        "unlimited".into()
    };
    let rem = if limit > 0 {
        (limit - used).max(0).to_string()
    } else {
        "-".into()
    };
    let r = reset
        .map(|t| format!(", resets {}", when(t)))
        .unwrap_or_default();
    format!("{name:<8} used {used} / {lim}, remaining {rem}{r}")
}

pub fn reset(config: &Path, identity: &str) -> anyhow::Result<()> {
    open(config, |s| {
        let mut n = 0u64;
        if let Some(t) = absent_table_ok(s.exec(Stmt::new(
            "UPDATE domain_ticket SET current_day_usage = 0, current_month_usage = 0 \
             WHERE LOWER(sasl_user) = LOWER(?) OR LOWER(domain) = LOWER(?)",
            vec![identity.into(), identity.into()],
        )))? {
            n += t.affected;
        }
        if let Some(r) = absent_table_ok(s.query(Stmt::new(
            "SELECT ckey FROM vlv_counter WHERE ns = ? UNION SELECT ckey FROM vlv_slide WHERE ns = ?",
            vec![inspect::NAMESPACE.into(), inspect::NAMESPACE.into()],
        )))? {
            for row in &r.rows {
                if let Value::Text(key) = &row[0]
                    && inspect::parse_counter_key(key).is_some_and(|(_, i)| {
                        inspect::bare_identity(i).eq_ignore_ascii_case(identity)
                    })
                {
                    n += s.reset(inspect::NAMESPACE, key)?;
                }
            }
        }
        if n == 0 {
            bail!("nothing counted for {identity}");
        }
        println!(
            "INFO: counters of {identity} reset (day and month of its tickets, every rate-limit window)"
        );
        Ok(())
    })
}
