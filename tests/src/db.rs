//! Databases for tests: a uniquely named MariaDB database per test on the machine's
//! server (dropped afterwards), and a private mariadbd for tests that stop the server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `mysql://user@host:port` of the server tests use (root, no password, as the test
/// machines and CI set it up); override with VALVULA_TEST_MYSQL_URL.
pub fn server_url() -> String {
    std::env::var("VALVULA_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

fn host_port(url: &str) -> (String, String, String) {
    let rest = url.trim_start_matches("mysql://");
    let (user, hp) = rest.split_once('@').unwrap_or(("root", rest));
    let hp = hp.split('/').next().unwrap_or(hp);
    let (h, p) = hp.split_once(':').unwrap_or((hp, "3306"));
    (
        user.split(':').next().unwrap_or(user).into(),
        h.into(),
        p.into(),
    )
}

/// Runs SQL with the `mariadb` client against `url` (server) and `db`; returns stdout.
pub fn mariadb(url: &str, db: Option<&str>, sql: &str) -> String {
    let (user, host, port) = host_port(url);
    let mut cmd = Command::new("mariadb");
    cmd.args(["-N", "-B", "-u", &user, "-h", &host, "-P", &port]);
    if let Some(d) = db {
        cmd.arg(d);
    }
    let out = cmd
        .arg("-e")
        .arg(sql)
        .output()
        .expect("cannot run the mariadb client");
    assert!(
        out.status.success(),
        "mariadb {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A database of its own on the test server, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    server: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "vlvtest_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            nanos % 1_000_000
        );
        let server = server_url();
        mariadb(&server, None, &format!("CREATE DATABASE {name}"));
        TestDb { name, server }
    }

    /// The URL valvulad's `[storage] url` takes.
    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    pub fn sql(&self, sql: &str) -> String {
        mariadb(&self.server, Some(&self.name), sql)
    }

    /// Runs SQL with the `mariadb` client in the background (a transaction that holds
    /// a lock while the test goes on); the caller waits for the child.
    pub fn spawn_sql(&self, sql: &str) -> Child {
        let (user, host, port) = host_port(&self.server);
        Command::new("mariadb")
            .args(["-u", &user, "-h", &host, "-P", &port, &self.name, "-e"])
            .arg(sql)
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot run the mariadb client")
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (user, host, port) = host_port(&self.server);
        let _ = Command::new("mariadb")
            .args(["-u", &user, "-h", &host, "-P", &port, "-e"])
            .arg(format!("DROP DATABASE IF EXISTS {}", self.name))
            .output();
    }
}

/// A mariadbd of the test's own, in a temporary data directory on a free port, so a
/// test can stop and restart it without disturbing other tests.
pub struct PrivateMariadb {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

pub(crate) fn daemon_binary() -> PathBuf {
    for b in ["/usr/sbin/mariadbd", "/usr/sbin/mysqld"] {
        if Path::new(b).exists() {
            return b.into();
        }
    }
    panic!("no mariadbd installed (scripts/test-deps.sh installs it)");
}

/// A new server's system tables in `datadir` (root without a password, no test
/// database), with `tmpdir` as its temporary directory and `extra` options.
pub fn install_db(datadir: &Path, tmpdir: &Path, extra: &[&str]) {
    let out = Command::new("mariadb-install-db")
        .arg("--no-defaults")
        .arg(format!("--datadir={}", datadir.display()))
        .arg(format!("--tmpdir={}", tmpdir.display()))
        .args([
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .args(extra)
        .output()
        .expect("mariadb-install-db");
    assert!(
        out.status.success(),
        "mariadb-install-db: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PrivateMariadb {
    pub fn start() -> PrivateMariadb {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // Temporary tables of its own: two servers bootstrapping at once in the shared
        // /tmp removed each other's (seen when two of these tests ran in parallel).
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        install_db(&data, &tmp, &[]);
        let port = crate::free_port();
        let mut m = PrivateMariadb {
            dir,
            port,
            child: None,
        };
        m.resume();
        m.sql(None, "CREATE DATABASE valvula");
        m
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    pub fn sql(&self, db: Option<&str>, sql: &str) -> String {
        mariadb(&self.url(), db, sql)
    }

    /// Starts (again) on the same data directory and port.
    pub fn resume(&mut self) {
        let d = self.dir.path();
        let log = std::fs::File::create(d.join("mariadbd.log")).unwrap();
        let child = Command::new(daemon_binary())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", d.join("mysqld.pid").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mariadbd");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if self.answers() {
                return;
            }
            assert!(
                Instant::now() < end,
                "private mariadbd did not start:\n{}",
                std::fs::read_to_string(d.join("mariadbd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `sig` to the server (SIGSTOP: it stalls, connections stay open and
    /// nothing is answered; SIGCONT: it goes on).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let c = self.child.as_ref().expect("private mariadbd is running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig)
            .expect("signal mariadbd");
    }

    /// Whether the server answers a ping now.
    pub fn answers(&self) -> bool {
        Command::new("mariadb-admin")
            .args([
                "-u",
                "root",
                "-h",
                "127.0.0.1",
                "-P",
                &self.port.to_string(),
                "--connect-timeout=2",
                "ping",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Stops the server (SIGTERM) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
