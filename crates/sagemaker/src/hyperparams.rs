//! hyperparameters.json: a flat JSON map whose values SageMaker always stores
//! as strings. How the string looks depends on who wrote it: the Python SDK's
//! generic `Estimator` uses Python's `str()` (`"0.0003"`, `"True"`, `"[1, 2]"`,
//! `"abc"`), framework estimators JSON-encode first (`"\"abc\""`, `"true"`),
//! and hand-written jobs may use JSON numbers outright. Each value is decoded
//! into a TOML value so it can become a `--set section.key=value` override,
//! whatever the config key's type; the config loader then checks the type and
//! range and names the key on error.
//!
//! Keys in `section.key` form map onto the config. Two plain keys are ours:
//! `config` (the config file to start from) and `processes_per_host`. Keys
//! that SageMaker or its SDK add (`sagemaker_*`, `_tuning_objective_metric`,
//! anything starting with `_`) are ignored with a note.

use std::path::Path;
use std::str::FromStr;

use crate::{Error, Result, io_err};

/// Names the config file to start from (else the image's default config).
pub const CONFIG_KEY: &str = "config";
/// Processes per host (default: one per GPU).
pub const PROCESSES_PER_HOST_KEY: &str = "processes_per_host";

/// One `section.key=value` override; `Display` gives the `--set` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub key: String,
    pub value: toml::Value,
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hyperparameters {
    /// Config overrides, sorted by key.
    pub overrides: Vec<Override>,
    /// The `config` hyperparameter.
    pub config: Option<String>,
    /// The `processes_per_host` hyperparameter.
    pub processes_per_host: Option<usize>,
    /// What was ignored and why, for the log.
    pub notes: Vec<String>,
}

/// Keys that SageMaker, its SDK or automatic model tuning add for themselves.
pub fn is_ignored(key: &str) -> bool {
    key.starts_with("sagemaker_") || key.starts_with('_')
}

/// A hyperparameter's string as a TOML value. A JSON-encoded string is
/// unwrapped and its content read like a bare value, so `"\"3e-4\""` is the
/// number 3e-4, as a user writing `{"optimizer.lr": "3e-4"}` meant.
pub fn decode_value(raw: &str) -> std::result::Result<toml::Value, String> {
    match serde_json::from_str::<serde_json::Value>(raw.trim()) {
        Ok(serde_json::Value::String(inner)) => decode_text(&inner),
        Ok(other) => json_to_toml(other),
        Err(_) => decode_text(raw),
    }
}

/// A bare (not JSON-encoded) value: Python's True/False/None, anything TOML
/// reads as a value (numbers, `nan`, quoted strings, `['a', 'b']`), a JSON
/// array or object; anything else is the string itself.
fn decode_text(s: &str) -> std::result::Result<toml::Value, String> {
    let t = s.trim();
    match t {
        "True" => return Ok(toml::Value::Boolean(true)),
        "False" => return Ok(toml::Value::Boolean(false)),
        "None" | "null" => {
            return Err("has no value (None/null): give a value or leave the hyperparameter out".into());
        }
        _ => {}
    }
    if !t.is_empty() {
        match toml::Value::from_str(t) {
            // Dates have no config key to go to: keep the text.
            Ok(toml::Value::Datetime(_)) => {}
            Ok(v) => return Ok(v),
            Err(_) => {}
        }
        if let Ok(j) = serde_json::from_str::<serde_json::Value>(t) {
            return json_to_toml(j);
        }
    }
    Ok(toml::Value::String(s.to_string()))
}

fn json_to_toml(j: serde_json::Value) -> std::result::Result<toml::Value, String> {
    use serde_json::Value as J;
    Ok(match j {
        J::Null => return Err("has no value (null): give a value or leave the hyperparameter out".into()),
        J::Bool(b) => toml::Value::Boolean(b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, Some(f)) if n.is_f64() => toml::Value::Float(f),
            _ => return Err(format!("the number {n} is too large (at most {})", i64::MAX)),
        },
        J::String(s) => toml::Value::String(s),
        J::Array(items) => {
            toml::Value::Array(items.into_iter().map(json_to_toml).collect::<std::result::Result<_, _>>()?)
        }
        J::Object(map) => toml::Value::Table(
            map.into_iter().map(|(k, v)| Ok((k, json_to_toml(v)?))).collect::<std::result::Result<_, String>>()?,
        ),
    })
}

impl Hyperparameters {
    /// Reads the file; a job without one has no hyperparameters.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// `file` names the source in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Self> {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).map_err(|e| {
            Error::Settings { file: file.into(), msg: format!("expected a JSON object of strings: {e}") }
        })?;
        let mut hp = Hyperparameters::default();
        // serde_json's map is sorted by key: the overrides and notes come out in a stable order.
        for (key, value) in map {
            // Values are strings per the contract; numbers and booleans from hand-written files are accepted as is.
            let raw = match &value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let bad = |msg: String| Error::Hyperparameter { key: key.clone(), value: raw.clone(), msg };
            if is_ignored(&key) {
                hp.notes.push(format!("ignoring hyperparameter {key} (set by SageMaker or its SDK)"));
                continue;
            }
            let decoded = decode_value(&raw).map_err(bad)?;
            match key.as_str() {
                CONFIG_KEY => match decoded {
                    toml::Value::String(s) if !s.trim().is_empty() => hp.config = Some(s),
                    _ => return Err(bad("expected the path of a TOML config file".into())),
                },
                PROCESSES_PER_HOST_KEY => match decoded {
                    toml::Value::Integer(n) if n >= 1 => hp.processes_per_host = Some(n as usize),
                    _ => return Err(bad("expected a whole number >= 1 (processes on each host)".into())),
                },
                _ => {
                    let well_formed = key
                        .split_once('.')
                        .is_some_and(|(s, k)| !s.is_empty() && !k.is_empty() && !key.contains(char::is_whitespace));
                    if !well_formed {
                        return Err(bad(format!(
                            "not a config key: use section.key (e.g. optimizer.lr or training.max_steps), \
                             {CONFIG_KEY} or {PROCESSES_PER_HOST_KEY}"
                        )));
                    }
                    hp.overrides.push(Override { key, value: decoded });
                }
            }
        }
        Ok(hp)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lit(raw: &str) -> String {
        decode_value(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}")).to_string()
    }

    #[test]
    fn values_decode_to_toml_literals() {
        let cases = [
            // str() of Python values (the generic Estimator)
            ("3e-4", "0.0003"),
            ("0.0003", "0.0003"),
            ("50", "50"),
            ("-2", "-2"),
            ("True", "true"),
            ("False", "false"),
            ("[1, 2]", "[1, 2]"),
            ("['a', 'b']", "[\"a\", \"b\"]"),
            ("cuda", "\"cuda\""),
            ("runs/x y", "\"runs/x y\""),
            ("", "\"\""),
            // JSON-encoded (framework estimators)
            ("\"abc\"", "\"abc\""),
            ("\"3e-4\"", "0.0003"),
            ("\"True\"", "true"),
            ("true", "true"),
            ("\"[1,2]\"", "[1, 2]"),
            ("{\"a\": 1}", "{ a = 1 }"),
            ("\"\\\"quoted\\\"\"", "\"quoted\""),
            // text that only looks special
            ("1979-05-27", "\"1979-05-27\""),
            ("a\"b", "'a\"b'"),
            ("nan", "nan"),
        ];
        for (raw, want) in cases {
            assert_eq!(lit(raw), want, "{raw:?}");
        }
        // Not a way to smuggle in a second key.
        assert_eq!(decode_value("x\ny = 1").unwrap(), toml::Value::String("x\ny = 1".into()));
    }

    #[test]
    fn decoded_literals_read_back_as_the_same_toml() {
        for raw in ["3e-4", "abc", "True", "[1, 2]", "a\"b\\c", "x\ny", "\"[\\\"p\\\", 2]\""] {
            let v = decode_value(raw).unwrap();
            let back = toml::Value::from_str(&v.to_string()).unwrap();
            assert_eq!(back, v, "{raw:?}");
        }
    }

    #[test]
    fn null_and_huge_numbers_are_refused() {
        for raw in ["None", "null", "\"None\"", "[1, null]", "18446744073709551615"] {
            assert!(decode_value(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn keys_map_to_overrides_and_ours() {
        let text = r#"{
            "optimizer.lr": "3e-4",
            "training.max_steps": "\"200\"",
            "training.device": "cuda",
            "config": "configs/tiny.toml",
            "processes_per_host": "\"4\"",
            "sagemaker_program": "train.py",
            "sagemaker_region": "\"us-west-2\"",
            "_tuning_objective_metric": "val_loss"
        }"#;
        let hp = Hyperparameters::parse(text, "hp.json").unwrap();
        let sets: Vec<String> = hp.overrides.iter().map(|o| o.to_string()).collect();
        assert_eq!(sets, ["optimizer.lr=0.0003", "training.device=\"cuda\"", "training.max_steps=200"]);
        assert_eq!(hp.config.as_deref(), Some("configs/tiny.toml"));
        assert_eq!(hp.processes_per_host, Some(4));
        assert_eq!(hp.notes.len(), 3, "{:?}", hp.notes);
        assert!(hp.notes.iter().any(|n| n.contains("_tuning_objective_metric")));
    }

    #[test]
    fn bad_keys_and_values_name_themselves() {
        let cases = [
            (r#"{"lr": "1"}"#, &["lr", "section.key"][..]),
            (r#"{"processes_per_host": "0"}"#, &["processes_per_host", ">= 1"]),
            (r#"{"processes_per_host": "two"}"#, &["processes_per_host", "two"]),
            (r#"{"config": "5"}"#, &["config", "TOML config file"]),
            (r#"{"training.seed": "None"}"#, &["training.seed", "no value"]),
            (r#"{".x": "1"}"#, &[".x"]),
            (r#"[1]"#, &["hp.json", "JSON object"]),
            (r#"{"a.b": "#, &["hp.json"]),
        ];
        for (text, needles) in cases {
            let e = Hyperparameters::parse(text, "hp.json").unwrap_err().to_string();
            for n in needles {
                assert!(e.contains(n), "{text}: {e:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn missing_file_means_no_hyperparameters() {
        let hp = Hyperparameters::load(Path::new("/nonexistent/hyperparameters.json")).unwrap();
        assert_eq!(hp, Hyperparameters::default());
    }
}
