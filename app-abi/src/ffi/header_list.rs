//! Response headers in the C form the host reads, with the text they point to.
//!
//! A [`Response`](crate::Response) keeps its headers as [`Header`]s from the
//! start, so handing them to the host costs no conversion. The host reads
//! those pointers until `drop_response`, so the rule that keeps them valid
//! lives here, behind private fields: every [`Slice`] points at `'static`
//! bytes or at a buffer this list owns (a `Vec` that moves keeps its heap
//! buffer, so the pointers survive the list being moved).

use std::borrow::Cow;

use super::abi::{Header, Slice};

/// Header name/value pairs, each `'static` or owned.
#[derive(Default)]
pub(crate) struct HeaderList {
    pairs: Vec<Header>,
    owned: Vec<Vec<u8>>,
}

impl HeaderList {
    pub(crate) fn with_capacity(pairs: usize) -> HeaderList {
        HeaderList { pairs: Vec::with_capacity(pairs), owned: Vec::new() }
    }

    /// Adds a pair (it does not replace one of the same name).
    pub(crate) fn push(&mut self, name: Cow<'static, str>, value: Cow<'static, str>) {
        self.push_bytes(as_bytes(name), as_bytes(value));
    }

    /// Adds a pair whose value need not be text (the host checks both).
    pub(crate) fn push_bytes(&mut self, name: Cow<'static, [u8]>, value: Cow<'static, [u8]>) {
        let (name, value) = (self.keep(name), self.keep(value));
        self.pairs.push(Header { name, value });
    }

    /// The pairs, valid for as long as the list lives.
    pub(super) fn as_slice(&self) -> &[Header] {
        &self.pairs
    }

    fn keep(&mut self, bytes: Cow<'static, [u8]>) -> Slice {
        match bytes {
            Cow::Borrowed(bytes) => Slice::new(bytes),
            Cow::Owned(bytes) => {
                let slice = Slice::new(&bytes);
                self.owned.push(bytes);
                slice
            }
        }
    }
}

fn as_bytes(text: Cow<'static, str>) -> Cow<'static, [u8]> {
    match text {
        Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
        Cow::Owned(text) => Cow::Owned(text.into_bytes()),
    }
}
