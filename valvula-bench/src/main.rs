//! valvula-bench: load for Postfix policy servers, as Postfix makes it.
//!
//! `valvula-bench run --target 127.0.0.1:3579 --connections 64 --duration 10` keeps 64
//! connections open (Postfix's smtpd processes each hold one) and sends requests one
//! after the other on each, like Postfix: realistic RCPT, DATA or END-OF-MESSAGE
//! attributes, SASL users chosen uniformly or Zipf-distributed among N identities.
//! It reports requests per second, latency percentiles, the count of each action
//! returned, and errors (`--json` for scripts).
//!
//! `valvula-bench serve-dunno --listen 127.0.0.1:3580` is the ceiling: a server that
//! parses each request with the same codec as valvulad and answers `dunno`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(
    name = "valvula-bench",
    version,
    about = "Load generator for Postfix policy servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send load to a policy server.
    Run(RunArgs),
    /// Open idle connections, hold them, then check each still gets an answer.
    Hold {
        #[arg(long, default_value = "127.0.0.1:3579")]
        target: String,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Seconds to hold them idle.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// The ceiling: parse each request and answer dunno.
    ServeDunno {
        #[arg(long, default_value = "127.0.0.1:3580")]
        listen: String,
        /// Worker threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Stage {
    Rcpt,
    Data,
    Eod,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[arg(long, default_value = "127.0.0.1:3579")]
    target: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of load (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load not measured first.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Stop each connection after this many requests (0: run for --duration).
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// The stage the requests come from.
    #[arg(long, value_enum, default_value = "data")]
    stage: Stage,
    /// Distinct SASL users (user0@example.com ...).
    #[arg(long, default_value_t = 1000)]
    identities: usize,
    /// Zipf exponent for choosing identities (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    zipf: f64,
    /// Take identities in turn (0, 1, 2, ...) instead of at random: N requests charge
    /// N distinct identities (with --identities N).
    #[arg(long)]
    sequential: bool,
    /// Recipients per message (recipient_count at DATA and END-OF-MESSAGE).
    #[arg(long, default_value_t = 1)]
    rcpts: u32,
    /// One connection per request instead of keep-alive.
    #[arg(long)]
    new_connection: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// The server's process: report its context switches and CPU time per request over
    /// the measured window (from /proc), figures that hold on a noisy machine.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// What the server spent, from /proc: context switches of all its threads, and CPU time.
#[derive(Clone, Copy, Debug, Default)]
struct Cost {
    switches: u64,
    cpu_s: f64,
}

/// Linux reports utime and stime in USER_HZ ticks, 100 a second on every architecture's
/// user ABI.
const USER_HZ: f64 = 100.0;

fn cost_of(pid: u32) -> anyhow::Result<Cost> {
    let mut switches = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end while it is read: its switches are then not counted.
        let status = std::fs::read_to_string(t?.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    // utime and stime of the whole thread group (ended threads included): the 14th and
    // 15th fields, counted after the parenthesised command name, which may hold spaces.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: no command name"))?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(f.get(i)
            .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: short"))?
            .parse::<f64>()?)
    };
    // After ")": field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    Ok(Cost {
        switches,
        cpu_s: (ticks(11)? + ticks(12)?) / USER_HZ,
    })
}

/// xorshift64*: fast, seedable, plenty for choosing identities.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Chooses identity indexes uniformly or by a Zipf law (precomputed CDF).
struct Chooser {
    n: usize,
    cdf: Option<Vec<f64>>,
    /// `--sequential`: the next identity to hand out.
    turn: Option<std::sync::atomic::AtomicUsize>,
}

impl Chooser {
    fn new(n: usize, s: f64) -> Chooser {
        if s <= 0.0 {
            return Chooser {
                n,
                cdf: None,
                turn: None,
            };
        }
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Chooser {
            n,
            cdf: Some(cdf),
            turn: None,
        }
    }
    fn sequential(n: usize) -> Chooser {
        Chooser {
            n,
            cdf: None,
            turn: Some(std::sync::atomic::AtomicUsize::new(0)),
        }
    }
    fn pick(&self, r: &mut Rng) -> usize {
        if let Some(t) = &self.turn {
            return t.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.n;
        }
        match &self.cdf {
            None => (r.next() % self.n as u64) as usize,
            Some(cdf) => {
                let u = r.unit();
                cdf.partition_point(|c| *c < u).min(self.n - 1)
            }
        }
    }
}

/// The bytes of a request for one identity, up to its (per request) instance value.
fn template(stage: Stage, id: usize, rcpts: u32) -> Vec<u8> {
    let (state, rcpt, count, size) = match stage {
        Stage::Rcpt => ("RCPT", "rcpt@example.net", 0, 0),
        Stage::Data => ("DATA", "", rcpts, 0),
        Stage::Eod => ("END-OF-MESSAGE", "", rcpts, 2819),
    };
    let user = format!("user{id}@example.com");
    let mut s = String::new();
    for (k, v) in [
        ("request", "smtpd_access_policy"),
        ("protocol_state", state),
        ("protocol_name", "ESMTP"),
        ("client_address", "192.0.2.10"),
        ("client_name", "client.example.net"),
        ("client_port", "40502"),
        ("reverse_client_name", "client.example.net"),
        ("server_address", "192.0.2.1"),
        ("server_port", "587"),
        ("helo_name", "client.example.net"),
        ("sender", &user),
        ("recipient", rcpt),
        ("recipient_count", &count.to_string()),
        ("queue_id", "4XyZ1B2C3D"),
        ("size", &size.to_string()),
        ("etrn_domain", ""),
        ("stress", ""),
        ("sasl_method", "PLAIN"),
        ("sasl_username", &user),
        ("sasl_sender", ""),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", "TLSv1.3"),
        ("encryption_cipher", "TLS_AES_256_GCM_SHA384"),
        ("encryption_keysize", "256"),
        ("policy_context", ""),
    ] {
        s.push_str(k);
        s.push('=');
        s.push_str(v);
        s.push('\n');
    }
    s.push_str("instance=");
    s.into_bytes()
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    actions: BTreeMap<String, u64>,
    errors: u64,
}

async fn connection(
    args: Arc<RunArgs>,
    templates: Arc<Vec<Vec<u8>>>,
    chooser: Arc<Chooser>,
    conn: usize,
    start: Instant,
) -> Tally {
    let mut t = Tally::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((conn as u64 + 1) * 0x1000_0001));
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(2048);
    let mut reply = BytesMut::with_capacity(256);
    let mut n: u64 = 0;
    loop {
        let now = Instant::now();
        if (args.requests == 0 && now >= end) || (args.requests > 0 && n >= args.requests) {
            break;
        }
        if stream.is_none() {
            match TcpStream::connect(&args.target).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stream = Some(s);
                }
                Err(_) => {
                    t.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let s = stream.as_mut().expect("connected");
        buf.clear();
        buf.extend_from_slice(&templates[chooser.pick(&mut rng)]);
        // Unique across runs too: a daemon charges a re-sent instance only once.
        buf.extend_from_slice(format!("b{}.{conn}.{n}\n\n", run_id()).as_bytes());
        n += 1;
        let sent = Instant::now();
        let ok = async {
            s.write_all(&buf).await?;
            reply.clear();
            loop {
                if reply.windows(2).any(|w| w == b"\n\n") {
                    return Ok::<bool, std::io::Error>(true);
                }
                if s.read_buf(&mut reply).await? == 0 {
                    return Ok(false);
                }
            }
        }
        .await;
        match ok {
            Ok(true) => {
                if sent >= measure_from || args.requests > 0 {
                    t.latencies_us
                        .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    let text = String::from_utf8_lossy(&reply);
                    let action = text
                        .strip_prefix("action=")
                        .and_then(|a| a.split([' ', '\n']).next())
                        .unwrap_or("<no action>")
                        .to_ascii_lowercase();
                    *t.actions.entry(action).or_default() += 1;
                }
                if args.new_connection {
                    stream = None;
                }
            }
            _ => {
                t.errors += 1;
                stream = None;
            }
        }
    }
    t
}

/// This run's part of every `instance` value.
fn run_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    })
}

/// Opens `n` connections and sends nothing for `seconds`; then one request on each.
/// Prints how many were opened and how many answered afterwards.
async fn hold(target: String, n: usize, seconds: f64) -> anyhow::Result<()> {
    let mut open = Vec::with_capacity(n);
    let mut refused = 0usize;
    for _ in 0..n {
        match TcpStream::connect(&target).await {
            Ok(s) => open.push(s),
            Err(_) => refused += 1,
        }
    }
    eprintln!(
        "holding {} idle connections ({refused} refused)",
        open.len()
    );
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let request = template(Stage::Data, 0, 1);
    let mut answered = 0usize;
    for s in &mut open {
        let mut buf = request.clone();
        buf.extend_from_slice(format!("h{}\n\n", run_id()).as_bytes());
        let mut reply = [0u8; 256];
        let ok = tokio::time::timeout(Duration::from_secs(5), async {
            s.write_all(&buf).await?;
            let n = s.read(&mut reply).await?;
            Ok::<bool, std::io::Error>(n > 0 && reply.starts_with(b"action="))
        })
        .await;
        if matches!(ok, Ok(Ok(true))) {
            answered += 1;
        }
    }
    println!(
        "{}",
        serde_json::json!({"opened": open.len(), "refused": refused, "answered_after_hold": answered})
    );
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let templates: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..args.identities.max(1))
            .map(|i| template(args.stage, i, args.rcpts))
            .collect(),
    );
    let chooser = Arc::new(if args.sequential {
        Chooser::sequential(args.identities.max(1))
    } else {
        Chooser::new(args.identities.max(1), args.zipf)
    });
    let args = Arc::new(args);
    let start = Instant::now();
    // The server's cost at the start and the end of the measured window.
    let sampler = args.server_pid.map(|pid| {
        let a = args.clone();
        tokio::spawn(async move {
            if a.requests == 0 {
                tokio::time::sleep_until((start + Duration::from_secs_f64(a.warmup)).into()).await;
            }
            let before = cost_of(pid)?;
            if a.requests == 0 {
                tokio::time::sleep_until(
                    (start + Duration::from_secs_f64(a.warmup + a.duration)).into(),
                )
                .await;
            }
            anyhow::Ok(before)
        })
    });
    let tasks: Vec<_> = (0..args.connections)
        .map(|c| {
            tokio::spawn(connection(
                args.clone(),
                templates.clone(),
                chooser.clone(),
                c,
                start,
            ))
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await?;
        all.latencies_us.extend(t.latencies_us);
        all.errors += t.errors;
        for (a, n) in t.actions {
            *all.actions.entry(a).or_default() += n;
        }
    }
    let elapsed = if args.requests > 0 {
        start.elapsed().as_secs_f64()
    } else {
        args.duration
    };
    let server = match (sampler, args.server_pid) {
        (Some(s), Some(pid)) => {
            let before = s.await??;
            let after = cost_of(pid)?;
            Some(Cost {
                switches: after.switches.saturating_sub(before.switches),
                cpu_s: after.cpu_s - before.cpu_s,
            })
        }
        _ => None,
    };
    all.latencies_us.sort_unstable();
    let l = &all.latencies_us;
    let count = l.len() as u64;
    let per_request = server.map(|c| {
        let n = count.max(1) as f64;
        (c.switches as f64 / n, c.cpu_s * 1e6 / n)
    });
    let rps = count as f64 / elapsed;
    let p = |x| percentile(l, x) as f64 / 1000.0;
    if args.json {
        let v = serde_json::json!({
            "target": args.target, "connections": args.connections, "stage": format!("{:?}", args.stage).to_lowercase(),
            "new_connection": args.new_connection, "identities": args.identities, "zipf": args.zipf, "sequential": args.sequential,
            "requests": count, "seconds": elapsed, "requests_per_second": rps,
            "latency_ms": {"p50": p(50.0), "p90": p(90.0), "p99": p(99.0), "p99_9": p(99.9), "max": l.last().copied().unwrap_or(0) as f64 / 1000.0},
            "actions": all.actions, "errors": all.errors,
            "server": per_request.map(|(sw, us)| serde_json::json!({"switches_per_request": sw, "cpu_us_per_request": us})),
        });
        println!("{v}");
    } else {
        println!(
            "{count} requests in {elapsed:.1} s over {} connection(s): {rps:.0} requests/s",
            args.connections
        );
        println!(
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            p(50.0),
            p(90.0),
            p(99.0),
            p(99.9),
            l.last().copied().unwrap_or(0) as f64 / 1000.0
        );
        let actions: Vec<String> = all
            .actions
            .iter()
            .map(|(a, n)| format!("{a}={n}"))
            .collect();
        println!("actions: {}  errors: {}", actions.join(" "), all.errors);
        if let Some((sw, us)) = per_request {
            println!("server per request: {sw:.2} context switches, {us:.1} µs CPU");
        }
    }
    Ok(())
}

async fn serve_dunno(listen: String) -> anyhow::Result<()> {
    let l = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("serving dunno on {}", l.local_addr()?);
    loop {
        let (mut s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut dec = valvula_policy::Decoder::new(valvula_policy::Limits::default());
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(_)) => {
                        if s.write_all(b"action=dunno\n\n").await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(_) => return,
                }
                match s.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Cmd::Run(a) => a.threads,
        Cmd::ServeDunno { threads, .. } => *threads,
        Cmd::Hold { .. } => 1,
    };
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        b.worker_threads(threads);
    }
    let rt = b.enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Cmd::Run(a) => run(a).await,
            Cmd::ServeDunno { listen, .. } => serve_dunno(listen).await,
            Cmd::Hold {
                target,
                connections,
                seconds,
            } => hold(target, connections, seconds).await,
        }
    })
}
