//! `valvulad`: starts listeners from the config, loads modules, serves until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Parser};
use tokio::signal::unix::{SignalKind, signal};
use valvula_config::{self as config, Config};
use valvula_store::Store;

// glibc's malloc and free were a quarter of the instructions of a charged request
// (callgrind, BENCHMARKS.md): requests allocate many small short-lived values.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use valvulad::host;
use valvulad::server::Daemon;

#[derive(Parser, Debug)]
#[command(
    name = "valvulad",
    version,
    about = "Postfix policy daemon with loadable modules",
    disable_version_flag = true
)]
struct Args {
    /// Configuration file.
    #[arg(short = 'c', long = "config", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Check the configuration, load the modules and run their init, then exit.
    #[arg(short = 't', long = "check")]
    check: bool,
    /// Log at debug level whatever the config says.
    #[arg(short = 'd', long = "debug")]
    debug: bool,
    /// Print the version and exit.
    #[arg(short = 'v', long = "version", action = ArgAction::Version)]
    version: Option<bool>,
    /// Log every SQL statement (valvula's -q).
    #[arg(short = 'q', long = "debug-queries")]
    debug_queries: bool,
    /// Accepted for valvula compatibility: logs go to the console unless syslog is set.
    #[arg(short = 'o', long = "verbose")]
    verbose: bool,
    /// Check that the database answers, then exit (0, or 255 as valvula).
    #[arg(short = 'b', long = "check-db")]
    check_db: bool,
    /// Ask every listener of the configuration with valvula's checkserver probe, then
    /// exit (0, or 255 as valvula).
    #[arg(short = 'p', long = "pingserver")]
    ping: bool,
    /// Print the running daemon's status (from its admin socket), then exit.
    #[arg(short = 's', long = "status")]
    status: bool,
    /// Run in the background; returns once the daemon serves (writes /run/valvulad.pid
    /// unless --pid-file says otherwise).
    #[arg(long)]
    detach: bool,
    /// Write this pid file (refused while the pid in it is alive).
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Tell whether an address or domain is delivered by this mail server (as Postfix
    /// in --postfix-dir is configured), then exit (0, or 255 as valvula).
    #[arg(
        short = 'l',
        long = "is-local-destination",
        value_name = "ADDRESS|DOMAIN"
    )]
    local: Option<String>,
    /// Postfix's configuration directory, for -l.
    #[arg(long = "postfix-dir", default_value = "/etc/postfix")]
    postfix_dir: PathBuf,
    /// Start even if the pid file names a running process (valvula's -f).
    #[arg(short = 'f', long = "skip-pid-check")]
    skip_pid_check: bool,
    /// Serve in this one process, without the master that restarts it when a module
    /// crashes it (for debuggers and valgrind).
    #[arg(long = "single-process")]
    single_process: bool,
}

fn main() -> ExitCode {
    // First of all in a worker: the crash reporter, and death with the master.
    let worker = valvulad::supervisor::worker::link().is_some();
    let raw: Vec<String> = std::env::args().collect();
    let args = Args::parse();
    if args.detach && std::env::var_os(valvulad::process::DETACHED_ENV).is_none() {
        let mut raw = raw;
        if args.pid_file.is_none() {
            raw.push("--pid-file".into());
            raw.push(valvulad::process::DEFAULT_PID_FILE.into());
        }
        return match valvulad::process::detach(&raw) {
            Ok(pid) => {
                println!("valvulad running in the background as pid {pid}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("valvulad: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    if std::env::var_os(valvulad::process::DETACHED_ENV).is_some() && !worker {
        valvulad::process::become_detached();
    }
    if let Some(what) = &args.local {
        return match valvulad::process::local_destination(&args.postfix_dir, what) {
            Ok(valvulad::process::Local::Address) => {
                println!("INFO: {what} is a local address");
                ExitCode::SUCCESS
            }
            Ok(valvulad::process::Local::Domain) => {
                println!("INFO: {what} is a local domain");
                ExitCode::SUCCESS
            }
            Ok(valvulad::process::Local::No) => {
                println!("ERROR: {what} is not a local domain nor a local address");
                ExitCode::from(255)
            }
            Err(e) => {
                println!("ERROR: {e:#}");
                ExitCode::from(255)
            }
        };
    }
    if args.ping || args.check_db || args.status {
        return one_shot(&args);
    }
    match run(args, raw, worker) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("valvulad: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// valvula's -p, -b and -s: exit 0 on success, 255 on failure, as valvula does.
fn one_shot(args: &Args) -> ExitCode {
    let fail = |msg: String| {
        println!("{msg}");
        ExitCode::from(255)
    };
    let loaded = match config::load_file(&args.config) {
        Ok(l) => l,
        Err(e) => return fail(format!("ERROR: Failed to load configuration file: {e}")),
    };
    if args.ping {
        return match valvulad::process::ping(&loaded.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    if args.status {
        let Some(sock) = &loaded.config.server.admin_socket else {
            return fail("ERROR: no admin socket configured".into());
        };
        let r = std::os::unix::net::UnixStream::connect(sock).and_then(|mut s| {
            use std::io::{Read, Write};
            s.write_all(b"status\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
        return match r {
            Ok(out) => {
                println!("{}", out.trim_end());
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!(
                "ERROR: valvulad is not running ({}: {e})",
                sock.display()
            )),
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("ERROR: {e}")),
    };
    // A check writes nothing (no database file, table or zone) and copies nothing.
    let ok = Store::check_reachable(&loaded.config.storage, rt.handle().clone());
    match ok {
        Ok(()) => {
            println!("INFO: Database connection working OK");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!(
            "ERROR: Database connection isn't working. Please check database server and/or credentials ({e})"
        )),
    }
}

/// The configuration this process starts with: the file, or in a restarted worker the
/// configuration the previous worker ran (a restart is not a reload).
fn start_config(path: &std::path::Path) -> Result<config::Loaded, config::ConfigError> {
    match valvulad::supervisor::worker::link().and_then(|l| l.start_config()) {
        Some(text) => config::load_text(text, path),
        None => config::load_file(path),
    }
}

fn run(args: Args, raw: Vec<String>, worker: bool) -> anyhow::Result<()> {
    // Logging needs the config; a broken config is reported on stderr as is.
    let pre = start_config(&args.config)?;
    let level = if args.debug {
        Some("debug")
    } else if args.debug_queries {
        Some("info,valvulad::sql=debug")
    } else {
        None
    };
    // A check reports on the terminal that ran it, whatever the file says (syslog
    // would hide why a module's init failed).
    let log = if args.check {
        valvula_config::LogConfig {
            target: valvula_config::LogTarget::Stderr,
            ..pre.config.log.clone()
        }
    } else {
        pre.config.log.clone()
    };
    valvulad::logging::init(&log, level).context("cannot set up logging")?;
    // The master's, when there is one: signals go to the master.
    let _pid = match &args.pid_file {
        Some(p) if !args.check && !worker => {
            Some(valvulad::process::PidFile::create(p, args.skip_pid_check)?)
        }
        _ => None,
    };
    let files = valvulad::process::raise_open_files();
    tracing::debug!(limit = files, "open files");
    if !args.check && !args.single_process && !worker {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let master = valvulad::supervisor::master::MasterArgs {
            args: raw,
            config_path: args.config.clone(),
        };
        return runtime.block_on(async {
            // Bound here, before the worker starts (and as whoever started us): the
            // master keeps them open across workers.
            let mut held = Vec::new();
            for l in &pre.config.listeners {
                let f = valvulad::server::bind_held(l).await?;
                held.push((valvulad::supervisor::listen_key(&l.name, &l.address), f));
            }
            valvulad::supervisor::master::run(master, &pre.config, held).await
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("valvulad")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(serve(args));
    // Do not wait for module calls that hang: they are abandoned, as their requests were.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Opens the store and says loudly whether the database answers. The daemon starts
/// either way: requests that need the database get the on-error action until it is back.
async fn open_store(
    config: &Config,
    check: bool,
) -> anyhow::Result<(Arc<Store>, Result<(), valvula_store::StoreError>)> {
    let rt = tokio::runtime::Handle::current();
    // `-t` writes nothing: the modules' init runs against a snapshot (SQLite) or with
    // its writes left unrun (MySQL).
    let store = if check {
        Store::open_check(&config.storage, rt)
    } else {
        Store::open(&config.storage, rt)
    }
    .with_context(|| format!("storage ({})", config.storage.describe()))?;
    let s = store.clone();
    let ping = tokio::task::spawn_blocking(move || s.ping()).await?;
    match &ping {
        Ok(()) => {
            tracing::info!(database = store.describe(), zone = %store.zone(), "database reachable")
        }
        // Counting in a database configured for other daemons would corrupt both.
        Err(e @ valvula_store::StoreError::Refused(_)) => {
            anyhow::bail!("storage ({}): {e}", store.describe())
        }
        Err(e) => tracing::error!(
            database = store.describe(),
            "DATABASE NOT REACHABLE: {e}; starting anyway, requests that need it get the on-error action"
        ),
    }
    Ok((store, ping))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    // Before any listener serves: a SIGTERM or SIGHUP that arrives while the modules
    // load is then handled, not the default action (which ends the process).
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let first = start_config(&args.config)?;
    let (store, ping) = open_store(&first.config, args.check).await?;
    // A check's private copy of the database goes when the check ends, however it ends
    // (the modules keep the store itself until the process exits).
    struct CheckCopy(Arc<Store>);
    impl Drop for CheckCopy {
        fn drop(&mut self) {
            self.0.discard_check_copy();
        }
    }
    let _copy = args.check.then(|| CheckCopy(store.clone()));
    let link = valvulad::supervisor::worker::link();
    let mut services = host::Services::new(store.clone(), valvula_store::Clock::system());
    if let Some(l) = link {
        services.disabled = Arc::new(l.disabled.clone());
    }
    let (path, s) = (args.config.clone(), services.clone());
    let text = link.and_then(|l| l.start_config()).map(str::to_owned);
    let (config, modules, _) = tokio::task::spawn_blocking(move || {
        valvulad::server::load_from(&path, text.as_deref(), None, &s)
    })
    .await??;
    if args.check {
        println!(
            "valvulad: {} is valid: {} listener(s), {} module(s) loaded and initialised",
            args.config.display(),
            config.listeners.len(),
            modules.order.len()
        );
        for m in modules.iter() {
            m.close();
        }
        return match ping {
            Ok(()) => {
                println!("valvulad: database {} is reachable", store.describe());
                Ok(())
            }
            Err(e) => anyhow::bail!("database {} is not reachable: {e}", store.describe()),
        };
    }
    spawn_maintenance(store.clone());
    let grace = config.server.shutdown_grace;
    let daemon = Daemon::start(config, modules).await?;
    if let Some(l) = link {
        l.drop_unclaimed();
        daemon.tell_master_listeners();
        let d = daemon.clone();
        l.spawn_poll_watchdog(move || d.config().server.module_timeout + Duration::from_secs(1));
    }

    let (reload_tx, mut reload_rx) =
        tokio::sync::mpsc::channel::<valvulad::admin::ReloadRequest>(4);
    // The socket bound now is the one removed at stop, whatever a reload says later.
    let mut admin_socket = daemon.config().server.admin_socket.clone();
    if let Some(sock) = admin_socket.clone()
        && let Err(e) = valvulad::admin::spawn(&sock, daemon.clone(), reload_tx)
    {
        admin_socket = None;
        // Something other than a socket at the path is a configuration error, as
        // `valvulad -t` reports it; other failures leave the policy service running.
        // So is a socket another valvulad serves: `valvula-ctl reload` would reload
        // that daemon and report success for this one.
        if matches!(
            e.kind(),
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::AddrInUse
        ) {
            anyhow::bail!("server.admin_socket: {e}");
        }
        tracing::error!(socket = %sock.display(), "admin socket not available (valvula-ctl status/reload will not work): {e}");
    }
    if let Some(addr) = daemon.config().server.metrics_listen {
        valvulad::admin::spawn_metrics(addr, daemon.clone())
            .await
            .with_context(|| format!("server.metrics_listen {addr}"))?;
    }
    if let Some(user) = config_user(&daemon) {
        let (u, gid) = valvulad::privileges::resolve(&user.0, user.1.as_deref())?;
        let cfg = daemon.config();
        if let valvula_store::Backend::Sqlite { path, .. } = &cfg.storage.backend {
            // The directory stays as it is: it must be the user's (packages make it so),
            // since SQLite creates its -wal and -shm files there.
            valvulad::privileges::hand_over(path, u.uid, gid);
        }
        if let Some(sock) = &cfg.server.admin_socket {
            valvulad::privileges::hand_over(sock, u.uid, gid);
        }
        for l in &cfg.listeners {
            if let valvula_config::ListenAddr::Unix(p) = &l.address {
                valvulad::privileges::hand_over(p, u.uid, gid);
            }
        }
        valvulad::privileges::drop_to(&u, gid).context("cannot drop privileges")?;
        if let Some(l) = link {
            l.after_privilege_drop();
        }
    }
    tracing::info!(config = %args.config.display(), pid = std::process::id(), "valvulad ready");
    match link {
        Some(l) => {
            l.ready();
            // The master tells the --detach parent, which then exits.
            valvulad::process::quiet_after_detach();
        }
        None => valvulad::process::notify_ready(),
    }
    let master_gone = async {
        match link {
            Some(l) => l.master_gone().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(master_gone);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = &mut master_gone => {
                tracing::error!("the master process is gone; stopping");
                break;
            }
            _ = hup.recv() => {
                let _ = daemon.reload(&args.config, &services).await;
            }
            Some(answer) = reload_rx.recv() => {
                let _ = answer.send(daemon.reload(&args.config, &services).await);
            }
        }
    }
    daemon.shutdown(grace).await;
    if let Some(sock) = admin_socket {
        use std::os::unix::fs::FileTypeExt;
        // Only our socket: if something else has been put at the path since, it stays.
        if std::fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(sock);
        }
    }
    tracing::info!("valvulad stopped");
    Ok(())
}

/// Once a minute: drop sliding-window buckets no window counts any more.
fn spawn_maintenance(store: Arc<Store>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            let s = store.clone();
            match tokio::task::spawn_blocking(move || {
                s.maintain(valvula_store::Clock::system().now())
            })
            .await
            {
                Ok(Ok(n)) if n > 0 => {
                    tracing::debug!(removed = n, "expired sliding-window buckets removed")
                }
                Ok(Err(e)) => tracing::debug!("storage maintenance skipped: {e}"),
                _ => {}
            }
        }
    });
}

/// `server.user` and `server.group`, if set.
fn config_user(d: &Daemon) -> Option<(String, Option<String>)> {
    let c = d.config();
    c.server.user.clone().map(|u| (u, c.server.group.clone()))
}
