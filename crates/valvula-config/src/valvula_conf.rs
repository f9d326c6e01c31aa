//! valvula's XML configuration (`/etc/valvula/valvula.conf`), read as it is.
//!
//! The XML is translated into the equivalent valvulad.toml text, which then goes
//! through the same loader (so every check applies); `valvula-ctl import` writes that
//! text out. What is read: `<listen host port>` with ordered `<run module>`,
//! `<database><config>`, `<request-line limit>`, `<running user group enabled>`,
//! `<log-reporting>`, `<debug-queries>`, `<debug>`, `<modules><directory src>` with their
//! `*.xml` pointer files (the module *name* is what counts; the `.so` path points at
//! valvula's C build and is ignored), `<enviroment><mod-ticket debug>`, and
//! `<include src|dir>`. Other elements (valvula's other modules' settings, `<signal>`)
//! are accepted and ignored, with a warning for modules valvulad does not have.

use std::fmt::Write;
use std::path::{Path, PathBuf};

/// True when the text is XML rather than TOML.
pub fn is_xml(text: &str) -> bool {
    text.trim_start().starts_with('<')
}

#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("{file}: not valid XML: {error}")]
    Parse { file: PathBuf, error: String },
    #[error("{file}: {what}")]
    Invalid { file: PathBuf, what: String },
}

/// The result: TOML text, and warnings about what was skipped.
#[derive(Debug)]
pub struct Translated {
    pub toml: String,
    pub warnings: Vec<String>,
}

const MAX_INCLUDE_BYTES: u64 = 1 << 20;
const MAX_EXPANDED_BYTES: usize = 4 << 20;

/// Expands `<include src="file"/>` and `<include dir="path"/>` into the elements they
/// name, recursively, as valvula does (files that fail to parse are skipped).
fn expand(
    text: &str,
    file: &Path,
    depth: usize,
    warnings: &mut Vec<String>,
) -> Result<String, XmlError> {
    if depth > 10 {
        return Err(XmlError::Invalid {
            file: file.to_owned(),
            what: "<include> nested more than 10 deep".into(),
        });
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("<include") {
        out.push_str(&rest[..i]);
        let end = rest[i..]
            .find('>')
            .map(|e| i + e + 1)
            .ok_or_else(|| XmlError::Invalid {
                file: file.to_owned(),
                what: "unterminated <include".into(),
            })?;
        let tag = &rest[i..end];
        let attr = |name: &str| {
            let k = tag.find(&format!("{name}="))? + name.len() + 1;
            let q = tag[k..].chars().next()?;
            let v = &tag[k + q.len_utf8()..];
            Some(v[..v.find(q)?].to_owned())
        };
        let base = file.parent().unwrap_or(Path::new("."));
        let mut files = Vec::new();
        if let Some(src) = attr("src") {
            files.push(base.join(src));
        } else if let Some(dir) = attr("dir") {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(base.join(&dir))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            entries.sort();
            files.extend(
                entries
                    .into_iter()
                    .filter(|p| p.is_file() && !p.to_string_lossy().ends_with('~')),
            );
        }
        for f in files {
            // Only regular files, and not huge ones: `<include src="/dev/zero"/>` must
            // not read for ever.
            let regular = std::fs::metadata(&f)
                .map(|m| m.is_file() && m.len() <= MAX_INCLUDE_BYTES)
                .unwrap_or(false);
            if !regular {
                warnings.push(format!(
                    "<include> {}: not a regular file of at most {MAX_INCLUDE_BYTES} bytes; skipped",
                    f.display()
                ));
                continue;
            }
            match std::fs::read_to_string(&f) {
                Ok(t) => {
                    let body = t.trim_start();
                    let body = match body.strip_prefix("<?xml") {
                        Some(b) => &b[b.find("?>").map_or(0, |i| i + 2)..],
                        None => body,
                    };
                    out.push_str(&expand(body, &f, depth + 1, warnings)?);
                    // A file that includes itself several times doubles at each level.
                    if out.len() > MAX_EXPANDED_BYTES {
                        return Err(XmlError::Invalid {
                            file: file.to_owned(),
                            what: format!(
                                "<include>s expand to more than {MAX_EXPANDED_BYTES} bytes"
                            ),
                        });
                    }
                }
                Err(e) => warnings.push(format!("<include> {}: {e}; skipped", f.display())),
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    Ok(out)
}

fn toml_string(s: &str) -> String {
    // A TOML basic string.
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Modules this valvulad provides, by valvula's names.
const KNOWN_MODULES: [&str; 3] = ["mod-ticket", "mod-ratelimit", "mod-test"];

/// Translates valvula.conf text (from `file`) to valvulad.toml text.
pub fn translate(text: &str, file: &Path) -> Result<Translated, XmlError> {
    let mut warnings = Vec::new();
    let expanded = expand(text, file, 0, &mut warnings)?;
    let doc = roxmltree::Document::parse(&expanded).map_err(|e| XmlError::Parse {
        file: file.to_owned(),
        error: e.to_string(),
    })?;
    let root = doc.root_element();
    let path = |names: &[&str]| {
        let mut n = Some(root);
        for name in names {
            n = n.and_then(|x| x.children().find(|c| c.has_tag_name(*name)));
        }
        n
    };
    let yes = |n: Option<roxmltree::Node<'_, '_>>, attr: &str| {
        n.and_then(|n| n.attribute(attr)) == Some("yes")
    };
    let mut t = format!(
        "# Translated from {} (valvula's XML configuration).\n\n[server]\n",
        file.display()
    );

    // Modules: the pointer files of each module directory.
    let dirs: Vec<PathBuf> = match path(&["modules"]) {
        Some(m) => m
            .children()
            .filter(|c| c.has_tag_name("directory"))
            .filter_map(|d| d.attribute("src"))
            .map(PathBuf::from)
            .collect(),
        None => vec![PathBuf::from("/etc/valvula/mods-enabled")],
    };
    let mut loaded: Vec<String> = Vec::new();
    // Where to look for our modules: the packaged directory, then the directories the
    // pointer files name (their .so is valvula's own build, but the place is the place).
    let mut search = vec![PathBuf::from(crate::DEFAULT_MODULE_DIR)];
    for d in &dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            warnings.push(format!(
                "module directory {} is missing; skipped",
                d.display()
            ));
            continue;
        };
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().is_file())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".xml"))
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        for n in names {
            if !KNOWN_MODULES.contains(&n.as_str()) {
                warnings.push(format!(
                    "{}/{n}.xml: valvulad has no module {n}; not loaded",
                    d.display()
                ));
            } else if !loaded.contains(&n) {
                let pointer =
                    std::fs::read_to_string(d.join(format!("{n}.xml"))).unwrap_or_default();
                if let Ok(p) = roxmltree::Document::parse(&pointer)
                    && let Some(dir) = p
                        .root_element()
                        .attribute("location")
                        .and_then(|l| Path::new(l).parent())
                    && !search.iter().any(|s| s == dir)
                {
                    search.push(dir.to_owned());
                }
                loaded.push(n);
            }
        }
    }
    let list = |v: &[String]| {
        v.iter()
            .map(|s| toml_string(s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(t, "modules = [{}]", list(&loaded));
    let dirs_text: Vec<String> = search
        .iter()
        .map(|d| toml_string(&d.display().to_string()))
        .collect();
    let _ = writeln!(t, "module_dirs = [{}]", dirs_text.join(", "));
    let running = path(&["global-settings", "running"]);
    if yes(running, "enabled")
        && let (Some(u), Some(g)) = (
            running.and_then(|r| r.attribute("user")),
            running.and_then(|r| r.attribute("group")),
        )
    {
        let _ = writeln!(t, "user = {}\ngroup = {}", toml_string(u), toml_string(g));
    }

    // Limits: valvula counts request lines, the empty one included.
    if let Some(limit) =
        path(&["global-settings", "request-line"]).and_then(|r| r.attribute("limit"))
    {
        match limit.parse::<i64>() {
            Ok(n) if n > 1 => {
                let _ = writeln!(t, "\n[limits]\nmax_attributes = {}", n - 1);
            }
            _ => warnings.push(format!(
                "<request-line limit={limit:?}> is not a number above 1; default kept"
            )),
        }
    }

    // Logging.
    let rep = path(&["global-settings", "log-reporting"]);
    let debug = yes(path(&["global-settings", "debug"]), "debug")
        || yes(path(&["global-settings", "debug-queries"]), "debug");
    let _ = writeln!(
        t,
        "\n[log]\nformat = \"valvula\"\ntarget = {}\nlevel = {}",
        toml_string(if yes(rep, "enabled") && yes(rep, "use-syslog") {
            "syslog"
        } else {
            "stderr"
        }),
        toml_string(if debug { "debug" } else { "info" })
    );

    // Database.
    if let Some(c) = path(&["database", "config"]) {
        let a = |k: &str| c.attribute(k).unwrap_or("");
        let port = if a("port").is_empty() {
            "3306"
        } else {
            a("port")
        };
        let host = if a("host").is_empty() {
            "localhost"
        } else {
            a("host")
        };
        let _ = writeln!(
            t,
            "\n[storage]\nbackend = \"mysql\"\nurl = {}",
            toml_string(&format!(
                "mysql://{}@{host}:{port}/{}",
                a("user"),
                a("dbname")
            ))
        );
        if !a("password").is_empty() {
            let _ = writeln!(t, "password = {}", toml_string(a("password")));
        }
    }

    // Listeners and their chains, in order; a <run> of a module not loaded is skipped.
    let mut n = 0;
    if let Some(general) = path(&["general"]) {
        for l in general.children().filter(|c| c.has_tag_name("listen")) {
            let (Some(host), Some(port)) = (l.attribute("host"), l.attribute("port")) else {
                return Err(XmlError::Invalid {
                    file: file.to_owned(),
                    what: "<listen> needs both host and port".into(),
                });
            };
            let mut chain = Vec::new();
            for r in l.children().filter(|c| c.has_tag_name("run")) {
                match r.attribute("module") {
                    Some(m) if loaded.iter().any(|x| x == m) => chain.push(m.to_owned()),
                    Some(m) => warnings.push(format!(
                        "<listen {host}:{port}> <run module={m:?}>: not loaded; skipped"
                    )),
                    None => {}
                }
            }
            let _ = writeln!(
                t,
                "\n[[listener]]\nname = {}\naddress = {}\nmodules = [{}]",
                toml_string(&format!("{host}:{port}")),
                toml_string(&format!("{host}:{port}")),
                list(&chain)
            );
            n += 1;
        }
    }
    if n == 0 {
        return Err(XmlError::Invalid {
            file: file.to_owned(),
            what: "no <listen> in <general>".into(),
        });
    }

    // Module settings valvulad understands.
    if yes(path(&["enviroment", "mod-ticket"]), "debug") {
        t.push_str("\n[module.mod-ticket]\ndebug = true\n");
    }
    Ok(Translated { toml: t, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_listeners_database_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let mods = dir.path().join("mods-enabled");
        std::fs::create_dir(&mods).unwrap();
        std::fs::write(
            mods.join("mod-ticket.xml"),
            "<mod-valvulad location=\"/usr/lib/valvulad/modules/mod-ticket.so\"/>",
        )
        .unwrap();
        std::fs::write(
            mods.join("mod-bwl.xml"),
            "<mod-valvulad location=\"/x.so\"/>",
        )
        .unwrap();
        let xml = format!(
            "<?xml version='1.0' ?>\n<valvula>\n    <global-settings>\n        <running user='root' group='root' enabled='no'/>\n        \
             <log-reporting enabled='yes' use-syslog='no'/>\n        <signal action='reexec'/>\n        <request-line limit='80'/>\n    \
             </global-settings>\n    <general>\n        <listen host='127.0.0.1' port='3579'>\n            <run module='mod-test-missing'/>\n            \
             <run module='mod-ticket'/>\n        </listen>\n    </general>\n    <database>\n        <config driver='mysql' dbname='valvula' user='valvula' password='pw' host='localhost' port=''/>\n    \
             </database>\n    <modules>\n        <directory src='{}'/>\n    </modules>\n    <enviroment>\n        <mod-ticket debug='yes'/>\n        <unknown-thing/>\n    </enviroment>\n</valvula>\n",
            mods.display()
        );
        let t = translate(&xml, &dir.path().join("valvula.conf")).unwrap();
        assert!(t.toml.contains("modules = [\"mod-ticket\"]"), "{}", t.toml);
        assert!(t.toml.contains("max_attributes = 79"));
        assert!(
            t.toml
                .contains("url = \"mysql://valvula@localhost:3306/valvula\"")
        );
        assert!(t.toml.contains("password = \"pw\""));
        assert!(
            t.toml
                .contains("address = \"127.0.0.1:3579\"\nmodules = [\"mod-ticket\"]"),
            "{}",
            t.toml
        );
        assert!(
            !t.toml.contains("user = "),
            "running enabled='no' must not switch users"
        );
        assert!(
            t.warnings.iter().any(|w| w.contains("mod-bwl")),
            "{:?}",
            t.warnings
        );
        assert!(
            t.warnings.iter().any(|w| w.contains("mod-test-missing")),
            "{:?}",
            t.warnings
        );
        crate::parse(&t.toml, Path::new("x.toml")).unwrap();
    }

    #[test]
    fn includes_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("l.xml"),
            "<general><listen host='127.0.0.1' port='4000'/></general>",
        )
        .unwrap();
        let xml = "<valvula><include src='l.xml'/><modules/></valvula>";
        let t = translate(xml, &dir.path().join("v.conf")).unwrap();
        assert!(t.toml.contains("127.0.0.1:4000"), "{}", t.toml);
        assert!(matches!(
            translate("<valvula><general/></valvula>", Path::new("v.conf")),
            Err(XmlError::Invalid { .. })
        ));
        assert!(matches!(
            translate("<valvula>", Path::new("v.conf")),
            Err(XmlError::Parse { .. })
        ));
        assert!(is_xml("  <?xml version='1.0'?><valvula/>") && !is_xml("[server]"));
    }
}
