//! Typed reads of the fields of the checkpoint's JSON files (config.json,
//! generation_config.json): a field of the wrong type is an error that says
//! what was expected and what the file holds, never a silent default.
//! Callers add the file's name as context.

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

/// The field `name` of `json`; None when absent or null (transformers
/// writes null for optional settings it leaves unset).
pub fn get<'a>(json: &'a Value, name: &str) -> Option<&'a Value> {
    json.get(name).filter(|value| !value.is_null())
}

pub fn boolean(json: &Value, name: &str) -> Result<Option<bool>> {
    typed(json, name, "true or false", Value::as_bool)
}

pub fn string<'a>(json: &'a Value, name: &str) -> Result<Option<&'a str>> {
    typed(json, name, "a string", Value::as_str)
}

pub fn number(json: &Value, name: &str) -> Result<Option<f64>> {
    typed(json, name, "a number", Value::as_f64)
}

/// A whole number of zero or more (`-5`, `20.7` and `"20"` are refused).
pub fn count(json: &Value, name: &str) -> Result<Option<u64>> {
    typed(json, name, "a whole number of zero or more", Value::as_u64)
}

fn typed<'a, T>(
    json: &'a Value,
    name: &str,
    expected: &str,
    read: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<T>> {
    get(json, name)
        .map(|value| read(value).ok_or_else(|| wrong_type(name, expected, value)))
        .transpose()
}

pub fn wrong_type(name: &str, expected: &str, found: &Value) -> anyhow::Error {
    anyhow!("{name} must be {expected}, found {}", shown(found))
}

/// Fails unless the file's top level is an object (`{...}`).
pub fn check_object(json: &Value) -> Result<()> {
    if !json.is_object() {
        bail!(
            "the file must hold a JSON object ({{...}}), found {}",
            shown(json)
        );
    }
    Ok(())
}

/// A value as the file writes it, cut short when long: error messages stay
/// on one line.
pub fn shown(value: &Value) -> String {
    const LONGEST: usize = 40;
    let text = value.to_string();
    if text.chars().count() <= LONGEST {
        return text;
    }
    let start: String = text.chars().take(LONGEST - 3).collect();
    format!("{start}...")
}
