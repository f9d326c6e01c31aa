//! Running valvulad for a test: in-process (fast, with fake modules) or as a real process
//! (signals, exit codes, the command line).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use valvula_config::Config;
use valvulad::dispatch::DispatchSettings;
use valvulad::host::ModuleSet;
use valvulad::server::Daemon;

pub fn parse_config(text: &str) -> Config {
    match valvula_config::parse(text, std::path::Path::new("test.toml")) {
        Ok(l) => l.config,
        Err(e) => panic!("test config is invalid: {e}"),
    }
}

/// Dispatch settings for tests: short timeouts so failure paths finish quickly.
pub fn settings(timeout_ms: u64) -> DispatchSettings {
    DispatchSettings {
        timeout: Duration::from_millis(timeout_ms),
        threads: 4,
        quarantine_after: 3,
        quarantine_for: Duration::from_millis(300),
    }
}

/// Starts an in-process daemon; returns it and its listeners' bound addresses in
/// config order.
pub async fn start(config: Config, modules: ModuleSet) -> (Daemon, Vec<String>) {
    let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
    let d = Daemon::start(config, modules).await.expect("daemon start");
    let bound = d.bound();
    let addrs = names
        .iter()
        .map(|n| {
            bound
                .iter()
                .find(|(b, _)| b == n)
                .expect("bound listener")
                .1
                .clone()
        })
        .collect();
    (d, addrs)
}

/// Each daemon gets its own SQLite file and admin socket in its directory unless the
/// test chose them.
fn with_storage(config: &str) -> String {
    let mut c = if config.contains("[storage]") {
        config.to_owned()
    } else {
        format!("{config}\n[storage]\npath = \"{{dir}}/valvula.db\"\n")
    };
    if !c.contains("admin_socket") {
        c = if c.contains("[server]\n") {
            c.replacen(
                "[server]\n",
                "[server]\nadmin_socket = \"{dir}/admin.sock\"\n",
                1,
            )
        } else {
            format!("[server]\nadmin_socket = \"{{dir}}/admin.sock\"\n{c}")
        };
    }
    c
}

/// A `valvulad` process with its own config file and temporary directory.
pub struct Proc {
    pub child: Child,
    pub dir: TempDir,
    pub config_path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    /// Output pipes read to their end (2: the process's output is all in `lines`).
    drained: Arc<std::sync::atomic::AtomicUsize>,
}

impl Proc {
    /// Writes `config` (where `{dir}` stands for the temporary directory) and starts
    /// valvulad on it with `args`; waits until it is ready.
    pub fn start(config: &str, args: &[&str]) -> Proc {
        let p = Self::spawn(config, args);
        if !p.wait_for_log("valvulad ready", Duration::from_secs(60)) {
            panic!("valvulad did not start:\n{}", p.log());
        }
        p
    }

    /// Starts valvulad on a configuration written exactly as given (no test defaults
    /// added), e.g. valvula's XML; waits until it is ready.
    pub fn start_exact(config: &str, file_name: &str, args: &[&str]) -> Proc {
        let p = Self::spawn_file(config, file_name, args, false);
        if !p.wait_for_log("valvulad ready", Duration::from_secs(60)) {
            panic!("valvulad did not start:\n{}", p.log());
        }
        p
    }

    /// Starts valvulad without waiting (for tests of startup failures).
    pub fn spawn(config: &str, args: &[&str]) -> Proc {
        Self::spawn_file(config, "valvulad.toml", args, true)
    }

    /// [`Proc::spawn`] with extra environment variables (e.g. `TZ`).
    pub fn spawn_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Self::spawn_full(config, "valvulad.toml", args, true, env)
    }

    fn spawn_file(config: &str, file_name: &str, args: &[&str], defaults: bool) -> Proc {
        Self::spawn_full(config, file_name, args, defaults, &[])
    }

    fn spawn_full(
        config: &str,
        file_name: &str,
        args: &[&str],
        defaults: bool,
        env: &[(&str, &str)],
    ) -> Proc {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join(file_name);
        let text = if defaults {
            with_storage(config)
        } else {
            config.to_owned()
        };
        std::fs::write(
            &config_path,
            text.replace("{dir}", &dir.path().display().to_string()),
        )
        .unwrap();
        let mut child = Command::new(crate::valvulad_bin())
            .arg("-c")
            .arg(&config_path)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn valvulad");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let drained = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let (lines, drained) = (lines.clone(), drained.clone());
            std::thread::spawn(move || {
                // Bytes, not `lines()`: a line that is not UTF-8 must not end the log.
                let mut r = BufReader::new(pipe);
                let mut buf = Vec::new();
                while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let line = String::from_utf8_lossy(&buf);
                    lines
                        .lock()
                        .unwrap()
                        .push(line.trim_end_matches('\n').to_owned());
                    buf.clear();
                }
                drained.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        Proc {
            child,
            dir,
            config_path,
            lines,
            drained,
        }
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_count(needle, 1, timeout)
    }

    pub fn wait_for_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.count_log(needle) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Addresses from the "listening" log lines, in order of appearance.
    pub fn addrs(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(" listening "))
            .filter_map(|l| {
                let a = l.split("address=").nth(1)?;
                Some(a.split_whitespace().next()?.to_owned())
            })
            .collect()
    }

    /// The address of the `/metrics` listener (`metrics_listen`, `:0` resolved), from
    /// its "ready" log line.
    pub fn metrics_addr(&self) -> String {
        let log = self.log();
        log.lines()
            .find(|l| l.contains("metrics listener ready"))
            .and_then(|l| l.split("address=").nth(1))
            .map(|a| a.split_whitespace().next().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no metrics listener:\n{log}"))
    }

    /// The worker's pid: the process that serves, loads the modules and holds their
    /// memory (the one started, the master, only keeps the sockets and restarts it).
    /// Waits for it to be there; with `--single-process`, the process itself.
    pub fn worker_pid(&self) -> u32 {
        let master = self.child.id();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next_back() {
                return pid.parse().expect("a pid");
            }
            let cmdline = std::fs::read(format!("/proc/{master}/cmdline")).unwrap_or_default();
            if cmdline.split(|b| *b == 0).any(|a| a == b"--single-process") {
                return master;
            }
            assert!(
                Instant::now() < end,
                "valvulad (pid {master}) has no worker:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("kill");
    }

    /// Waits for the process to exit, then for its output to be read to the end (a
    /// test that reads the log right after the exit must see all of it).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                // A detached child may keep the pipes open: wait a while, not for ever.
                let read = Instant::now() + Duration::from_secs(10);
                while self.drained.load(std::sync::atomic::Ordering::SeqCst) < 2
                    && Instant::now() < read
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("valvulad did not exit in {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the config file (same `{dir}` substitution and default storage).
    pub fn rewrite_config(&self, config: &str) {
        let text = with_storage(config).replace("{dir}", &self.dir.path().display().to_string());
        std::fs::write(&self.config_path, text).unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
