//! Response headers in the C form the host reads, with the text they point to.
//!
//! A [`Response`](crate::Response) keeps its headers as [`Header`]s from the
//! start, so handing them to the host costs no conversion. The host reads
//! those pointers until `drop_response`, so the rule that keeps them valid
//! lives here, behind private fields: every [`Slice`] points at a `'static`
//! string or at a `String` this list owns (a `String` that moves keeps its
//! heap buffer, so the pointers survive the list being moved).

use std::borrow::Cow;

use super::abi::{Header, Slice};

/// Header name/value pairs, each a `'static` or an owned string.
#[derive(Default)]
pub(crate) struct HeaderList {
    pairs: Vec<Header>,
    owned: Vec<String>,
}

impl HeaderList {
    pub(crate) fn with_capacity(pairs: usize) -> HeaderList {
        HeaderList { pairs: Vec::with_capacity(pairs), owned: Vec::new() }
    }

    /// Adds a pair (it does not replace one of the same name).
    pub(crate) fn push(&mut self, name: Cow<'static, str>, value: Cow<'static, str>) {
        let (name, value) = (self.keep(name), self.keep(value));
        self.pairs.push(Header { name, value });
    }

    /// The pairs, valid for as long as the list lives.
    pub(super) fn as_slice(&self) -> &[Header] {
        &self.pairs
    }

    fn keep(&mut self, text: Cow<'static, str>) -> Slice {
        match text {
            Cow::Borrowed(text) => Slice::from_static(text),
            Cow::Owned(text) => {
                let slice = Slice::new(text.as_bytes());
                self.owned.push(text);
                slice
            }
        }
    }
}
