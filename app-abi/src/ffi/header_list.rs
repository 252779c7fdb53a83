//! Response headers in the C form the host reads, with the text they point to.
//!
//! A [`Response`](crate::Response) keeps its headers as [`Header`]s from the
//! start, so handing them to the host costs no conversion. The host reads
//! those pointers until `drop_response`, so the rule that keeps them valid
//! lives here, behind private fields: every [`Slice`] points at `'static`
//! bytes or at a buffer this list owns (a `Vec` that moves keeps its heap
//! buffer, so the pointers survive the list being moved). The array of
//! pairs itself may be inside the list: the host is given its address only
//! once the list is in the future's state, where it stays.

use std::borrow::Cow;

use super::abi::{Header, Slice};

/// How many pairs a list holds without allocating: most responses carry
/// one to three headers.
const INLINE: usize = 4;

/// Header name/value pairs, each `'static` or owned. The first [`INLINE`]
/// pairs live in the list itself (a response's headers cost no allocation);
/// more move to a `Vec`. The host reads [`HeaderList::as_slice`] only once
/// the list has stopped moving (it lives in the future's state then).
pub(crate) struct HeaderList {
    inline: [Header; INLINE],
    len: usize,
    /// All the pairs, once there are more than `INLINE`.
    spilled: Vec<Header>,
    owned: Vec<Vec<u8>>,
}

impl Default for HeaderList {
    fn default() -> HeaderList {
        const EMPTY: Header = Header { name: Slice::EMPTY, value: Slice::EMPTY };
        HeaderList { inline: [EMPTY; INLINE], len: 0, spilled: Vec::new(), owned: Vec::new() }
    }
}

impl HeaderList {
    /// Adds a pair (it does not replace one of the same name).
    pub(crate) fn push(&mut self, name: Cow<'static, str>, value: Cow<'static, str>) {
        self.push_bytes(as_bytes(name), as_bytes(value));
    }

    /// Adds a pair whose value need not be text (the host checks both).
    pub(crate) fn push_bytes(&mut self, name: Cow<'static, [u8]>, value: Cow<'static, [u8]>) {
        let pair = Header { name: self.keep(name), value: self.keep(value) };
        if self.len < INLINE {
            self.inline[self.len] = pair;
        } else {
            if self.len == INLINE {
                self.spilled.extend_from_slice(&self.inline);
            }
            self.spilled.push(pair);
        }
        self.len += 1;
    }

    /// The pairs, valid for as long as the list lives where it is.
    pub(super) fn as_slice(&self) -> &[Header] {
        match self.len {
            0..=INLINE => &self.inline[..self.len],
            _ => &self.spilled,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &HeaderList) -> Vec<String> {
        // SAFETY: the slices point at bytes the list keeps.
        list.as_slice()
            .iter()
            .map(|pair| String::from_utf8_lossy(unsafe { pair.name.as_bytes() }).into_owned())
            .collect()
    }

    #[test]
    fn pairs_past_the_inline_ones_keep_their_order() {
        let mut list = HeaderList::default();
        let expected: Vec<String> = (0..INLINE + 3).map(|i| format!("x-{i}")).collect();
        for (i, name) in expected.iter().enumerate() {
            list.push(Cow::Owned(name.clone()), Cow::Borrowed("v"));
            assert_eq!(names(&list), expected[..=i], "after {} pairs", i + 1);
        }
    }
}
