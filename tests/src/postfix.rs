//! A throw-away Postfix (Debian package) with Dovecot SASL, in its own temporary
//! directories, listening on a free 127.0.0.1 port, delivering to a local Maildir sink.
//!
//! Started as `postfix -c DIR start`, without chroot, so several tests run their own
//! instance in parallel. The pitfalls measured in `shared/reference/postfix-policy-notes.md`
//! ("Running a throw-away Postfix") shape what is done here: back-dated config files,
//! a hand-made queue tree with `quick-start`, the Dovecot auth socket before Postfix,
//! `maillog_file` through postlogd, and no inherited descriptors.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::unistd::{Gid, Group, Uid, User, chown};
use tempfile::TempDir;

/// A SASL account every harness Postfix knows.
pub const USER: &str = "alice@example.com";
pub const PASSWORD: &str = "secret-alice";
/// A second account, for tests that need two senders.
pub const USER2: &str = "bob@example.com";
pub const PASSWORD2: &str = "secret-bob";

pub struct Postfix {
    pub root: TempDir,
    pub port: u16,
    etc: PathBuf,
    queue: PathBuf,
}

fn ids(user: &str) -> (Uid, Gid) {
    let u = User::from_name(user)
        .unwrap()
        .unwrap_or_else(|| panic!("no user {user}"));
    (u.uid, u.gid)
}

fn group(name: &str) -> Gid {
    Group::from_name(name)
        .unwrap()
        .unwrap_or_else(|| panic!("no group {name}"))
        .gid
}

fn mkdir(p: &Path, mode: u32, owner: Option<(Uid, Gid)>) {
    std::fs::create_dir_all(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    if let Some((u, g)) = owner {
        chown(p, Some(u), Some(g)).unwrap();
    }
}

fn write(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// Postfix waits ~2 s when main.cf looks "just edited"; make it look old.
fn backdate(p: &Path) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(120))
        .unwrap();
}

/// Runs a command that may leave daemons behind. Their stdio goes to `log`, never to
/// pipes: a daemon holding the test's pipe open would make the runner wait forever.
fn run(cmd: &mut Command, log: &Path) {
    let out = std::fs::File::create(log).unwrap();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        status.success(),
        "{cmd:?} failed: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// The restriction stages a policy service can be placed in.
pub const STAGES: [&str; 4] = [
    "smtpd_sender_restrictions",
    "smtpd_recipient_restrictions",
    "smtpd_data_restrictions",
    "smtpd_end_of_data_restrictions",
];

impl Postfix {
    /// Starts Postfix with `check_policy_service inet:<policy>` first in each of
    /// `stages`, plus any `extra` main.cf lines.
    pub fn start(policy: &str, stages: &[&str], extra: &str) -> Postfix {
        let mut restrictions = String::new();
        for s in stages {
            let tail = if *s == "smtpd_recipient_restrictions" || *s == "smtpd_sender_restrictions"
            {
                ", permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
            } else {
                ", permit"
            };
            restrictions.push_str(&format!("{s} = check_policy_service inet:{policy}{tail}\n"));
        }
        Self::start_with(&format!("{restrictions}{extra}"))
    }

    /// Starts Postfix with these extra main.cf lines (restrictions included).
    pub fn start_with(extra: &str) -> Postfix {
        let root = tempfile::Builder::new()
            .prefix("vlv-postfix-")
            .tempdir()
            .unwrap();
        let r = root.path().to_owned();
        mkdir(&r, 0o755, None);
        let postfix = ids("postfix");
        let nobody = (Uid::from_raw(65534), Gid::from_raw(65534));
        let etc = r.join("etc");
        let queue = r.join("queue");
        let data = r.join("data");
        let sink = r.join("sink");
        let dove = r.join("dovecot");
        mkdir(&etc, 0o755, None);
        mkdir(&data, 0o700, Some(postfix));
        mkdir(&sink, 0o755, Some(nobody));
        mkdir(&dove, 0o755, None);

        // The queue tree, with the owners and modes of postfix-files, so that
        // postfix-script can skip its 1-2 s integrity check (quick-start).
        mkdir(&queue, 0o755, None);
        let postdrop = group("postdrop");
        for d in [
            "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
            "saved", "trace", "private",
        ] {
            mkdir(&queue.join(d), 0o700, Some(postfix));
        }
        mkdir(&queue.join("maildrop"), 0o730, Some((postfix.0, postdrop)));
        mkdir(&queue.join("public"), 0o710, Some((postfix.0, postdrop)));
        mkdir(&queue.join("pid"), 0o755, None);
        write(&queue.join("quick-start"), "");

        // Dovecot: SASL only, its auth socket inside the queue, before Postfix starts.
        let passwd = dove.join("passwd");
        write(
            &passwd,
            &format!("{USER}:{{PLAIN}}{PASSWORD}::::::\n{USER2}:{{PLAIN}}{PASSWORD2}::::::\n"),
        );
        std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o640)).unwrap();
        chown(&passwd, Some(Uid::from_raw(0)), Some(group("dovecot"))).unwrap();
        let instance = r.file_name().unwrap().to_string_lossy().to_string();
        let dconf = dove.join("dovecot.conf");
        write(
            &dconf,
            &format!(
                "protocols = none\n\
                 base_dir = {d}/run\n\
                 state_dir = {d}/state\n\
                 instance_name = {instance}\n\
                 log_path = {d}/dovecot.log\n\
                 ssl = no\n\
                 disable_plaintext_auth = no\n\
                 auth_mechanisms = plain login\n\
                 passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {passwd}\n}}\n\
                 userdb {{\n  driver = static\n  args = uid=65534 gid=65534 home=/nonexistent\n}}\n\
                 service auth {{\n  unix_listener {q}/private/auth {{\n    mode = 0660\n    user = postfix\n    group = postfix\n  }}\n}}\n",
                d = dove.display(),
                q = queue.display(),
                passwd = passwd.display(),
            ),
        );
        run(
            Command::new("dovecot").arg("-c").arg(&dconf),
            &r.join("dovecot-start.log"),
        );
        let auth = queue.join("private/auth");
        crate::wait_until("the Dovecot auth socket", Duration::from_secs(15), || {
            auth.exists()
        });

        let port = crate::free_port();
        write(
            &etc.join("main.cf"),
            &format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {q}\n\
                 data_directory = {data}\n\
                 command_directory = /usr/sbin\n\
                 daemon_directory = /usr/lib/postfix/sbin\n\
                 shlib_directory = /usr/lib/postfix\n\
                 meta_directory = /etc/postfix\n\
                 mail_owner = postfix\n\
                 setgid_group = postdrop\n\
                 syslog_name = postfix-{instance}\n\
                 maillog_file_prefixes = {r}\n\
                 maillog_file = {r}/maillog\n\
                 myhostname = mx.harness.test\n\
                 mydomain = harness.test\n\
                 mydestination =\n\
                 alias_maps =\n\
                 alias_database =\n\
                 local_recipient_maps =\n\
                 inet_interfaces = 127.0.0.1\n\
                 inet_protocols = ipv4\n\
                 mynetworks = 127.0.0.0/8\n\
                 smtpd_sasl_auth_enable = yes\n\
                 smtpd_sasl_type = dovecot\n\
                 smtpd_sasl_path = private/auth\n\
                 smtpd_tls_security_level = none\n\
                 smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination\n\
                 smtpd_policy_service_timeout = 20s\n\
                 virtual_mailbox_domains = example.com remote.test\n\
                 virtual_mailbox_base = {sink}\n\
                 virtual_mailbox_maps = static:mail/\n\
                 virtual_uid_maps = static:65534\n\
                 virtual_gid_maps = static:65534\n\
                 virtual_minimum_uid = 100\n\
                 default_transport = discard\n\
                 relay_transport = discard\n\
                 biff = no\n\
                 {extra}\n",
                q = queue.display(),
                data = data.display(),
                r = r.display(),
                sink = sink.display(),
            ),
        );
        write(
            &etc.join("master.cf"),
            &format!(
                "127.0.0.1:{port} inet n - n - - smtpd\n\
                 pickup    unix  n - n 60 1 pickup\n\
                 cleanup   unix  n - n -  0 cleanup\n\
                 qmgr      unix  n - n 300 1 qmgr\n\
                 rewrite   unix  - - n -  - trivial-rewrite\n\
                 bounce    unix  - - n -  0 bounce\n\
                 defer     unix  - - n -  0 bounce\n\
                 trace     unix  - - n -  0 bounce\n\
                 verify    unix  - - n -  1 verify\n\
                 flush     unix  n - n 1000? 0 flush\n\
                 proxymap  unix  - - n -  - proxymap\n\
                 showq     unix  n - n -  - showq\n\
                 error     unix  - - n -  - error\n\
                 retry     unix  - - n -  - error\n\
                 discard   unix  - - n -  - discard\n\
                 virtual   unix  - n n -  - virtual\n\
                 anvil     unix  - - n -  1 anvil\n\
                 scache    unix  - - n -  1 scache\n\
                 postlog   unix-dgram n - n - 1 postlogd\n"
            ),
        );
        backdate(&etc.join("main.cf"));
        backdate(&etc.join("master.cf"));
        let pf = Postfix {
            root,
            port,
            etc,
            queue,
        };
        run(
            Command::new("postfix").arg("-c").arg(&pf.etc).arg("start"),
            &pf.root.path().join("postfix-start.log"),
        );
        crate::wait_until("Postfix's smtpd port", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        pf
    }

    pub fn config_dir(&self) -> &Path {
        &self.etc
    }

    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.root.path().join("maillog")).unwrap_or_default()
    }

    /// Messages delivered to the sink Maildir.
    pub fn delivered(&self) -> usize {
        std::fs::read_dir(self.root.path().join("sink/mail/new")).map_or(0, |d| d.count())
    }

    /// `postfix reload` (after backdating the config files it may have edited).
    pub fn reload(&self) {
        backdate(&self.etc.join("main.cf"));
        run(
            Command::new("postfix")
                .arg("-c")
                .arg(&self.etc)
                .arg("reload"),
            &self.root.path().join("postfix-reload.log"),
        );
    }

    /// Waits until new SMTP sessions get the settings of the last `postfix reload`.
    /// The master re-reads main.cf at once, but an smtpd that sat idle before the
    /// reload still serves one more session with the old settings before it notices
    /// (seen in CI: the first mail after a hook passed unchecked). Empty sessions
    /// drain those until one is served by an smtpd started after the reload.
    pub fn wait_reloaded(&self) {
        const MARK: &str = "reload -- version";
        crate::wait_until(
            "Postfix's master to log the reload",
            Duration::from_secs(30),
            || self.maillog().contains(MARK),
        );
        let smtpd_pid = |line: &str| -> Option<String> {
            let rest = &line[line.find("/smtpd[")? + 7..];
            Some(rest[..rest.find(']')?].to_owned())
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.maillog();
            let at = log.rfind(MARK).expect("the reload line was seen");
            let old: std::collections::HashSet<String> =
                log[..at].lines().filter_map(smtpd_pid).collect();
            let fresh = log[at..]
                .lines()
                .filter(|l| l.contains(": connect from "))
                .filter_map(smtpd_pid)
                .find(|pid| !old.contains(pid));
            if fresh.is_some() {
                return;
            }
            assert!(
                Instant::now() < end,
                "no smtpd started after the reload served a session in 30 s:\n{log}"
            );
            if let Ok(s) = TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut c = Smtp {
                    r: BufReader::new(s.try_clone().unwrap()),
                    w: s,
                };
                let _ = c.reply();
                let _ = c.cmd("QUIT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_pidfile(pidfile: &Path, must_mention: &str) {
        let Ok(text) = std::fs::read_to_string(pidfile) else {
            return;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            return;
        };
        // Only signal the process if it is ours: a stale pid file may name anything.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let mine = |b: &[u8]| String::from_utf8_lossy(b).contains(must_mention);
        if mine(&cmdline) || mine(&environ) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end && Path::new(&format!("/proc/{pid}")).exists() {
                let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                if st.contains(") Z ") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let r = self.root.path().display().to_string();
        Self::kill_pidfile(&self.queue.join("pid/master.pid"), &r);
        Self::kill_pidfile(&self.root.path().join("dovecot/run/master.pid"), &r);
    }
}

/// How an SMTP transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpResult {
    /// The command whose reply ended the transaction ("RCPT", "DATA", "." ...), or
    /// "." with a 250 when the message was accepted.
    pub step: String,
    pub code: u16,
    pub text: String,
}

impl SmtpResult {
    pub fn accepted(&self) -> bool {
        self.step == "." && self.code == 250
    }
}

struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return (0, format!("connection closed after {all:?}"));
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return (code, all.trim_end().to_owned());
            }
        }
    }
    fn cmd(&mut self, line: &str) -> (u16, String) {
        self.w.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        self.reply()
    }
}

/// Sends one message over SMTP; stops at the first refused step.
pub fn send_mail(port: u16, auth: Option<(&str, &str)>, from: &str, rcpts: &[&str]) -> SmtpResult {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut c = Smtp {
        r: BufReader::new(s.try_clone().unwrap()),
        w: s,
    };
    let end = |step: &str, (code, text): (u16, String)| SmtpResult {
        step: step.into(),
        code,
        text,
    };
    let greet = c.reply();
    if greet.0 != 220 {
        return end("CONNECT", greet);
    }
    let ehlo = c.cmd("EHLO client.harness.test");
    if ehlo.0 != 250 {
        return end("EHLO", ehlo);
    }
    if let Some((u, p)) = auth {
        let token = base64(format!("\0{u}\0{p}").as_bytes());
        let r = c.cmd(&format!("AUTH PLAIN {token}"));
        if r.0 != 235 {
            return end("AUTH", r);
        }
    }
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    if r.0 != 250 {
        return end("MAIL", r);
    }
    for rcpt in rcpts {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        if r.0 != 250 {
            let _ = c.cmd("QUIT");
            return end("RCPT", r);
        }
    }
    let r = c.cmd("DATA");
    if r.0 != 354 {
        let _ = c.cmd("QUIT");
        return end("DATA", r);
    }
    let body = format!(
        "From: <{from}>\r\nTo: <{}>\r\nSubject: valvula test\r\n\r\nHello from the valvula tests.\r\n.",
        rcpts.join(">, <")
    );
    let r = c.cmd(&body);
    let _ = c.cmd("QUIT");
    end(".", r)
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_known_values() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"\0a@b\0pw"), "AGFAYgBwdw==");
    }
}
