//! Workflow variables: values from the command line (or a parent workflow) converted to
//! the type of each variable's default, and `"variable:NAME"` references replaced.
//!
//! As diffusers-workflow does it (`dw/variables.py`): the default's JSON type is the
//! variable's type; booleans take `true/1/yes/on` and `false/0/no/off`; a list splits the
//! text on commas and trims each item; a `null` default takes the value as given. A value
//! that starts with `[` may also be written as a JSON list, which dw would split on commas
//! instead. Where dw keeps a value it cannot convert (with a logged warning), dw refuses it
//! with a precise error. Only a whole `"variable:NAME"` string is a reference, in object
//! values and list items at any depth, never in keys or inside longer text.

use std::collections::BTreeMap;

use serde_json::{Number, Value};

/// Which JSON type a value has, in words.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A value given for a variable: typed on a command line, or passed by a parent workflow.
#[derive(Debug, Clone, PartialEq)]
pub enum Given {
    Text(String),
    Json(Value),
}

/// Converts `given` to the type of `default`; the error says what was expected.
pub fn convert(default: &Value, given: &Given) -> Result<Value, String> {
    match given {
        Given::Text(raw) => convert_text(default, raw),
        Given::Json(Value::String(raw)) => convert_text(default, raw),
        Given::Json(value) => convert_json(default, value),
    }
}

fn convert_text(default: &Value, raw: &str) -> Result<Value, String> {
    let expected = type_name(default);
    let fail = |hint: &str| format!("`{raw}` is not {expected}{hint}");
    match default {
        Value::Null | Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Bool(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Value::Bool(true)),
            "false" | "0" | "no" | "off" => Ok(Value::Bool(false)),
            _ => Err(fail(" (use true/1/yes/on or false/0/no/off)")),
        },
        Value::Number(n) if n.is_i64() || n.is_u64() => parse_integer(raw)
            .map(Value::from)
            .ok_or_else(|| fail(" (a whole number such as 20)")),
        Value::Number(_) => raw
            .trim()
            .replace('_', "")
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| fail(" (a number such as 7.5)")),
        Value::Array(_) if raw.trim_start().starts_with('[') => {
            match serde_json::from_str::<Value>(raw) {
                Ok(list @ Value::Array(_)) => Ok(list),
                _ => Err(fail(" (text starting with `[` is read as a JSON list, e.g. [1, 2]; otherwise separate items with commas)")),
            }
        }
        Value::Array(_) => Ok(Value::Array(
            raw.split(',')
                .map(|item| Value::String(item.trim().to_string()))
                .collect(),
        )),
        Value::Object(_) => match serde_json::from_str::<Value>(raw) {
            Ok(object @ Value::Object(_)) => Ok(object),
            _ => Err(fail(" (write a JSON object such as {\"a\": 1})")),
        },
    }
}

/// Python's `int()` on text: surrounding space, a sign, `_` between digits.
fn parse_integer(raw: &str) -> Option<i64> {
    let text = raw.trim();
    if text.starts_with('_') || text.ends_with('_') || text.contains("__") {
        return None;
    }
    text.replace('_', "").parse::<i64>().ok()
}

fn convert_json(default: &Value, value: &Value) -> Result<Value, String> {
    let same = std::mem::discriminant(default) == std::mem::discriminant(value);
    match (default, value) {
        (Value::Null, _) => Ok(value.clone()),
        (Value::Number(d), Value::Number(v)) if d.is_f64() || v.is_i64() || v.is_u64() => {
            Ok(value.clone())
        }
        (Value::Number(_), Value::Number(v)) => v
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| Value::from(f as i64))
            .ok_or_else(|| format!("{value} is not {}", type_name(default))),
        _ if same => Ok(value.clone()),
        _ => Err(format!(
            "{value} is {}, not {}",
            type_name(value),
            type_name(default)
        )),
    }
}

/// The variable a whole-string reference names, if `value` is one.
pub fn reference(value: &Value) -> Option<&str> {
    value.as_str()?.strip_prefix("variable:")
}

/// Replaces every `"variable:NAME"` in `value`; an unknown name is reported with the JSON
/// pointer where it is written.
pub fn substitute(
    value: &Value,
    pointer: &str,
    variables: &BTreeMap<String, Value>,
) -> Result<Value, (String, String)> {
    Ok(match value {
        Value::String(_) => match reference(value) {
            Some(name) => variables
                .get(name)
                .cloned()
                .ok_or_else(|| (pointer.to_string(), name.to_string()))?,
            None => value.clone(),
        },
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| substitute(v, &format!("{pointer}/{i}"), variables))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let at = format!("{pointer}/{}", super::pointer_segment(k));
                    Ok((k.clone(), substitute(v, &at, variables)?))
                })
                .collect::<Result<_, (String, String)>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(default: Value, raw: &str) -> Result<Value, String> {
        convert(&default, &Given::Text(raw.to_string()))
    }

    // dw/variables.py get_value: bool spellings, comma lists, null defaults.
    #[test]
    fn command_line_text_converts_as_diffusers_workflow_converts_it() {
        assert_eq!(text(json!(false), "Yes").unwrap(), json!(true));
        assert_eq!(text(json!(true), "off").unwrap(), json!(false));
        assert!(text(json!(true), "maybe").is_err());
        assert_eq!(text(json!(4), " 1_000 ").unwrap(), json!(1000));
        assert_eq!(text(json!(7.5), "3").unwrap(), json!(3.0));
        assert_eq!(
            text(json!(["x"]), "a fox, a cat").unwrap(),
            json!(["a fox", "a cat"])
        );
        assert_eq!(text(json!([]), "").unwrap(), json!([""]));
        assert_eq!(text(json!([1]), "[1, 2]").unwrap(), json!([1, 2]));
        assert_eq!(text(Value::Null, "42").unwrap(), json!("42"));
        assert_eq!(text(json!("a"), "42").unwrap(), json!("42"));
    }

    #[test]
    fn text_that_does_not_convert_is_an_error_not_a_kept_string() {
        // dw keeps "2.5" as a string with a warning; dw refuses it.
        let e = text(json!(4), "2.5").unwrap_err();
        assert_eq!(e, "`2.5` is not an integer (a whole number such as 20)");
        assert!(text(json!({"a": 1}), "nope").is_err());
        assert!(text(json!([1]), "[1, 2").is_err());
    }

    #[test]
    fn values_from_a_parent_workflow_keep_their_type_when_it_fits() {
        let given = |v: Value| Given::Json(v);
        assert_eq!(convert(&json!(1.5), &given(json!(2))).unwrap(), json!(2));
        assert_eq!(convert(&json!(1), &given(json!(2.0))).unwrap(), json!(2));
        assert_eq!(convert(&json!(1), &given(json!("3"))).unwrap(), json!(3));
        assert!(convert(&json!(1), &given(json!([1]))).is_err());
        assert_eq!(
            convert(&Value::Null, &given(json!({"a": 1}))).unwrap(),
            json!({"a": 1})
        );
    }

    // dw/variables.py replace_variables: whole values only, any depth, never keys.
    #[test]
    fn only_whole_variable_strings_are_replaced_at_any_depth() {
        let variables = BTreeMap::from([("x".to_string(), json!(3))]);
        let value =
            json!({"a": "variable:x", "b": ["variable:x", "a variable:x"], "variable:x": 1});
        let out = substitute(&value, "", &variables).unwrap();
        assert_eq!(
            out,
            json!({"a": 3, "b": [3, "a variable:x"], "variable:x": 1})
        );
        let missing = substitute(&json!({"a": ["variable:y"]}), "", &variables).unwrap_err();
        assert_eq!(missing, ("/a/0".to_string(), "y".to_string()));
    }
}
