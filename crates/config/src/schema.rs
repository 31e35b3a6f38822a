//! The `graft.toml` JSON Schema and the file check behind `graft config schema`
//! and `graft config check`.
//!
//! The schema is derived from the file types ([`ConfigFile`] and the section
//! types) with `schemars`: their doc comments become the descriptions editors
//! show, `deny_unknown_fields` becomes `additionalProperties: false`. It checks
//! shapes and types only; [`check`] does everything graft does when it loads a
//! file (TOML syntax, types, unknown keys, then the values: regexes, globs,
//! ports, the filter's shape) and says on which line each problem is, from the
//! spans of the `toml` parser.
//!
//! The same settings may be written as JSON (`graft.json`) or YAML
//! (`graft.yaml`, read with `serde-saphyr`): serde gives them for free, with
//! the line of a syntax, type or unknown-key error; only TOML files also get the
//! line of a refused value.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use crate::{
    ConfigError, ConfigFile, FilterFile, IncomingMode, OutgoingLocal, PortMapping, Target,
};

/// The `$id` of the schema: where the repository keeps it
/// (`docs/graft.schema.json`, written by `graft config schema`).
pub const SCHEMA_ID: &str =
    "https://raw.githubusercontent.com/graft-dev/graft/main/docs/graft.schema.json";

/// The JSON Schema of `graft.toml`, in draft 7: the newest draft every editor
/// integration reads (taplo, VS Code's JSON and the YAML language server).
pub fn json_schema() -> serde_json::Value {
    let mut schema = schemars::generate::SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<ConfigFile>();
    schema.insert("$id".into(), SCHEMA_ID.into());
    schema.insert("title".into(), "graft.toml".into());
    schema.to_value()
}

/// A problem in a config file, with where it is when the parser knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    /// 1-based line and column of the offending key or value, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong and the expected form.
    pub message: String,
}

impl fmt::Display for FileProblem {
    /// `line LINE, column COLUMN: message`, or the message alone without a
    /// position.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "line {line}, column {column}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The languages a config file may be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML (`graft.toml`, and any file not named `.json`, `.yaml`, `.yml`).
    Toml,
    /// JSON (`graft.json`).
    Json,
    /// YAML (`graft.yaml`, `graft.yml`).
    Yaml,
}

impl Format {
    /// The format of `path`, from its extension.
    pub fn of(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Format::Json,
            Some("yaml" | "yml") => Format::Yaml,
            _ => Format::Toml,
        }
    }
}

/// The files `graft run` loads without `--config`, in this order of preference:
/// the first that exists in the working directory.
pub const DEFAULT_FILES: [&str; 4] = ["graft.toml", "graft.json", "graft.yaml", "graft.yml"];

/// The first of [`DEFAULT_FILES`] that exists in `dir`.
pub fn default_file(dir: &Path) -> Option<PathBuf> {
    DEFAULT_FILES
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.exists())
}

/// Parses the text of a config file: syntax, types and unknown keys, not the
/// values (see [`check`]).
///
/// # Errors
///
/// The parser's error, with its position when the parser gives one.
pub fn parse(text: &str, format: Format) -> Result<ConfigFile, FileProblem> {
    match format {
        Format::Toml => toml::from_str(text).map_err(|e| FileProblem {
            position: e.span().map(|span| line_column(text, span.start)),
            message: e.message().trim_end().to_owned(),
        }),
        Format::Json => serde_json::from_str(text).map_err(|e| {
            let position = (e.line() > 0).then(|| (e.line(), e.column()));
            // serde_json ends its message with the position, which is shown apart.
            let message = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            FileProblem {
                position,
                message: message.strip_suffix(&suffix).unwrap_or(&message).to_owned(),
            }
        }),
        Format::Yaml => serde_saphyr::from_str(text).map_err(|e| {
            let position = e
                .location()
                .map(|l| (l.line() as usize, l.column() as usize));
            // Without the source snippet; the position, which serde-saphyr puts
            // first, is shown apart.
            let message = e.without_snippet().to_string();
            let message = match position {
                Some((line, column)) => {
                    let prefix = format!("line {line} column {column}: ");
                    let suffix = format!(" at line {line}, column {column}");
                    let rest = message
                        .split_once(&prefix)
                        .map_or(message.as_str(), |(_, rest)| rest);
                    rest.strip_suffix(&suffix).unwrap_or(rest).to_owned()
                }
                None => message,
            };
            FileProblem { position, message }
        }),
    }
}

/// Checks the text of a config file as `graft run` would load it, and the
/// values in it as `graft run` would resolve them.
///
/// # Errors
///
/// The first problem found: a syntax error, a wrong type or an unknown key
/// (from the parser, with its position), else a value graft refuses (with the
/// position of its key in a TOML file).
pub fn check(text: &str, format: Format) -> Result<ConfigFile, FileProblem> {
    let file = parse(text, format)?;
    // The text parsed above, so it parses again; the spans locate value errors.
    let tree = (format == Format::Toml)
        .then(|| DeTable::parse(text).ok())
        .flatten();
    let at = |path: &[Key]| -> Option<(usize, usize)> {
        let span = locate(tree.as_ref()?, path)?;
        Some(line_column(text, span.start))
    };
    let problem = |path: &[Key], error: ConfigError| FileProblem {
        position: at(path),
        message: error.to_string(),
    };

    if let Some(target) = &file.target {
        target
            .parse::<Target>()
            .map_err(|e| problem(&[Key::Name("target")], e))?;
    }
    for (i, entry) in file.incoming.port_map.iter().enumerate() {
        entry.parse::<PortMapping>().map_err(|e| {
            problem(
                &[Key::Name("incoming"), Key::Name("port_map"), Key::At(i)],
                e,
            )
        })?;
    }
    if let Some(filter) = &file.incoming.filter {
        let path = [Key::Name("incoming"), Key::Name("filter")];
        FilterFile::to_spec(filter).map_err(|e| problem(&path, e))?;
        if file.incoming.mode == Some(IncomingMode::Off) {
            return Err(FileProblem {
                position: at(&path),
                message: "[incoming.filter] is set but incoming traffic is off \
                          (mode = \"off\"): drop the filter or choose \"steal\" or \"mirror\""
                    .into(),
            });
        }
    }
    for (key, entries) in [
        ("local", &file.outgoing.local),
        ("remote", &file.outgoing.remote),
    ] {
        for (i, entry) in entries.iter().enumerate() {
            entry
                .parse::<OutgoingLocal>()
                .map_err(|e| problem(&[Key::Name("outgoing"), Key::Name(key), Key::At(i)], e))?;
        }
    }
    for (key, entries) in [("local", &file.dns.local), ("remote", &file.dns.remote)] {
        for (i, entry) in entries.iter().enumerate() {
            crate::outgoing::parse_name(entry)
                .map_err(|e| problem(&[Key::Name("dns"), Key::Name(key), Key::At(i)], e))?;
        }
    }
    for key in ["include", "exclude"] {
        let globs = if key == "include" {
            &file.env.include
        } else {
            &file.env.exclude
        };
        for (i, glob) in globs.iter().enumerate() {
            globset::Glob::new(glob).map_err(|e| FileProblem {
                position: at(&[Key::Name("env"), Key::Name(key), Key::At(i)]),
                message: format!("invalid environment glob {glob:?}: {e}"),
            })?;
        }
    }
    for key in ["local", "remote"] {
        let regexes = if key == "local" {
            &file.fs.local
        } else {
            &file.fs.remote
        };
        for (i, regex) in regexes.iter().enumerate() {
            regex::Regex::new(regex).map_err(|e| FileProblem {
                position: at(&[Key::Name("fs"), Key::Name(key), Key::At(i)]),
                message: format!("invalid path regex {regex:?}: {e}"),
            })?;
        }
    }
    if let Some(policy) = &file.agent.pull_policy
        && !crate::PULL_POLICIES.contains(&policy.as_str())
    {
        return Err(FileProblem {
            position: at(&[Key::Name("agent"), Key::Name("pull_policy")]),
            message: format!(
                "invalid agent pull policy {policy:?}: expected Always, IfNotPresent or Never"
            ),
        });
    }
    Ok(file)
}

/// One step of a path to a key: a table key or an array index.
#[derive(Debug, Clone, Copy)]
enum Key {
    Name(&'static str),
    At(usize),
}

/// The span of the value at `path`, or of the deepest part of it found.
fn locate(root: &toml::Spanned<DeTable<'_>>, path: &[Key]) -> Option<Range<usize>> {
    let mut node: Option<&toml::Spanned<DeValue<'_>>> = None;
    let mut span = None;
    for key in path {
        let next = match (key, node.map(toml::Spanned::get_ref)) {
            (Key::Name(name), None) => find(root.get_ref(), name),
            (Key::Name(name), Some(DeValue::Table(table))) => find(table, name),
            (Key::At(i), Some(DeValue::Array(array))) => array.get(*i),
            _ => None,
        };
        match next {
            Some(next) => {
                node = Some(next);
                span = Some(next.span());
            }
            None => break,
        }
    }
    span
}

/// The value of key `name` in `table`.
fn find<'a, 'i>(table: &'a DeTable<'i>, name: &str) -> Option<&'a toml::Spanned<DeValue<'i>>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref() == name)
        .map(|(_, v)| v)
}

/// 1-based line and column (in characters) of the byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in the repository, with every key.
    const EXAMPLE: &str = include_str!("../../../docs/graft.example.toml");

    fn validator() -> jsonschema::Validator {
        jsonschema::validator_for(&json_schema()).expect("the derived schema is a valid schema")
    }

    fn as_json(text: &str) -> serde_json::Value {
        let value: toml::Value = toml::from_str(text).expect("valid TOML");
        serde_json::to_value(value).expect("TOML values are JSON values")
    }

    #[test]
    fn the_schema_accepts_the_examples() {
        let schema = validator();
        let doc_examples = [
            EXAMPLE,
            "target = \"pid:1234\"\n[incoming]\nmode = \"steal\"\nport_map = [\"8080:80\"]\n\
             [incoming.filter]\nheader = \"^x-user: alice$\"\n",
            "[incoming.filter]\nany_of = [{ path = \"^/admin/\" }, { method = \"DELETE\" }]\n",
            "",
        ];
        for text in doc_examples {
            let errors: Vec<String> = schema
                .iter_errors(&as_json(text))
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{errors:?} in\n{text}");
            check(text, Format::Toml).unwrap_or_else(|e| panic!("{e} in\n{text}"));
        }
    }

    #[test]
    fn the_schema_refuses_wrong_types_and_unknown_keys() {
        let schema = validator();
        for bad in [
            "target = 7",
            "[incoming]\nmode = \"grab\"",
            "[incoming]\nport_map = \"8080:80\"",
            "[kube]\nready_timeout = \"60\"",
            "[env]\nremote = \"yes\"",
            "[fs]\nmode = \"Read\"",
            "bogus = 1",
            "[agent]\nstart_timeout = -1",
            "[incoming.filter]\nany_of = [{ host = \"x\" }]",
        ] {
            assert!(!schema.is_valid(&as_json(bad)), "accepted: {bad}");
            assert!(check(bad, Format::Toml).is_err(), "check accepted: {bad}");
        }
    }

    #[test]
    fn the_schema_carries_descriptions() {
        let schema = json_schema();
        assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
        let kube = &schema["definitions"]["KubeFile"]["properties"]["ready_timeout"];
        let text = kube["description"].as_str().unwrap_or_default();
        assert!(text.contains("Seconds"), "{schema:#}");
        assert_eq!(schema["$id"], SCHEMA_ID);
    }

    #[test]
    fn check_says_on_which_line() {
        let text = "target = \"deploy/api\"\n\n[incoming]\nmode = \"steal\"\nbogus = 1\n";
        let err = check(text, Format::Toml).unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(5), "{err}");
        assert!(err.message.contains("bogus"), "{err}");

        let text = "[kube]\nnamespace = \"shop\"\nready_timeout = \"soon\"\n";
        let err = check(text, Format::Toml).unwrap_err();
        assert_eq!(err.position, Some((3, 17)), "{err}");

        let text = "[incoming]\nport_map = [\n  \"8080:80\",\n  \"8080\",\n]\n";
        let err = check(text, Format::Toml).unwrap_err();
        assert_eq!(err.position, Some((4, 3)), "{err}");
        assert!(
            err.to_string()
                .starts_with("line 4, column 3: invalid port mapping"),
            "{err}"
        );

        let text = "[fs]\nlocal = [\"^/etc/(\"]\n";
        let err = check(text, Format::Toml).unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(2), "{err}");

        let text = "target = \"api\"\n";
        assert_eq!(
            check(text, Format::Toml).unwrap_err().position,
            Some((1, 10))
        );

        let text = "[incoming]\nmode = \"off\"\n[incoming.filter]\nmethod = \"GET\"\n";
        let err = check(text, Format::Toml).unwrap_err();
        assert!(err.message.contains("incoming traffic is off"), "{err}");

        let err = check("[agent]\npull_policy = \"Sometimes\"\n", Format::Toml).unwrap_err();
        assert_eq!(err.position, Some((2, 15)), "{err}");
    }

    #[test]
    fn json_and_yaml_files_hold_the_same_settings() {
        let from_toml = check(EXAMPLE, Format::Toml).unwrap();
        let json = serde_json::to_string_pretty(&as_json(EXAMPLE)).unwrap();
        assert_eq!(check(&json, Format::Json).unwrap(), from_toml);
        let yaml = "target: deploy/api\nincoming:\n  mode: steal\n  port_map: [\"8080:80\"]\n";
        let file = check(yaml, Format::Yaml).unwrap();
        assert_eq!(file.incoming.mode, Some(IncomingMode::Steal));
        assert_eq!(file.incoming.port_map, ["8080:80"]);

        let err = check(
            "{\n  \"target\": \"deploy/api\",\n  \"bogus\": 1\n}",
            Format::Json,
        )
        .unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(3), "{err}");
        let err = check(
            "target: deploy/api\nkube:\n  ready_timeout: soon\n",
            Format::Yaml,
        )
        .unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(3), "{err}");
        assert_eq!(Format::of(Path::new("x/graft.yml")), Format::Yaml);
        assert_eq!(Format::of(Path::new("graft.json")), Format::Json);
        assert_eq!(Format::of(Path::new("graft.toml")), Format::Toml);
    }

    #[test]
    fn positions_count_characters() {
        assert_eq!(line_column("a\nbé=", 5), (2, 3));
        assert_eq!(line_column("", 0), (1, 1));
    }
}
