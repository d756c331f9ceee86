use crate::{PluginError, Result};
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// A component's JSON config, read key by key. Defaults fill in what the user left out, and every key the
/// component never reads is reported by [`Config::finish`] as unknown, naming the key, so a typo such as
/// `"detph"` is an error instead of a silent default.
pub struct Config {
    component: String,
    values: Map<String, Value>,
    read: BTreeSet<String>,
}

impl Config {
    /// `user` overrides `defaults`. Keys in `user` that are not in `defaults` are kept, so that `finish` can
    /// report them.
    pub fn new(component: &str, defaults: Value, user: Value) -> Result<Self> {
        let mut values = match defaults {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => {
                return Err(PluginError(format!(
                    "{component}: defaults must be a JSON object, got {other}"
                )))
            }
        };
        match user {
            Value::Object(map) => values.extend(map),
            Value::Null => {}
            other => {
                return Err(PluginError(format!(
                    "{component}: config must be a JSON object, got {other}"
                )))
            }
        }
        Ok(Self {
            component: component.to_owned(),
            values,
            read: BTreeSet::new(),
        })
    }

    fn take(&mut self, key: &str) -> Result<&Value> {
        self.read.insert(key.to_owned());
        self.values
            .get(key)
            .ok_or_else(|| PluginError(format!("{}: missing config key `{key}`", self.component)))
    }

    fn type_error(&self, key: &str, expected: &str, got: &Value) -> PluginError {
        PluginError(format!(
            "{}: config key `{key}` must be {expected}, got {got}",
            self.component
        ))
    }

    pub fn f64(&mut self, key: &str) -> Result<f64> {
        let value = self.take(key)?.clone();
        value
            .as_f64()
            .ok_or_else(|| self.type_error(key, "a number", &value))
    }

    pub fn i64(&mut self, key: &str) -> Result<i64> {
        let value = self.take(key)?.clone();
        value
            .as_i64()
            .ok_or_else(|| self.type_error(key, "an integer", &value))
    }

    /// A non-negative integer within `min..=max`.
    pub fn usize_in(&mut self, key: &str, min: usize, max: usize) -> Result<usize> {
        let value = self.take(key)?.clone();
        match value.as_u64() {
            Some(n) if (min as u64..=max as u64).contains(&n) => Ok(n as usize),
            _ => Err(self.type_error(key, &format!("an integer in {min}..={max}"), &value)),
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<bool> {
        let value = self.take(key)?.clone();
        value
            .as_bool()
            .ok_or_else(|| self.type_error(key, "true or false", &value))
    }

    pub fn string(&mut self, key: &str) -> Result<String> {
        let value = self.take(key)?.clone();
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.type_error(key, "a string", &value))
    }

    /// One of a fixed set of strings.
    pub fn choice(&mut self, key: &str, allowed: &[&str]) -> Result<String> {
        let value = self.string(key)?;
        if allowed.contains(&value.as_str()) {
            Ok(value)
        } else {
            Err(PluginError(format!(
                "{}: config key `{key}` must be one of {allowed:?}, got {value:?}",
                self.component
            )))
        }
    }

    /// A list of numbers, e.g. a crop size or a spacing.
    pub fn f64_list(&mut self, key: &str) -> Result<Vec<f64>> {
        let value = self.take(key)?.clone();
        value
            .as_array()
            .and_then(|items| items.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.type_error(key, "a list of numbers", &value))
    }

    /// A list of strings, e.g. which sample entries a transform applies to.
    pub fn string_list(&mut self, key: &str) -> Result<Vec<String>> {
        let value = self.take(key)?.clone();
        value
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| self.type_error(key, "a list of strings", &value))
    }

    /// Fails on the first key that was never read.
    pub fn finish(self) -> Result<()> {
        let mut unknown = self
            .values
            .keys()
            .filter(|key| !self.read.contains(*key))
            .peekable();
        if unknown.peek().is_none() {
            return Ok(());
        }
        let unknown: Vec<&String> = unknown.collect();
        let mut known: Vec<&String> = self.read.iter().collect();
        known.sort();
        Err(PluginError(format!(
            "{}: unknown config key{} {} (known keys: {})",
            self.component,
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            known
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn user_values_override_defaults_and_unknown_keys_are_named() {
        let mut config = Config::new(
            "unet2d",
            json!({"depth": 3, "dropout": 0.3}),
            json!({"depth": 4, "detph": 5}),
        )
        .unwrap();
        assert_eq!(config.usize_in("depth", 1, 8).unwrap(), 4);
        assert_eq!(config.f64("dropout").unwrap(), 0.3);
        let error = config.finish().unwrap_err().0;
        assert!(error.contains("unknown config key `detph`"), "{error}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let mut config = Config::new("c", json!({"depth": 3}), json!({"depth": "deep"})).unwrap();
        let error = config.usize_in("depth", 1, 8).unwrap_err().0;
        assert!(
            error.contains("`depth` must be an integer in 1..=8"),
            "{error}"
        );
    }
}
