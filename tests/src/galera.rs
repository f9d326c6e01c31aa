//! A MariaDB Galera cluster of the test's own (Debian's galera-4): `n` mariadbd nodes,
//! each in its own temporary directory, every port on 127.0.0.1, so a test can run
//! daemons against different nodes of one cluster and stop a node under load.
//!
//! Node 0 bootstraps the cluster (`--wsrep-new-cluster`); the others join one at a time
//! and receive its data by rsync state transfer, each on a receive port of its own.
//! When the tests run as root the nodes run as the `mysql` user, as a packaged server
//! does: the rsync daemon a joiner starts for the transfer, started by root, would
//! switch to `nobody` and could not write the data directory. (`wsrep_sst_method=skip`
//! is no way around the transfer: with galera-4 26.4 such a joiner waits for ever in
//! "Joining: receiving State Transfer".)

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long one node may take to start and be synced with the cluster (a loaded
/// machine, a state transfer).
const NODE_START: Duration = Duration::from_secs(120);

struct Node {
    dir: PathBuf,
    /// SQL clients.
    port: u16,
    /// Group communication (`gmcast.listen_addr`).
    gcomm: u16,
    /// Incremental state transfer (`ist.recv_addr`).
    ist: u16,
    /// rsync state transfer received here (`wsrep_sst_receive_address`).
    sst: u16,
    child: Option<Child>,
    /// Started with `--wsrep-new-cluster` (to start it the same way again).
    bootstrap: bool,
    /// Starts that found a port taken (the ports are picked free, then released for
    /// mariadbd to bind: another process may take one in between).
    port_clashes: u32,
}

/// A running Galera cluster; every node is killed when it is dropped.
pub struct GaleraCluster {
    pub dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

fn provider() -> PathBuf {
    for p in [
        "/usr/lib/galera/libgalera_smm.so",
        "/usr/lib/libgalera_smm.so",
        "/usr/lib/galera-4/libgalera_smm.so",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("no Galera provider libgalera_smm.so installed (Debian package galera-4)");
}

/// Runs SQL on a node with the `mariadb` client; Err(stderr) when it fails (a node
/// still starting, or gone).
fn try_sql(port: u16, db: Option<&str>, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("mariadb");
    cmd.args([
        "-N",
        "-B",
        "--connect-timeout=5",
        "-u",
        "root",
        "-h",
        "127.0.0.1",
        "-P",
        &port.to_string(),
    ]);
    if let Some(d) = db {
        cmd.arg(d);
    }
    let out = cmd
        .arg("-e")
        .arg(sql)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the mariadb client: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// When the tests run as root: the `mysql` account the nodes run as, and the
/// directories they write handed to it.
fn node_user(paths: &[&Path]) -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    assert!(
        nix::unistd::User::from_name("mysql")
            .ok()
            .flatten()
            .is_some(),
        "no mysql user: a Galera node started by root runs as mysql (Debian's mariadb-server creates it)"
    );
    for p in paths {
        let o = Command::new("chown")
            .args(["-R", "mysql:mysql"])
            .arg(p)
            .output()
            .expect("chown");
        assert!(
            o.status.success(),
            "chown -R mysql:mysql {}: {}",
            p.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Some("mysql")
}

impl GaleraCluster {
    /// Starts `n` nodes and waits until each is ready, synced and sees all `n`.
    pub fn start(n: usize) -> GaleraCluster {
        assert!(n >= 1, "a cluster needs a node");
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("galera-")
            .tempdir()
            .expect("tempdir");
        // The nodes run as mysql when we are root: they must reach their directories.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 0755");
        // One system database, copied to every node (a joiner's is replaced by the
        // state transfer, but mariadbd needs one to start).
        let seed = dir.path().join("seed");
        let seed_tmp = dir.path().join("seed-tmp");
        std::fs::create_dir_all(&seed_tmp).unwrap();
        crate::db::install_db(&seed, &seed_tmp, &["--innodb-log-file-size=8M"]);
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let d = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(d.join("tmp")).unwrap();
            let o = Command::new("cp")
                .arg("-a")
                .arg(&seed)
                .arg(d.join("data"))
                .output()
                .expect("cp");
            assert!(
                o.status.success(),
                "cp -a {}: {}",
                seed.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            nodes.push(Node {
                dir: d,
                port: crate::free_port(),
                gcomm: crate::free_port(),
                ist: crate::free_port(),
                sst: crate::free_port(),
                child: None,
                bootstrap: false,
                port_clashes: 0,
            });
        }
        let mut c = GaleraCluster { dir, nodes };
        // Bootstrap, then join one at a time: joiners arriving together form their view
        // more slowly and queue for the one donor anyway.
        for i in 0..n {
            c.launch(i, i == 0);
            c.wait_synced(i, i + 1);
        }
        for i in 0..n {
            c.wait_synced(i, n);
        }
        c
    }

    fn launch(&mut self, i: usize, bootstrap: bool) {
        let user = node_user(&[self.nodes[i].dir.as_path()]);
        let cluster = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.gcomm))
            .collect::<Vec<_>>()
            .join(",");
        let node = &mut self.nodes[i];
        node.bootstrap = bootstrap;
        let d = &node.dir;
        let log = std::fs::File::create(d.join("mariadbd.log")).unwrap();
        let mut cmd = Command::new(crate::db::daemon_binary());
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", d.join("mysqld.pid").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--port={}", node.port))
            .arg(format!("--user={}", user.unwrap_or("root")))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=8M",
                "--default-storage-engine=InnoDB",
                "--binlog-format=ROW",
                "--innodb-autoinc-lock-mode=2",
                "--wsrep-on=ON",
                "--wsrep-cluster-name=valvula-test",
                "--wsrep-sst-method=rsync",
            ])
            .arg(format!("--wsrep-provider={}", provider().display()))
            .arg(format!("--wsrep-cluster-address=gcomm://{cluster}"))
            .arg(format!("--wsrep-node-name=n{i}"))
            .arg(format!("--wsrep-node-address=127.0.0.1:{}", node.gcomm))
            .arg(format!(
                "--wsrep-node-incoming-address=127.0.0.1:{}",
                node.port
            ))
            .arg(format!("--wsrep-sst-receive-address=127.0.0.1:{}", node.sst))
            .arg(format!(
                "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{};ist.recv_addr=127.0.0.1:{};gcache.size=16M",
                node.gcomm, node.ist
            ));
        if bootstrap {
            cmd.arg("--wsrep-new-cluster");
        }
        // A group of its own: the state transfer's scripts and rsync go with the node.
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mariadbd");
        node.child = Some(child);
    }

    /// The wsrep status of node `i` (name -> value), or why it could not be read.
    pub fn status(&self, i: usize) -> Result<HashMap<String, String>, String> {
        let out = try_sql(
            self.nodes[i].port,
            None,
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_cluster_size', \
             'wsrep_local_state_comment', 'wsrep_cluster_status', 'wsrep_connected')",
        )?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
            .collect())
    }

    /// Whether node `i` is ready, synced, in the primary component and sees `size` nodes.
    fn synced_with(&self, i: usize, size: usize) -> Result<(), String> {
        let s = self.status(i)?;
        let get = |k: &str| s.get(k).map(String::as_str).unwrap_or("?");
        if get("wsrep_ready") == "ON"
            && get("wsrep_local_state_comment") == "Synced"
            && get("wsrep_cluster_status") == "Primary"
            && get("wsrep_cluster_size") == size.to_string()
        {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    }

    /// Polls until node `i` is synced in a primary component of `size` nodes; panics
    /// with the node's log when it exits or does not get there.
    pub fn wait_synced(&mut self, i: usize, size: usize) {
        let end = Instant::now() + NODE_START;
        loop {
            let last = match self.synced_with(i, size) {
                Ok(()) => return,
                Err(e) => e,
            };
            let exited = match self.nodes[i].child.as_mut() {
                Some(c) => c.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                if self.log(i).contains("Address already in use") && self.nodes[i].port_clashes < 3
                {
                    // Another process took one of the node's ports after it was picked:
                    // the node starts again on new ones (the others learn its address
                    // when it connects to them).
                    let node = &mut self.nodes[i];
                    node.port_clashes += 1;
                    node.port = crate::free_port();
                    node.gcomm = crate::free_port();
                    node.ist = crate::free_port();
                    node.sst = crate::free_port();
                    let bootstrap = node.bootstrap;
                    self.launch(i, bootstrap);
                    continue;
                }
                panic!(
                    "Galera node {i} exited ({status}) before it was synced in a cluster of {size}:\n{}",
                    self.log(i)
                );
            }
            assert!(
                Instant::now() < end,
                "Galera node {i} not synced in a cluster of {size} after {NODE_START:?} (last status: {last}):\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `mysql://root@127.0.0.1:PORT` of node `i` (append `/DATABASE`).
    pub fn url(&self, i: usize) -> String {
        format!("mysql://root@127.0.0.1:{}", self.nodes[i].port)
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// Runs SQL on node `i`; panics with the node's log when it fails.
    pub fn sql(&self, i: usize, db: Option<&str>, sql: &str) -> String {
        self.try_sql(i, db, sql)
            .unwrap_or_else(|e| panic!("Galera node {i}: {sql:?}: {e}\nnode log:\n{}", self.log(i)))
    }

    /// Runs SQL on node `i`; Err(what the client said) when it fails.
    pub fn try_sql(&self, i: usize, db: Option<&str>, sql: &str) -> Result<String, String> {
        try_sql(self.nodes[i].port, db, sql)
    }

    /// The log of node `i` (its last 200 lines).
    pub fn log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.nodes[i].dir.join("mariadbd.log"))
            .unwrap_or_else(|e| format!("(no log: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(200)..].join("\n")
    }

    fn end(&mut self, i: usize, sig: Signal) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let pid = Pid::from_raw(c.id() as i32);
            let _ = kill(pid, sig);
            let _ = c.wait();
            // Whatever it started (a state transfer's rsync) goes too.
            let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
        }
    }

    /// Stops node `i` (SIGTERM: it leaves the cluster in order) and waits until it is gone.
    pub fn stop(&mut self, i: usize) {
        self.end(i, Signal::SIGTERM);
    }

    /// Starts a stopped node `i` again on its data directory: it rejoins (state
    /// transfer) without waiting; [`GaleraCluster::wait_synced`] waits.
    pub fn restart(&mut self, i: usize) {
        self.launch(i, false);
    }

    /// Kills node `i` (SIGKILL: the others find out it is gone) and waits until it is.
    pub fn kill(&mut self, i: usize) {
        self.end(i, Signal::SIGKILL);
    }
}

impl Drop for GaleraCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.end(i, Signal::SIGKILL);
        }
    }
}
