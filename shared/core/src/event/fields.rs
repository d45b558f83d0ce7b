//! The input fields of an event, declared once: [`string_fields!`] turns one list of names into
//! the owned input struct, its borrowing twin for the typed fast path, the list of known
//! fields, and the field-by-field reader that names every wrong or unknown field. Adding an
//! identifier is one edit to a list.

use super::FieldError;
use serde_json::{Map, Value};

/// Declares a struct of optional text fields read from a JSON object:
///
/// `string_fields! { Owned / Fast, KNOWN, reader { a, b, c } }`
///
/// yields `pub struct Owned { pub a: Option<String>, .. }` (Clone, Default, Deserialize with
/// unknown fields denied), `Fast<'a>` borrowing from the input text with `Fast::own`, the
/// `KNOWN` field names, and `reader(obj, prefix, errors) -> Owned`. The caller adds `Debug`
/// (identity redacts it).
macro_rules! string_fields {
    ($(#[$doc:meta])* $owned:ident / $fast:ident, $known:ident, $reader:ident { $($field:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $owned {
            $(pub $field: Option<String>,)+
        }

        /// The borrowing twin of the owned input, for the typed fast path.
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct $fast<'a> {
            $(#[serde(borrow, default)] $field: Option<std::borrow::Cow<'a, str>>,)+
        }

        impl $fast<'_> {
            pub(crate) fn own(self) -> $owned {
                $owned { $($field: self.$field.map(std::borrow::Cow::into_owned),)+ }
            }
        }

        pub(crate) const $known: &[&str] = &[$(stringify!($field)),+];

        /// Reads the fields from a JSON object, naming every wrongly typed or unknown one.
        pub(crate) fn $reader(
            obj: &serde_json::Map<String, serde_json::Value>,
            prefix: &str,
            errors: &mut Vec<$crate::event::FieldError>,
        ) -> $owned {
            $crate::event::fields::unknown_fields(obj, $known, prefix, errors);
            $owned {
                $($field: $crate::event::fields::string_field(obj, stringify!($field), prefix, errors),)+
            }
        }
    };
}
pub(crate) use string_fields;

pub(crate) fn unknown_fields(
    obj: &Map<String, Value>,
    known: &[&str],
    prefix: &str,
    errors: &mut Vec<FieldError>,
) {
    for k in obj.keys() {
        if !known.contains(&k.as_str()) {
            errors.push(FieldError::new(format!("{prefix}{k}"), "unknown field"));
        }
    }
}

pub(crate) fn nested<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a Map<String, Value>> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            errors.push(FieldError::new(key, "must be an object"));
            None
        }
    }
}

/// Strings, plus numbers and booleans converted to text: CRMs often send ids as numbers.
pub(crate) fn string_field(
    obj: &Map<String, Value>,
    key: &str,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        Some(_) => {
            errors.push(FieldError::new(
                format!("{prefix}{key}"),
                "must be a string",
            ));
            None
        }
    }
}
