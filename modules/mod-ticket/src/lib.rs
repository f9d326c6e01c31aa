//! mod-ticket: valvula's ticket plans, as a drop-in on the same tables.
//!
//! A ticket (`domain_ticket` row) belongs to a SASL user, a sender domain, or a
//! comma-separated list of either, and points at a plan (`ticket_plan`) with a total, a
//! day and a month limit (`-1`, `0` or NULL: no limit). Every request of a known sender
//! is checked and, when every limit admits `n` units (`recipient_count`, or 1), charged
//! `n` on all three counters. Replies and their texts are valvula's, byte for byte.
//!
//! Fixed where valvula is wrong (each tested):
//! - the charge is one conditional UPDATE (`used + n <= limit` in its WHERE clause), so
//!   no update is lost and several daemons on one database stay exact;
//! - a list row is charged only when one of its items is the identity (compared
//!   case-insensitively), never because of a substring match; `_`, `%` and `#` are
//!   literal;
//! - an empty SASL user or sender domain is no identity;
//! - a negative or non-numeric `recipient_count` counts as 1, never as a credit;
//! - `filter` is never sent without a transport;
//! - `charge_states` limits charging to the named `protocol_state`s, so a listener
//!   hooked into two stages does not count a message twice.

#![forbid(unsafe_code)]

mod absent;
mod rollover;
mod schema;

// Requests allocate many small short-lived values; glibc's malloc and free were a
// quarter of a charged request's instructions (BENCHMARKS.md). A module has its own
// allocator: nothing allocated here is freed by the daemon, or the other way round.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, RwLock};

use serde::Deserialize;
use valvula_module::{
    Dialect, Error, Host, Module, Request, RunBlocking, Ticks, Value, Verdict, export_module,
};

#[derive(Deserialize, Clone, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// `protocol_state`s whose requests are charged; empty: every request (valvula).
    /// Requests in other states are checked the same way but not charged.
    charge_states: Vec<String>,
    /// Time zone of the day and month rollover: a zone name, or `local` (the system's,
    /// as valvula); unset: the daemon's `[storage] time_zone`.
    time_zone: Option<String>,
    /// Log the lookup steps of every request.
    debug: bool,
    /// Apply tickets to authenticated (SASL) requests only. valvula applies domain
    /// tickets to any request whose sender names the domain, so where the listener
    /// also sees inbound mail, a stranger forging a customer's domain uses up its
    /// ticket. Off by default (valvula's behaviour).
    authenticated_only: bool,
}

struct Settings {
    charge_states: Vec<String>,
    zone: valvula_calendar::Zone,
    debug: bool,
    authenticated_only: bool,
}

fn settings(host: &Host) -> Result<Settings, Error> {
    let c: Config = host.config()?;
    Ok(Settings {
        charge_states: c
            .charge_states
            .iter()
            .map(|s| s.to_ascii_uppercase())
            .collect(),
        zone: rollover::zone(c.time_zone.as_deref(), host)?,
        debug: c.debug,
        authenticated_only: c.authenticated_only,
    })
}

struct Ticket {
    host: Host,
    settings: RwLock<Settings>,
    /// The tables exist and the database's rollover zone agrees with ours.
    prepared: AtomicBool,
    /// When the day checked last ends: the first request at or after it rolls over.
    day_ends_at: AtomicI64,
    /// One rollover check at a time in this daemon; the other requests wait for it
    /// rather than charge into a day that is about to be reset.
    rolling: Mutex<()>,
    /// One preparation of the tables at a time.
    preparing: Mutex<()>,
    /// Senders known to have no ticket (SQLite), until `domain_ticket` changes.
    absent: absent::Absent,
}

/// The columns of a ticket row this module reads, in this order.
const TICKET_COLUMNS: &str = "id, total_used, current_day_usage, current_month_usage, valid_until, \
                              ticket_plan_id, block_ticket, has_outgoing_ip, outgoing_ip_id";
/// The same columns of `domain_ticket t` (its id as `tid`).
const TICKET_COLUMNS_T: &str = "t.id AS tid, t.total_used, t.current_day_usage, \
     t.current_month_usage, t.valid_until, t.ticket_plan_id, t.block_ticket, \
     t.has_outgoing_ip, t.outgoing_ip_id";

/// A `domain_ticket` row; NULL numbers read as 0, as valvula reads them.
#[derive(Debug, Clone, Default)]
struct Row {
    id: i64,
    total: i64,
    day: i64,
    month: i64,
    valid_until: i64,
    plan_id: i64,
    block: i64,
    has_outgoing_ip: i64,
    outgoing_ip_id: i64,
}

fn num(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

impl Row {
    fn from(cells: &[Value]) -> Row {
        Row {
            id: num(&cells[0]),
            total: num(&cells[1]),
            day: num(&cells[2]),
            month: num(&cells[3]),
            valid_until: num(&cells[4]),
            plan_id: num(&cells[5]),
            block: num(&cells[6]),
            has_outgoing_ip: num(&cells[7]),
            outgoing_ip_id: num(&cells[8]),
        }
    }
}

/// How the row was found: exact matches print `<unknown>` in the block message, list
/// matches the identity (valvula's "descriptive" name).
struct Found {
    row: Row,
    /// The plan's (total, day, month) limits; `None` when the plan does not exist.
    plan: Option<(i64, i64, i64)>,
    descriptive: Option<String>,
}

#[derive(Clone, Copy)]
enum Column {
    SaslUser,
    Domain,
}

impl Column {
    fn name(self) -> &'static str {
        match self {
            Column::SaslUser => "sasl_user",
            Column::Domain => "domain",
        }
    }
}

/// The (total, day, month) limits of a candidate row's plan; `None` when the plan does
/// not exist (the LEFT JOIN found no row).
fn plan_of(c: &[Value]) -> Option<(i64, i64, i64)> {
    (!c[11].is_null()).then(|| (num(&c[12]), num(&c[13]), num(&c[14])))
}

/// `n`: the recipients of the request, or 1 (never 0, never negative).
fn units(req: &Request<'_>) -> i64 {
    req.get("recipient_count")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
        // No message has more recipients (Postfix's smtpd_recipient_limit is 1000), and
        // valvula's counters are INT: a hostile count must be refused by the limits,
        // not overflow the arithmetic of the charge into an SQL error.
        .min(MAX_UNITS)
}

/// The most recipients one request is charged for.
const MAX_UNITS: i64 = 1_000_000;

/// What a charge did.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Charged {
    Now,
    Refused,
    /// Charged by an earlier run of the same request (Postfix re-sent it).
    Before,
}

impl Ticket {
    /// The ticket rows that may apply, with their plan joined in: the exact matches
    /// (`lists` false) or the list rows whose column contains `ident` as a substring
    /// (`lists` true), in valvula's order of precedence (the SASL user's, then the
    /// domain's; lowest id first). One query, one round trip, for both identities.
    ///
    /// With `generation` (the exact matches only), the memory's generation row comes
    /// first, read in the same snapshot (absent.rs): a request costs no extra query.
    async fn candidates(
        &self,
        req: &Request<'_>,
        user: Option<&str>,
        domain: Option<&str>,
        lists: bool,
        generation: Option<&str>,
    ) -> Result<Vec<Vec<Value>>, Error> {
        // Exact matches are case-insensitive on both backends, as valvula's MySQL
        // collation makes them.
        let nocase = if self.host.dialect() == Dialect::Sqlite {
            " COLLATE NOCASE"
        } else {
            ""
        };
        let mut branches = Vec::new();
        let mut params: Vec<Value> = Vec::new();
        for (pri, col, ident) in [(1, Column::SaslUser, user), (2, Column::Domain, domain)] {
            let Some(ident) = ident else {
                continue;
            };
            let c = col.name();
            let (list, cond) = if lists {
                (
                    format!("t.{c}"),
                    format!("INSTR(LOWER(t.{c}), LOWER(?)) > 0"),
                )
            } else {
                ("NULL".to_owned(), format!("t.{c} = ?{nocase}"))
            };
            branches.push(format!(
                "SELECT {TICKET_COLUMNS_T}, {list} AS list, {pri} AS pri, p.id AS pid, \
                 p.total_limit, p.day_limit, p.month_limit \
                 FROM domain_ticket t LEFT JOIN ticket_plan p ON p.id = t.ticket_plan_id \
                 WHERE {cond}"
            ));
            params.push(ident.into());
        }
        if branches.is_empty() {
            return Ok(Vec::new());
        }
        branches.extend(generation.map(str::to_owned));
        let sql = format!("{} ORDER BY pri, tid", branches.join(" UNION ALL "));
        Ok(self.host.query_async(req, &sql, &params).await?.rows)
    }

    /// valvula's precedence: exact SASL user, exact domain, SASL list, domain list;
    /// with the ticket's plan limits (`None`: no such plan). A sender found without
    /// any is remembered until `domain_ticket` changes (absent.rs): its list rows are
    /// not searched again meanwhile.
    async fn find(
        &self,
        req: &Request<'_>,
        user: Option<&str>,
        domain: Option<&str>,
    ) -> Result<Option<Found>, Error> {
        let exact_match = |c: &Vec<Value>| Found {
            row: Row::from(c),
            plan: plan_of(c),
            descriptive: None,
        };
        match self.absent.hint(user, domain) {
            absent::Hint::Absent => {
                // One small read answers the common case: still no ticket.
                if let Some(seen) = self.absent.read_generation(&self.host, req).await
                    && self.absent.known_absent(seen, user, domain)
                {
                    return Ok(None);
                }
            }
            absent::Hint::Present => {
                if let Some(c) = self
                    .candidates(req, user, domain, false, None)
                    .await?
                    .first()
                {
                    return Ok(Some(exact_match(c)));
                }
                self.absent.set_present(user, domain, false);
            }
            absent::Hint::Unknown => {}
        }
        let (exact, seen) = match self.absent.probe() {
            Some(probe) => {
                match self
                    .candidates(req, user, domain, false, Some(absent::GENERATION_BRANCH))
                    .await
                {
                    Ok(mut rows) => {
                        let reading = absent::take_generation(&mut rows);
                        (rows, self.absent.observe(probe, reading))
                    }
                    // The generation row went away (or the database): without it.
                    Err(_) => {
                        self.absent.observe(probe, None);
                        (self.candidates(req, user, domain, false, None).await?, None)
                    }
                }
            }
            None => {
                let seen = self.absent.verify(&self.host, req, self.host.now()).await;
                (self.candidates(req, user, domain, false, None).await?, seen)
            }
        };
        if let Some(c) = exact.first() {
            self.absent.set_present(user, domain, true);
            return Ok(Some(exact_match(c)));
        }
        let found = self.in_lists(req, user, domain).await?;
        if let Some(seen) = seen
            && found.is_none()
        {
            self.absent.remember(seen, user, domain);
        }
        Ok(found)
    }

    /// The first list row naming the SASL user or the domain.
    async fn in_lists(
        &self,
        req: &Request<'_>,
        user: Option<&str>,
        domain: Option<&str>,
    ) -> Result<Option<Found>, Error> {
        // valvula names the SASL user when there is one, else the domain.
        let descriptive = user.or(domain).map(str::to_owned);
        for c in self.candidates(req, user, domain, true, None).await? {
            let ident = if num(&c[10]) == 1 { user } else { domain };
            let list = c[9].as_str().unwrap_or("");
            if let Some(ident) = ident
                && list
                    .split(',')
                    .any(|item| item.trim().eq_ignore_ascii_case(ident))
            {
                return Ok(Some(Found {
                    row: Row::from(&c),
                    plan: plan_of(&c),
                    descriptive,
                }));
            }
        }
        Ok(None)
    }

    /// valvula's reject text for the first limit `row + n` exceeds, if any.
    fn over(row: &Row, n: i64, (total, day, month): (i64, i64, i64)) -> Option<String> {
        if total > 0 && row.total + n > total {
            return Some(format!(
                "Rejecting operation because total plan limit's reached ({})",
                row.total + n
            ));
        }
        if day > 0 && row.day + n > day {
            return Some(format!(
                "Rejecting operation because day limit reached ({day})"
            ));
        }
        if month > 0 && row.month + n > month {
            return Some(format!(
                "Rejecting operation because month limit reached ({month})"
            ));
        }
        None
    }

    /// Adds `n` to the three counters if, in the database at that moment, every limit
    /// still admits it. One statement: exact under any concurrency. With a token (the
    /// request's `instance`, stage and recipient) the host runs it at most once, so a
    /// request Postfix re-sends after its policy timeout is not charged again.
    async fn charge(
        &self,
        req: &Request<'_>,
        id: i64,
        n: i64,
        (total, day, month): (i64, i64, i64),
        token: Option<&str>,
    ) -> Result<Charged, Error> {
        let sql = "UPDATE domain_ticket SET total_used = COALESCE(total_used, 0) + ?, \
             current_day_usage = COALESCE(current_day_usage, 0) + ?, \
             current_month_usage = COALESCE(current_month_usage, 0) + ? \
             WHERE id = ? \
             AND (? <= 0 OR COALESCE(total_used, 0) + ? <= ?) \
             AND (? <= 0 OR COALESCE(current_day_usage, 0) + ? <= ?) \
             AND (? <= 0 OR COALESCE(current_month_usage, 0) + ? <= ?)";
        let params = [
            n.into(),
            n.into(),
            n.into(),
            id.into(),
            total.into(),
            n.into(),
            total.into(),
            day.into(),
            n.into(),
            day.into(),
            month.into(),
            n.into(),
            month.into(),
        ];
        let e = match token {
            Some(t) => match self.host.exec_once_async(req, t, sql, &params).await? {
                Some(e) => e,
                None => return Ok(Charged::Before),
            },
            None => self.host.exec_async(req, sql, &params).await?,
        };
        Ok(if e.affected == 1 {
            Charged::Now
        } else {
            Charged::Refused
        })
    }

    async fn reload_row(&self, req: &Request<'_>, id: i64) -> Result<Option<Row>, Error> {
        let r = self
            .host
            .query_async(
                req,
                &format!("SELECT {TICKET_COLUMNS} FROM domain_ticket WHERE id = ?"),
                &[id.into()],
            )
            .await?;
        Ok(r.rows.first().map(|c| Row::from(c)))
    }

    /// DUNNO, or FILTER `<transport>:` when the ticket has an active outgoing IP.
    async fn dunno_or_filter(&self, req: &Request<'_>, row: &Row) -> Result<Verdict, Error> {
        if row.has_outgoing_ip == 0 || row.outgoing_ip_id <= 0 {
            return Ok(Verdict::dunno());
        }
        let r = self
            .host
            .query_async(
                req,
                "SELECT transport, is_active FROM outgoing_ip WHERE id = ?",
                &[row.outgoing_ip_id.into()],
            )
            .await?;
        let Some(cells) = r.rows.first() else {
            return Ok(Verdict::dunno());
        };
        if num(&cells[1]) == 0 {
            return Ok(Verdict::dunno());
        }
        match cells[0].as_str().map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => Ok(Verdict::filter(format!("{t}:"))),
            None => {
                // valvula sent "filter (null):"; Postfix would fail the mail on it.
                tracing::warn!(
                    ticket = row.id,
                    outgoing_ip = row.outgoing_ip_id,
                    "outgoing_ip has no transport; not filtering"
                );
                Ok(Verdict::dunno())
            }
        }
    }
}

/// The sender's domain: after the first `@`, or the whole sender (valvula's rule),
/// without trailing dots, a UUCP path `host!user` read as `user@host` (as Postfix does
/// with `swap_bangpath`); absent when the sender is missing or the domain is empty.
///
/// For an authenticated request whose sender names no domain (the null sender, or an
/// unqualified `alice`, which Postfix accepts as the login's own), the login's domain:
/// else the login's own mail would escape its domain's ticket.
fn sender_domain<'a>(sender: Option<&'a str>, user: Option<&'a str>) -> Option<&'a str> {
    let s = sender.map(str::trim).unwrap_or("");
    let d = match s.split_once('@') {
        Some((_, d)) => d,
        None if user.is_some() => user.and_then(|u| u.split_once('@')).map_or("", |(_, d)| d),
        None => s.split_once('!').map_or(s, |(host, _)| host),
    };
    let d = d.trim_end_matches('.');
    (!d.is_empty()).then_some(d)
}

fn decision_log(
    user: Option<&str>,
    domain: Option<&str>,
    row: Option<&Row>,
    limits: Option<(i64, i64, i64)>,
    n: i64,
    verdict: &Verdict,
    charged: bool,
) {
    let (t, d, m) = limits.unwrap_or((0, 0, 0));
    match row {
        None => tracing::debug!(
            sasl_user = user.unwrap_or(""),
            domain = domain.unwrap_or(""),
            "no ticket: dunno"
        ),
        Some(r) => tracing::info!(
            sasl_user = user.unwrap_or(""),
            domain = domain.unwrap_or(""),
            ticket = r.id,
            plan = r.plan_id,
            n,
            charged,
            total = format!("{}/{t}", r.total),
            day = format!("{}/{d}", r.day),
            month = format!("{}/{m}", r.month),
            action = %verdict.action,
            text = verdict.text.as_str(),
            "ticket decision"
        ),
    }
}

/// The database's rollover follows another calendar than this daemon's.
#[derive(Debug)]
struct ZoneMismatch(String);

impl std::fmt::Display for ZoneMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ZoneMismatch {}

impl Ticket {
    /// Creates the tables and checks the zone once (again after a failure or reload).
    /// Whether the tables are prepared and the day's rollover done: nothing to do
    /// before charging.
    fn ready_for(&self, now: i64) -> bool {
        self.prepared.load(Ordering::Acquire) && now < self.day_ends_at.load(Ordering::Acquire)
    }

    fn prepare(&self, zone: valvula_calendar::Zone, now: i64) -> Result<(), Error> {
        if self.prepared.load(Ordering::Acquire) {
            return Ok(());
        }
        // One thread at a time: the others wait for it rather than all altering the
        // same tables at once (the losers' "duplicate column" errors were failures).
        let _one = self.preparing.lock().unwrap_or_else(|e| e.into_inner());
        if self.prepared.load(Ordering::Acquire) {
            return Ok(());
        }
        let added = schema::ensure(&self.host)?;
        if !added.is_empty() {
            tracing::info!(columns = ?added, "tables and columns created");
        }
        self.absent.check(&self.host);
        if let rollover::ZoneCheck::Disagree(why) = rollover::agree_on_zone(&self.host, zone, now)?
        {
            tracing::error!("{why}");
            return Err(Box::new(ZoneMismatch(why)));
        }
        self.prepared.store(true, Ordering::Release);
        Ok(())
    }

    /// Rolls the day and month over when the clock passed the end of the day checked
    /// last: the first request of a new day is charged against the new day's counters,
    /// not refused by yesterday's (valvula notices within 2 s; a once-a-minute check
    /// left users at their day limit refused for up to a minute).
    fn roll_over_if_due(&self, zone: valvula_calendar::Zone, now: i64) -> Result<(), Error> {
        self.prepare(zone, now)?;
        if now < self.day_ends_at.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.rolling.lock().unwrap_or_else(|e| e.into_inner());
        if now < self.day_ends_at.load(Ordering::Acquire) {
            return Ok(());
        }
        rollover::check(&self.host, zone, now)?;
        let (_, end) = zone.period(valvula_calendar::Period::Day, now);
        self.day_ends_at.store(end, Ordering::Release);
        Ok(())
    }
}

impl Module for Ticket {
    // Requests wait for the database on the daemon's event loop (ABI 0.5), not on a
    // worker thread each.
    const ASYNC: bool = true;

    fn init(host: Host) -> Result<Self, Error> {
        let settings = settings(&host)?;
        if host.dialect() == Dialect::None {
            return Err(
                "mod-ticket needs the daemon's storage ([storage] in valvulad.toml)".into(),
            );
        }
        let zone = settings.zone;
        let t = Ticket {
            host,
            settings: RwLock::new(settings),
            prepared: AtomicBool::new(false),
            day_ends_at: AtomicI64::new(0),
            rolling: Mutex::new(()),
            preparing: Mutex::new(()),
            absent: absent::Absent::new(host.dialect()),
        };
        match t.roll_over_if_due(zone, t.host.now()) {
            Ok(()) => {}
            // Another calendar than the database's: refuse to start.
            Err(e) if e.downcast_ref::<ZoneMismatch>().is_some() => return Err(e),
            // The database may be down at start: the daemon runs on (fail open, as
            // valvula) and the first request or tick that reaches it prepares it.
            Err(e) => tracing::error!("cannot prepare the ticket tables now: {e}"),
        }
        Ok(t)
    }

    async fn process_async(&self, req: &Request<'_>) -> Result<Verdict, Error> {
        let (charge_here, debug, authenticated_only) = {
            let s = self.settings.read().map_err(|_| "poisoned")?;
            let state = req.protocol_state().unwrap_or("").to_ascii_uppercase();
            (
                s.charge_states.is_empty() || s.charge_states.contains(&state),
                s.debug,
                s.authenticated_only,
            )
        };
        // valvula's identities: the SASL user only when Postfix sent both SASL
        // attributes; an empty one is no identity.
        let user = req
            .get("sasl_method")
            .and(req.get("sasl_username"))
            .filter(|u| !u.is_empty());
        let domain = sender_domain(req.sender(), user);
        if debug {
            tracing::info!(
                "(ticket): starting check for sender-domain={}, sender-sasl={}",
                domain.unwrap_or("<no-sender-domain>"),
                user.unwrap_or("<no-sasl-user>")
            );
        }
        if (user.is_none() && domain.is_none()) || (authenticated_only && user.is_none()) {
            return Ok(Verdict::dunno());
        }
        let zone = self.settings.read().map_err(|_| "poisoned")?.zone;
        if req.polled() && !self.ready_for(self.host.now()) {
            // Preparing the tables or rolling the day over waits on locks and runs
            // transactions of its own: done on a worker thread, never on the event loop.
            return Err(RunBlocking.into());
        }
        self.roll_over_if_due(zone, self.host.now())?;
        let Some(found) = self.find(req, user, domain).await? else {
            decision_log(user, domain, None, None, 0, &Verdict::dunno(), false);
            return Ok(Verdict::dunno());
        };
        let row = &found.row;
        let now = self.host.now();
        let n = units(req);
        let reject = |text: String, limits: Option<(i64, i64, i64)>| {
            let v = Verdict::reject(text);
            decision_log(user, domain, Some(row), limits, n, &v, false);
            Ok(v)
        };
        if row.valid_until != -1 && now > row.valid_until {
            return reject(
                format!(
                    "Rejecting operation because tickets are expired (valid_until {} < {now})",
                    row.valid_until
                ),
                None,
            );
        }
        if row.block != 0 {
            return reject(
                format!(
                    "Rejecting operation because ticket ({}) is blocked({}) for user ({})",
                    row.plan_id,
                    row.block,
                    found.descriptive.as_deref().unwrap_or("<unknown>")
                ),
                None,
            );
        }
        let Some(limits) = found.plan else {
            // No plan: accepted without counting, as valvula does.
            let v = self.dunno_or_filter(req, row).await?;
            decision_log(user, domain, Some(row), None, n, &v, false);
            return Ok(v);
        };
        if !charge_here {
            if let Some(text) = Self::over(row, n, limits) {
                return reject(text, Some(limits));
            }
            let v = self.dunno_or_filter(req, row).await?;
            decision_log(user, domain, Some(row), Some(limits), n, &v, false);
            return Ok(v);
        }
        let charged = self
            .charge(req, row.id, n, limits, req.once_token("ticket").as_deref())
            .await?;
        if charged == Charged::Before {
            tracing::info!(
                ticket = row.id,
                instance = req.instance().unwrap_or(""),
                state = req.protocol_state().unwrap_or(""),
                "already charged for this request; not charged again"
            );
            let v = self.dunno_or_filter(req, row).await?;
            decision_log(user, domain, Some(row), Some(limits), 0, &v, false);
            return Ok(v);
        }
        if charged == Charged::Now {
            let charged = Row {
                total: row.total + n,
                day: row.day + n,
                month: row.month + n,
                ..row.clone()
            };
            let v = self.dunno_or_filter(req, row).await?;
            decision_log(user, domain, Some(&charged), Some(limits), n, &v, true);
            return Ok(v);
        }
        // Refused by the database: tell which limit, from the counters as they are now.
        let current = self
            .reload_row(req, row.id)
            .await?
            .unwrap_or_else(|| row.clone());
        let text = Self::over(&current, n, limits)
            .unwrap_or_else(|| "Rejecting operation because day limit reached (0)".to_owned());
        let v = Verdict::reject(text);
        decision_log(user, domain, Some(&current), Some(limits), n, &v, false);
        Ok(v)
    }

    fn reconf(&self) -> Result<(), Error> {
        let s = settings(&self.host)?;
        let zone_changed = self.settings.read().map_or(true, |old| old.zone != s.zone);
        if zone_changed {
            // Refuse a zone the database's rollover does not follow, keeping the old
            // settings (a database away now is checked again by the next request).
            if let Ok(rollover::ZoneCheck::Disagree(why)) =
                rollover::agree_on_zone(&self.host, s.zone, self.host.now())
            {
                return Err(why.into());
            }
        }
        *self.settings.write().map_err(|_| "poisoned")? = s;
        if zone_changed {
            // Check the new zone against the database and the date in it.
            self.prepared.store(false, Ordering::Release);
            self.day_ends_at.store(0, Ordering::Release);
        }
        Ok(())
    }

    fn tick(&self, ticks: Ticks, now: i64) {
        if !ticks.minute() {
            return;
        }
        let zone = match self.settings.read() {
            Ok(s) => s.zone,
            Err(_) => return,
        };
        // Also a rollover made stale by hand (time_tracking edited), or one a failure
        // left undone: compare with the database every minute.
        self.day_ends_at.store(0, Ordering::Release);
        if let Err(e) = self.roll_over_if_due(zone, now) {
            tracing::warn!(
                "day/month rollover check failed, retried by the next request or minute: {e}"
            );
        }
        // Triggers dropped or taken away with a renamed table: made again here, where
        // waiting for the write lock delays no request.
        self.absent.check(&self.host);
    }
}

export_module!(
    Ticket,
    name = "mod-ticket",
    description =
        "valvula ticket plans: total, day and month limits per SASL user or sender domain"
);
