//! Reading the configuration file: parse, resolve secrets, validate, and report every problem with
//! the file, line and field path, one per line:
//!
//! ```text
//! /etc/edgegate/edgegate.yaml:12:5: uplink.forward[0].local: `#` must be the last level of filter `sensors/#/x` …
//! ```
//!
//! Parse errors come from the YAML parser with line and column; `serde_path_to_error` supplies the
//! field path. Validation runs on the parsed structs, which have no positions, so [`locate`] finds a
//! problem's line by scanning the text along the field path (see there); the column is omitted.
//!
//! The YAML crate (`serde_yaml`, i.e. `yaml_serde`) is used only in this file.

use std::io;
use std::path::{Path, PathBuf};

use super::problem::Problem;
use super::root::Config;
use super::secret::{Secret, SecretSource};
use super::validate::{check_files, validate};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the configuration file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}", at(path, *line, *column, &Problem::new(field.clone(), message.clone())))]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        /// Field path (`uplink.max_inflight`); empty when the error concerns the whole file.
        field: String,
        message: String,
    },
    #[error("{}", problems.iter().map(|p| at(path, p.line, None, p)).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem, whatever the kind of error (a parse error is one problem).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Read { source, .. } => vec![Problem::new("", source.to_string())],
            ConfigError::Parse {
                line,
                field,
                message,
                ..
            } => vec![Problem {
                field: field.clone(),
                line: *line,
                message: message.clone(),
            }],
            ConfigError::Invalid { problems, .. } => problems.clone(),
        }
    }
}

/// `path:line:column: problem`, leaving out what is unknown.
fn at(path: &Path, line: Option<usize>, column: Option<usize>, problem: &Problem) -> String {
    let mut s = path.display().to_string();
    if let Some(line) = line {
        s.push_str(&format!(":{line}"));
        if let Some(column) = column {
            s.push_str(&format!(":{column}"));
        }
    }
    format!("{s}: {problem}")
}

/// The warnings about a valid configuration (see `validate::warnings`), one line each, located like
/// errors and marked: `path:line: warning: field: message`. `text` is the file's content, for
/// the lines; without it the lines are left out.
pub fn warnings(cfg: &Config, text: Option<&str>, path: &Path) -> Vec<String> {
    crate::config::validate::warnings(cfg)
        .into_iter()
        .map(|mut w| {
            w.line = text.and_then(|t| locate(t, &w.field));
            let mut loc = path.display().to_string();
            if let Some(line) = w.line {
                loc.push_str(&format!(":{line}"));
            }
            format!("{loc}: warning: {w}")
        })
        .collect()
}

/// Reads, parses, resolves secrets, validates and checks referenced files.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(&text, path)
}

/// Like [`load`] for text already read; `path_for_messages` only names the file in errors.
pub fn load_str(text: &str, path_for_messages: &Path) -> Result<Config, ConfigError> {
    load_text(text, path_for_messages, true)
}

/// Checks a file written for another machine: everything [`load`] checks except what needs that
/// machine (certificate and password files, environment variables). Secrets stay unresolved.
pub fn load_offline(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_text(&text, path, false)
}

fn load_text(
    text: &str,
    path_for_messages: &Path,
    this_machine: bool,
) -> Result<Config, ConfigError> {
    let mut cfg = parse(text, path_for_messages)?;
    let mut problems = if this_machine {
        resolve_secrets(&mut cfg)
    } else {
        Vec::new()
    };
    problems.extend(validate(&cfg));
    // A password file that could not be read is already reported by `resolve_secrets`.
    if this_machine {
        for p in check_files(&cfg) {
            if !problems.iter().any(|q| q.field == p.field) {
                problems.push(p);
            }
        }
    }
    if problems.is_empty() {
        return Ok(cfg);
    }
    for p in &mut problems {
        if p.line.is_none() {
            p.line = locate(text, &p.field);
        }
    }
    Err(ConfigError::Invalid {
        path: path_for_messages.to_path_buf(),
        problems,
    })
}

fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let parse_error = |line, column, field: String, message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        field,
        message,
    };
    let has_content = text.lines().any(|l| {
        let l = l.trim();
        !(l.is_empty() || l.starts_with('#') || l == "---" || l == "...")
    });
    if !has_content {
        return Err(parse_error(
            None,
            None,
            String::new(),
            "the file has no settings; it needs at least a `gateway:` section with an `id:`"
                .to_string(),
        ));
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let location = inner.location();
        let message = bare_message(&inner, &path);
        let field = if path == "." { String::new() } else { path };
        let (field, mut message) = explain(field, message);
        // YAML forbids tabs in indentation, and the parser's wording does not say so.
        let line_text = location
            .as_ref()
            .and_then(|l| text.lines().nth(l.line().saturating_sub(1)));
        if line_text.is_some_and(|l| l.trim_end().starts_with([' ', '\t']) && l.contains('\t')) {
            message.push_str(" (this line has a tab: YAML indentation must use spaces)");
        }
        parse_error(
            location.as_ref().map(|l| l.line()),
            location.as_ref().map(|l| l.column()),
            field,
            message,
        )
    })
}

/// The parser's message without the position and path it appends (we print those ourselves).
fn bare_message(err: &serde_yaml::Error, path: &str) -> String {
    let mut msg = err.to_string();
    if let Some(loc) = err.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(i) = msg.find(&suffix) {
            msg.replace_range(i..i + suffix.len(), "");
        }
    }
    // The parser prefixes its own path, which for an unknown key is the parent of ours. Each
    // iteration shortens `prefix`, so the loop ends.
    let mut prefix = path;
    loop {
        if let Some(rest) = msg.strip_prefix(&format!("{prefix}: ")) {
            return rest.to_string();
        }
        match prefix.rfind(['.', '[']) {
            Some(i) if i > 0 => prefix = &prefix[..i],
            _ => return msg,
        }
    }
}

/// Rewords serde's messages where they speak Rust rather than YAML, and moves a missing key into
/// the field path.
fn explain(field: String, message: String) -> (String, String) {
    if let Some(key) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let full = if field.is_empty() {
            key.to_string()
        } else {
            format!("{field}.{key}")
        };
        let why = match full.as_str() {
            "gateway" => "the `gateway:` section is required, with at least `id: <name>`".to_string(),
            "gateway.id" => {
                "required: every gateway needs an id (letters, digits, `_`, `.`, `-`), e.g. `id: pi-kitchen`"
                    .to_string()
            }
            _ => format!("required key `{key}` is missing"),
        };
        return (full, why);
    }
    let mut message = message;
    for (rust, yaml) in [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
        ("expected unit", "expected nothing (null)"),
    ] {
        if let Some(i) = message.find(rust) {
            if message[i + rust.len()..].is_empty() {
                message.replace_range(i.., yaml);
            }
        }
    }
    if let Some(i) = message.find("expected struct ") {
        message.replace_range(i.., "expected a section of `key: value` lines");
    }
    if message.contains("invalid socket address syntax") {
        message.push_str(": expected ip:port, e.g. 127.0.0.1:1883, 0.0.0.0:1883 or [::1]:1883");
    }
    let scalar_for_string = ["integer", "floating point", "boolean"]
        .iter()
        .any(|t| message.starts_with(&format!("invalid type: {t}")));
    if scalar_for_string && message.ends_with("expected a string") {
        message.push_str(" (put the value in quotes)");
    }
    (field, message)
}

/// Fills `resolved` of every secret source; problems name the key that failed.
fn resolve_secrets(cfg: &mut Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (i, user) in cfg.broker.users.iter_mut().enumerate() {
        resolve(
            &mut user.password,
            &format!("broker.users[{i}]"),
            &mut problems,
        );
    }
    if let Some(uplink) = &mut cfg.uplink {
        resolve(&mut uplink.password, "uplink", &mut problems);
    }
    problems
}

/// Longest password file read; a password is short, and `/dev/zero` must not exhaust memory.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a regular file of at most [`MAX_SECRET_FILE`] bytes (a FIFO or device would block or
/// never end).
fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(std::io::Error::other(format!(
            "{} bytes is too long for a password file (at most {MAX_SECRET_FILE})",
            meta.len()
        )));
    }
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_SECRET_FILE)
        .read_to_string(&mut text)?;
    Ok(text)
}

fn resolve(src: &mut SecretSource, prefix: &str, problems: &mut Vec<Problem>) {
    let given: Vec<&str> = [
        ("password", src.password.is_some()),
        ("password_file", src.password_file.is_some()),
        ("password_env", src.password_env.is_some()),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(k, _)| *k)
    .collect();
    if given.len() > 1 {
        problems.push(Problem::new(
            format!("{prefix}.{}", given[1]),
            format!(
                "give only one of {}; they are alternatives",
                given
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
        return;
    }
    src.resolved = if let Some(p) = &src.password {
        Some(p.clone())
    } else if let Some(file) = &src.password_file {
        let field = format!("{prefix}.password_file");
        match read_small(file) {
            Ok(content) => {
                let secret = content.trim_end_matches(['\n', '\r']);
                if secret.is_empty() {
                    problems.push(Problem::new(
                        field,
                        format!("`{}` is empty", file.display()),
                    ));
                    return;
                }
                Some(Secret::new(secret))
            }
            Err(e) => {
                problems.push(Problem::new(
                    field,
                    format!("cannot read `{}`: {e}", file.display()),
                ));
                return;
            }
        }
    } else if let Some(var) = &src.password_env {
        let field = format!("{prefix}.password_env");
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(Secret::new(v)),
            Ok(_) => {
                problems.push(Problem::new(
                    field,
                    format!("environment variable `{var}` is empty"),
                ));
                return;
            }
            Err(std::env::VarError::NotPresent) => {
                problems.push(Problem::new(
                    field,
                    format!("environment variable `{var}` is not set"),
                ));
                return;
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                problems.push(Problem::new(
                    field,
                    format!("environment variable `{var}` is not valid UTF-8"),
                ));
                return;
            }
        }
    } else {
        None
    };
}

/// One non-blank, non-comment line of the YAML text.
struct ScanLine<'a> {
    /// 1-based line number.
    no: usize,
    /// Column of the first character (the `-` of a sequence item).
    indent: usize,
    /// Starts with `- `: a sequence item.
    dash: bool,
    /// Column where the content starts (after `- ` for an item).
    col: usize,
    content: &'a str,
}

fn scan(text: &str) -> Vec<ScanLine<'_>> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let rest = raw.trim_start_matches(' ');
        let indent = raw.len() - rest.len();
        let trimmed = rest.trim_end();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" || trimmed == "..." {
            continue;
        }
        let (dash, col, content) = if trimmed == "-" || rest.starts_with("- ") {
            let after = &rest[1..];
            let item = after.trim_start_matches(' ');
            (true, indent + 1 + after.len() - item.len(), item)
        } else {
            (false, indent, rest)
        };
        lines.push(ScanLine {
            no: i + 1,
            indent,
            dash,
            col,
            content,
        });
    }
    lines
}

/// The key a line starts with (`key:` followed by a space or the end of the line), unquoted.
fn key_of(content: &str) -> Option<&str> {
    let colon = content
        .find(": ")
        .or_else(|| content.trim_end().strip_suffix(':').map(|k| k.len()))?;
    let key = content[..colon].trim_end();
    let key = key
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .or_else(|| key.strip_prefix('\'').and_then(|k| k.strip_suffix('\'')))
        .unwrap_or(key);
    Some(key)
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(field: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in field.split('.').filter(|p| !p.is_empty()) {
        let (key, indexes) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        for index in indexes.split('[') {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

/// Best-effort line of `field` (`uplink.forward[1].local`) in block-style YAML text.
///
/// Walks the path one segment at a time, narrowing a range of lines: a key is a line at the
/// range's mapping column that starts with `key:`, and its value is the following lines indented
/// deeper (or sequence items at the same column); `[n]` is the n-th `- ` line at the range's
/// item column. When a step cannot be followed (the key is absent because a default applies, or
/// flow style such as `{id: x}` is used) the line of the deepest ancestor found is returned, and
/// None when not even the first key is in the file.
pub(crate) fn locate(text: &str, field: &str) -> Option<usize> {
    let lines = scan(text);
    let (mut lo, mut hi) = (0, lines.len());
    let mut found = None;
    for segment in segments(field) {
        let range = lines.get(lo..hi)?;
        match segment {
            Segment::Key(key) => {
                let Some(first) = range.iter().find(|l| !l.content.is_empty()) else {
                    break;
                };
                let column = first.col;
                let Some(i) = (lo..hi).find(|&i| {
                    let l = &lines[i];
                    l.col == column && (!l.dash || i == lo) && key_of(l.content) == Some(key)
                }) else {
                    break;
                };
                let end = (i + 1..hi)
                    .find(|&j| {
                        lines[j].indent < column || (lines[j].indent == column && !lines[j].dash)
                    })
                    .unwrap_or(hi);
                found = Some(lines[i].no);
                (lo, hi) = (i + 1, end);
            }
            Segment::Index(n) => {
                let Some(first) = range.first().filter(|l| l.dash) else {
                    break;
                };
                let column = first.indent;
                let Some(i) = (lo..hi)
                    .filter(|&i| lines[i].dash && lines[i].indent == column)
                    .nth(n)
                else {
                    break;
                };
                let end = (i + 1..hi)
                    .find(|&j| lines[j].indent <= column)
                    .unwrap_or(hi);
                found = Some(lines[i].no);
                (lo, hi) = (i, end);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
gateway:
  id: bench
broker:
  listen: 127.0.0.1:18830
store:
  path: data/buffer.db
uplink:
  url: mqtt://127.0.0.1:18831
  forward:
    - local: "sensors/#"
"#;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        load_str(text, Path::new("test.yaml"))
    }

    #[test]
    fn the_minimal_bench_config_loads_and_validates() {
        let cfg = load_text(MINIMAL).expect("minimal config is valid");
        assert_eq!(cfg.gateway.id, "bench");
        let uplink = cfg.uplink.as_ref().expect("uplink is set");
        assert_eq!(uplink.forward[0].local, "sensors/#");
        assert_eq!(uplink.forward[0].remote, "{topic}");
        assert_eq!(uplink.max_inflight, 100);
        assert_eq!(cfg.store.path, PathBuf::from("data/buffer.db"));
    }

    fn shipped_config_dir() -> PathBuf {
        // `file!()` is relative to the crate that compiles this module; canonicalizing follows the
        // symlink of a scratch crate back to the real source tree, so both find /work/main/config.
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join(file!());
        let here = here.canonicalize().expect("this source file exists");
        here.ancestors()
            .nth(3)
            .expect("src/config/load.rs is three levels below the crate root")
            .join("config")
    }

    fn yaml_files_in(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{} is readable: {e}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn every_shipped_config_file_loads_and_validates() {
        let dir = shipped_config_dir();
        let files = yaml_files_in(&dir);
        let names: Vec<_> = files.iter().filter_map(|p| p.file_name()).collect();
        assert!(names.contains(&"edgegate.yaml".as_ref()), "{names:?}");
        assert!(names.contains(&"dev.yaml".as_ref()), "{names:?}");
        for path in files {
            if let Err(e) = load(&path) {
                panic!("{} does not load:\n{e}", path.display());
            }
        }
    }

    /// Examples may name certificates and secrets that exist only on a configured device, so they
    /// are parsed and validated without resolving secrets or opening files.
    #[test]
    fn every_example_parses_and_validates() {
        let files = yaml_files_in(&shipped_config_dir().join("examples"));
        assert!(!files.is_empty(), "config/examples has examples");
        for path in files {
            let text = std::fs::read_to_string(&path).expect("example is readable");
            let cfg = parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
            let problems = validate(&cfg);
            assert!(problems.is_empty(), "{}: {problems:?}", path.display());
        }
    }

    #[test]
    fn the_installed_reference_is_a_local_broker_with_defaults() {
        let cfg = load(&shipped_config_dir().join("edgegate.yaml")).expect("reference loads");
        assert!(
            cfg.uplink.is_none(),
            "a fresh install has no uplink until configured"
        );
        assert_eq!(cfg.store.path, PathBuf::from("/var/lib/edgegate/buffer.db"));
        let defaults: Config = serde_yaml::from_str("gateway: {id: x}").expect("defaults parse");
        assert_eq!(cfg.broker.max_connections, defaults.broker.max_connections);
        assert_eq!(cfg.broker.segment_size, defaults.broker.segment_size);
        assert_eq!(cfg.store.max_bytes, defaults.store.max_bytes);
        assert_eq!(cfg.store.commit_interval, defaults.store.commit_interval);
        assert_eq!(cfg.log.level, defaults.log.level);
    }

    /// The reference's commented-out uplink example must itself be valid once uncommented.
    #[test]
    fn the_commented_uplink_example_in_the_reference_is_valid() {
        let text = std::fs::read_to_string(shipped_config_dir().join("edgegate.yaml"))
            .expect("reference is readable");
        let start = text
            .lines()
            .position(|l| l.starts_with("#uplink:"))
            .expect("the reference has a commented `#uplink:` section");
        // The block ends at the first line that is not commented out (a blank line).
        let uplink: String = text
            .lines()
            .skip(start)
            .map_while(|line| line.strip_prefix('#'))
            .map(|line| format!("{line}\n"))
            .collect();
        let mut cfg: Config = serde_yaml::from_str(&format!("gateway: {{id: pi}}\n{uplink}"))
            .expect("example parses");
        let problems = validate(&cfg);
        assert!(problems.is_empty(), "{problems:?}");
        let up = cfg.uplink.take().expect("example has an uplink");
        assert!(up.endpoint().expect("url parses").tls);
    }

    struct Bad {
        name: &'static str,
        yaml: &'static str,
        field: &'static str,
        line: usize,
        says: &'static str,
    }

    #[test]
    fn bad_configs_name_the_field_and_the_line() {
        let cases = [
            Bad {
                name: "unknown key",
                yaml: "gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  max_inflite: 5\n",
                field: "uplink.max_inflite",
                line: 5,
                says: "unknown field `max_inflite`, expected one of `url`,",
            },
            Bad {
                name: "wrong type",
                yaml: "gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  max_inflight: lots\n",
                field: "uplink.max_inflight",
                line: 5,
                says: "expected a whole number from 0 to 65535",
            },
            Bad {
                name: "bad filter",
                yaml: "gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  forward:\n    - local: a\n    - local: \"sensors/#/x\"\n",
                field: "uplink.forward[1].local",
                line: 7,
                says: "last level",
            },
            Bad {
                name: "missing gateway id",
                yaml: "gateway:\n  status_topic: x\n",
                field: "gateway.id",
                line: 2,
                says: "every gateway needs an id",
            },
            Bad {
                name: "bad duration",
                yaml: "gateway:\n  id: a\nstore:\n  commit_interval: 10 parsecs\n",
                field: "store.commit_interval",
                line: 4,
                says: "unknown duration unit `parsecs`",
            },
            Bad {
                name: "password file missing",
                yaml: "gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  username: u\n  password_file: /nonexistent/edgegate/pw\n",
                field: "uplink.password_file",
                line: 6,
                says: "cannot read `/nonexistent/edgegate/pw`",
            },
            Bad {
                name: "overlapping forward filters",
                yaml: "gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  forward:\n    - local: sensors/+/temp\n    - local: \"sensors/kitchen/#\"\n",
                field: "uplink.forward[1].local",
                line: 7,
                says: "stored twice",
            },
            Bad {
                name: "echo loop",
                yaml: "gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  forward:\n    - local: \"#\"\n  downlink:\n    - remote: \"edgegate/{gateway_id}/cmd/#\"\n      local: cmd/\n",
                field: "uplink.downlink[0].local",
                line: 9,
                says: "sent back up",
            },
        ];
        for case in cases {
            let err = load_text(case.yaml).expect_err(case.name);
            let problems = err.problems();
            let p = problems
                .iter()
                .find(|p| p.field == case.field)
                .unwrap_or_else(|| panic!("{}: no problem at {}: {err}", case.name, case.field));
            assert_eq!(p.line, Some(case.line), "{}: {err}", case.name);
            assert!(p.message.contains(case.says), "{}: {err}", case.name);
            let shown = err.to_string();
            let prefix = format!("test.yaml:{}", case.line);
            assert!(shown.starts_with(&prefix), "{}: {shown}", case.name);
            assert!(
                shown.contains(&format!(": {}: ", case.field)),
                "{}: {shown}",
                case.name
            );
        }
    }

    #[test]
    fn a_password_file_that_is_a_device_or_huge_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 70_000]).expect("write");
        for (file, why) in [
            ("/dev/zero", "not a regular file"),
            (big.to_str().expect("utf-8"), "too long"),
        ] {
            let err = load_str(
                &format!("gateway: {{id: t}}\nbroker: {{listen: 127.0.0.1:1883}}\nuplink:\n  url: mqtt://h\n  username: u\n  password_file: {file}\n"),
                Path::new("t.yaml"),
            )
            .expect_err("refused");
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn a_tab_in_the_indentation_is_named_as_the_problem() {
        let err =
            load_str("gateway:\n\tid: t\n", Path::new("t.yaml")).expect_err("tabs are invalid");
        assert!(err.to_string().contains("tab"), "{err}");
    }

    #[test]
    fn parse_errors_show_line_and_column_without_repeating_them() {
        let err = load_text("gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  max_inflight: lots\n")
            .expect_err("wrong type");
        let shown = err.to_string();
        assert!(
            shown.starts_with("test.yaml:5:17: uplink.max_inflight: invalid type"),
            "{shown}"
        );
        assert!(!shown.contains("at line"), "{shown}");
        assert_eq!(shown.matches("uplink.max_inflight").count(), 1, "{shown}");
    }

    #[test]
    fn unknown_keys_list_the_expected_ones_even_beside_password_keys() {
        let err = load_text(
            "gateway:\n  id: a\nbroker:\n  users:\n    - username: u\n      pasword: x\n",
        )
        .expect_err("typo");
        let shown = err.to_string();
        assert!(shown.contains("unknown field `pasword`"), "{shown}");
        assert!(shown.contains("`password_file`"), "{shown}");
        assert!(shown.starts_with("test.yaml:6:"), "{shown}");
    }

    #[test]
    fn an_empty_file_says_what_is_needed() {
        for text in ["", "\n\n", "# only a comment\n---\n"] {
            let shown = load_text(text).expect_err("empty").to_string();
            assert!(shown.contains("no settings"), "{shown}");
            assert!(shown.contains("gateway"), "{shown}");
        }
    }

    #[test]
    fn a_missing_gateway_section_is_named() {
        let err = load_text("store:\n  path: x.db\n").expect_err("no gateway");
        let problems = err.problems();
        assert_eq!(problems[0].field, "gateway");
        assert!(problems[0]
            .message
            .contains("`gateway:` section is required"));
    }

    #[test]
    fn a_numeric_gateway_id_is_read_as_text() {
        let cfg = load_text("gateway:\n  id: 1234\n").expect("YAML integers read as strings");
        assert_eq!(cfg.gateway.id, "1234");
    }

    #[test]
    fn a_list_where_text_belongs_names_the_field() {
        let shown = load_text("gateway:\n  id: [a]\n")
            .expect_err("list")
            .to_string();
        assert!(
            shown.starts_with("test.yaml:2:7: gateway.id: invalid type: sequence"),
            "{shown}"
        );
    }

    #[test]
    fn all_validation_problems_are_reported_at_once() {
        let err = load_text(
            "gateway:\n  id: bad id\nstore:\n  commit_max_rows: 0\nlog:\n  level: \"info,=[\"\n",
        )
        .expect_err("three problems");
        let fields: Vec<String> = err.problems().into_iter().map(|p| p.field).collect();
        for f in ["gateway.id", "store.commit_max_rows", "log.level"] {
            assert!(fields.iter().any(|x| x == f), "{f} missing from {fields:?}");
        }
        assert_eq!(err.to_string().lines().count(), err.problems().len());
    }

    #[test]
    fn password_files_lose_their_trailing_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").expect("write password file");
        let yaml = format!(
            "gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  username: u\n  password_file: {}\n",
            pw.display()
        );
        let cfg = load_text(&yaml).expect("valid");
        let up = cfg.uplink.expect("uplink");
        assert_eq!(up.password.secret().map(Secret::expose), Some("s3cret"));
        assert_eq!(format!("{:?}", up.password).matches("s3cret").count(), 0);
    }

    #[test]
    fn inline_and_environment_passwords_resolve_and_absent_ones_stay_none() {
        let cfg = load_text(
            "gateway:\n  id: a\nbroker:\n  users:\n    - username: a\n      password: pa\n    - username: b\n      password_env: PATH\n",
        )
        .expect("valid");
        assert_eq!(
            cfg.broker.users[0].password.secret().map(Secret::expose),
            Some("pa")
        );
        let path = std::env::var("PATH").expect("PATH is set in tests");
        assert_eq!(
            cfg.broker.users[1].password.secret().map(Secret::expose),
            Some(path.as_str())
        );
        let cfg = load_text(MINIMAL).expect("valid");
        assert!(cfg.uplink.expect("uplink").password.secret().is_none());
    }

    #[test]
    fn two_password_sources_are_refused() {
        let err = load_text(
            "gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  username: u\n  password: x\n  password_env: HOME\n",
        )
        .expect_err("two sources");
        let p = &err.problems()[0];
        assert_eq!(p.field, "uplink.password_env");
        assert_eq!(p.line, Some(7));
        assert!(p.message.contains("only one of"));
    }

    #[test]
    fn an_unset_environment_variable_is_named() {
        let err = load_text(
            "gateway:\n  id: a\nuplink:\n  url: mqtt://h\n  username: u\n  password_env: EDGEGATE_TEST_SURELY_UNSET_VAR\n",
        )
        .expect_err("unset");
        let shown = err.to_string();
        assert!(shown.contains("test.yaml:6: uplink.password_env: environment variable `EDGEGATE_TEST_SURELY_UNSET_VAR` is not set"), "{shown}");
    }

    #[test]
    fn locate_follows_keys_and_sequence_items() {
        let text = "\
# comment
gateway:
  id: a   # trailing
uplink:
  url: mqtt://h
  forward:
  - local: a
    remote: x/{topic}
  -   local: b

      # gap
      qos: 0
  downlink:
    -
      remote: r/#
log: {level: info}
";
        assert_eq!(locate(text, "gateway"), Some(2));
        assert_eq!(locate(text, "gateway.id"), Some(3));
        assert_eq!(locate(text, "uplink.forward[0].remote"), Some(8));
        assert_eq!(locate(text, "uplink.forward[1]"), Some(9));
        assert_eq!(locate(text, "uplink.forward[1].local"), Some(9));
        assert_eq!(locate(text, "uplink.forward[1].qos"), Some(12));
        assert_eq!(locate(text, "uplink.downlink[0].remote"), Some(15));
        assert_eq!(
            locate(text, "uplink.client_id"),
            Some(4),
            "absent key: its section"
        );
        assert_eq!(
            locate(text, "log.level"),
            Some(16),
            "flow style: the parent"
        );
        assert_eq!(locate(text, "broker.listen"), None);
        assert_eq!(locate(text, ""), None);
    }
}
