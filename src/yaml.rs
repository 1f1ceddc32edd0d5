//! YAML in and out, in one place: serde-saphyr (the maintained library kube already builds), read
//! with the YAML 1.2 core schema that Kubernetes objects, Slime's config and the old serde_yaml
//! reader all agree on.
//!
//! The options matter: serde-saphyr by default also reads YAML 1.1 spellings (`yes`, `on`, `y` as
//! booleans, `0755` as octal), which would turn a label value `on` into `true` and a port list
//! into something else; here those stay strings, as they always have.

use serde::Serialize;
use serde::de::value::{MapAccessDeserializer, MapDeserializer, SeqDeserializer};
use serde::de::{DeserializeOwned, IntoDeserializer, Visitor};

/// Why YAML text could not be read (its message names the line and column).
pub type Error = serde_saphyr::Error;

/// Why a value could not be written as YAML.
pub type WriteError = serde_saphyr::SerializeError;

/// The reader options every YAML input goes through.
fn options() -> serde_saphyr::Options {
    // Errors go to logs, object status and one-line CLI messages: no multi-line snippets.
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        with_snippet: false,
    }
}

/// Reads one YAML document.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_saphyr::from_str_with_options(text, options())
}

/// Reads one YAML document from bytes (UTF-8).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    serde_saphyr::from_slice_with_options(bytes, options())
}

/// Reads every document of a multi-document stream (`---` separated); empty documents (nothing,
/// or only comments, between two `---`) are left out.
pub fn documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, Error> {
    serde_saphyr::from_multiple_with_options(text, options())
}

/// Writes a value as one YAML document.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, WriteError> {
    // A long one-line string (a CRD description) stays on one line, not folded (`>-`): folded
    // text is harder to grep and to diff. Strings with newlines are still written as `|` blocks.
    let options = serde_saphyr::ser_options! {
        folded_wrap_chars: usize::MAX,
    };
    serde_saphyr::to_string_with_options(value, options)
}

/// A YAML value whose mapping keys may be anything, not only strings: what an unquoted
/// `{{ .Values.x }}` reads as (a mapping whose key is a mapping), which a JSON value cannot hold.
/// Read it to look at a document's shape, then read a part of it into a type (it is a
/// deserializer).
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `~`, `null` or nothing.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// Any number, kept as JSON keeps it.
    Number(serde_json::Number),
    /// A float JSON cannot hold (`.inf`, `.nan`).
    Float(f64),
    /// A string.
    String(String),
    /// A sequence.
    Sequence(Vec<Node>),
    /// A mapping, in document order.
    Mapping(Vec<(Node, Node)>),
}

impl Node {
    /// The value under a string key of a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Mapping(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::String(s) => Some(s),
            _ => None,
        }
    }

    /// The items, if this is a sequence.
    pub fn as_sequence(&self) -> Option<&[Node]> {
        match self {
            Node::Sequence(items) => Some(items),
            _ => None,
        }
    }

    /// The value as a JSON value (to write a key that is a collection as text).
    fn into_json(self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Node::Null | Node::Float(_) => Value::Null,
            Node::Bool(b) => Value::Bool(b),
            Node::Number(n) => Value::Number(n),
            Node::String(s) => Value::String(s),
            Node::Sequence(items) => Value::Array(items.into_iter().map(Node::into_json).collect()),
            Node::Mapping(entries) => Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.key_text(), v.into_json()))
                    .collect(),
            ),
        }
    }

    /// The text of a mapping key: a scalar's YAML text (`80` -> `"80"`), a collection's flow YAML.
    pub fn key_text(&self) -> String {
        match self {
            Node::String(s) => s.clone(),
            Node::Null => "null".to_string(),
            Node::Bool(b) => b.to_string(),
            Node::Number(n) => n.to_string(),
            Node::Float(f) => f.to_string(),
            other => to_string(&other.clone().into_json())
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> serde::de::Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        serde::Deserialize::deserialize(d)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
        Ok(Node::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Node, E> {
        Ok(Node::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Node, E> {
        Ok(Node::Number(n.into()))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Node, E> {
        Ok(serde_json::Number::from_f64(f).map_or(Node::Float(f), Node::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Node, E> {
        Ok(Node::String(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Node, E> {
        Ok(Node::String(s))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Sequence(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Mapping(entries))
    }
}

/// Reads a [`Node`] into any type, as the YAML reader would have read the same text (used to
/// read a part of a document picked out first, with serde_path_to_error / serde_ignored wrapped
/// around it); mapping keys that are not strings are read as their text.
impl<'de> serde::Deserializer<'de> for Node {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self {
            Node::Null => visitor.visit_unit(),
            Node::Bool(b) => visitor.visit_bool(b),
            Node::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (None, Some(i), _) => visitor.visit_i64(i),
                (None, None, f) => visitor.visit_f64(f.unwrap_or(f64::NAN)),
            },
            Node::Float(f) => visitor.visit_f64(f),
            Node::String(s) => visitor.visit_string(s),
            Node::Sequence(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter());
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Node::Mapping(entries) => {
                let mut map = MapDeserializer::new(entries.into_iter());
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self {
            Node::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self {
            Node::String(s) => visitor.visit_enum(s.into_deserializer()),
            Node::Mapping(entries) if entries.len() == 1 => visitor.visit_enum(MapAccessDeserializer::new(
                MapDeserializer::new(entries.into_iter()),
            )),
            other => other.deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de> IntoDeserializer<'de> for Node {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::{Value, json};

    #[test]
    fn yaml_1_2_core_scalars_are_read_as_before() {
        let text = "a: ~\nb: null\nc: 80\nd: '80'\ne: 1.5\nf: yes\ng: on\nh: 0755\ni: 1_000\nj: true\n# note\nk: !!str 12\n";
        let v: Value = from_str(text).unwrap();
        let want = json!({"a": null, "b": null, "c": 80, "d": "80", "e": 1.5, "f": "yes", "g": "on",
                          "h": "0755", "i": "1_000", "j": true, "k": "12"});
        assert_eq!(v, want);
    }

    #[test]
    fn documents_are_split_and_empty_ones_left_out() {
        let docs: Vec<Value> = documents("a: 1\n---\n# only a comment\n---\n---\nb: 2\n").unwrap();
        assert_eq!(docs, [json!({"a": 1}), json!({"b": 2})]);
        assert!(documents::<Value>("").unwrap().is_empty());
        let e = documents::<Value>("a: 1\n---\nb: [x\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn nodes_hold_any_key_and_read_into_types() {
        let node: Node = from_str("general:\n  x: {{ .Values.x }}\n80: port\n").unwrap();
        let Some(Node::Mapping(x)) = node.get("general").and_then(|g| g.get("x")) else {
            panic!("{node:?}")
        };
        let Node::Mapping(inner) = &x[0].0 else {
            panic!("{x:?}")
        };
        assert_eq!(inner[0].0.key_text(), ".Values.x");
        assert_eq!(Node::Number(80.into()).key_text(), "80");
        #[derive(serde::Deserialize, Debug, PartialEq)]
        enum Mode {
            Module,
            Port(u16),
        }
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Typed {
            a: Option<u16>,
            b: Option<String>,
            c: Vec<Mode>,
            d: std::collections::BTreeMap<String, bool>,
        }
        let node: Node = from_str("a: 8080\nb: ~\nc: [Module, {Port: 80}]\nd: {x: true}\n").unwrap();
        let want = Typed {
            a: Some(8080),
            b: None,
            c: vec![Mode::Module, Mode::Port(80)],
            d: [("x".to_string(), true)].into(),
        };
        assert_eq!(Typed::deserialize(node).unwrap(), want);
        let node: Node = from_str("a: x\n").unwrap();
        let e = Typed::deserialize(node).unwrap_err().to_string();
        assert!(e.contains("invalid type: string \"x\", expected u16"), "{e}");
    }

    #[test]
    fn written_yaml_reads_back_the_same() {
        let v = json!({"kind": "List", "items": [{"a": "yes", "b": "80", "c": 80, "d": "", "e": "a\nb\n",
                       "f": "~", "g": "*.x", "h": null, "i": [], "j": {}}]});
        assert_eq!(from_str::<Value>(&to_string(&v).unwrap()).unwrap(), v);
    }
}
