/// One `name=value` line of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribute {
    pub name: String,
    pub value: String,
}

/// One policy request: its attributes in the order they arrived.
///
/// Unknown attributes are kept (a module may want `policy_context` or a future Postfix
/// attribute); duplicates are kept too, and [`Request::get`] returns the last one, as
/// valvula and Postfix's own attribute readers do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    attrs: Vec<Attribute>,
}

impl Request {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a request from pairs; used by tests and by the load generator.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut r = Self::new();
        for (n, v) in pairs {
            r.push(n, v);
        }
        r
    }

    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.attrs.push(Attribute {
            name: name.into(),
            value: value.into(),
        });
    }

    /// The value of the last attribute called `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .rev()
            .find(|a| a.name == name)
            .map(|a| a.value.as_str())
    }

    /// The value, or `None` when absent or empty: Postfix sends many attributes empty
    /// (`sasl_username=` for unauthenticated mail), and most decisions treat both alike.
    pub fn get_nonempty(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    pub fn attributes(&self) -> &[Attribute] {
        &self.attrs
    }

    pub fn len(&self) -> usize {
        self.attrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty()
    }

    /// Serialises the request as Postfix sends it (attribute lines and the empty line).
    pub fn encode(&self, out: &mut Vec<u8>) {
        for a in &self.attrs {
            out.extend_from_slice(a.name.as_bytes());
            out.push(b'=');
            out.extend_from_slice(a.value.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
    }
}
