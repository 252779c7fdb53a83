//! Just enough ELF to reject a damaged library before the dynamic loader
//! maps it.
//!
//! `dlopen` happily maps a truncated file: the missing tail is mapped past
//! the end of the file, and the first access to it kills the process with
//! SIGBUS, possibly in the middle of serving. So before loading, the host
//! checks that the file is a 64-bit little-endian shared object and that
//! every loadable segment and the section header table lie inside it.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What is wrong with a file that claims to be ELF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElfProblem {
    NotElf,
    Unsupported(&'static str),
    NotShared,
    Truncated { needed: u64, actual: u64 },
}

impl fmt::Display for ElfProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfProblem::NotElf => f.write_str("not an ELF file"),
            ElfProblem::Unsupported(what) => write!(f, "unsupported ELF file: {what}"),
            ElfProblem::NotShared => f.write_str("an ELF file, but not a shared library (ELF type is not ET_DYN)"),
            ElfProblem::Truncated { needed, actual } => {
                write!(f, "truncated: its headers need {needed} bytes but the file has {actual}")
            }
        }
    }
}

const PT_LOAD: u32 = 1;
const ET_DYN: u16 = 3;

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// How much of a file [`check_file`] reads: the ELF and program headers of
/// any real library fit (they sit at the start of the file).
const HEAD: u64 = 64 << 10;

/// Checks that `bytes` is a complete 64-bit little-endian ELF shared object.
pub fn check(bytes: &[u8]) -> Result<(), ElfProblem> {
    check_head(bytes, bytes.len() as u64)
}

/// [`check`] for a file, reading only its headers (the rest of a library of
/// several MiB does not need to pass through memory to be checked).
pub fn check_file(path: &Path) -> io::Result<Result<(), ElfProblem>> {
    check_open_file(&File::open(path)?)
}

/// [`check_file`] for a file already open (an in-memory copy, say); reads
/// at offset 0 whatever the file's position.
pub fn check_open_file(file: &File) -> io::Result<Result<(), ElfProblem>> {
    let len = file.metadata()?.len();
    let mut head = vec![0; usize::try_from(len.min(HEAD)).unwrap_or(0)];
    file.read_exact_at(&mut head, 0)?;
    Ok(check_head(&head, len))
}

/// Checks the file whose first bytes are `bytes` and whose size is `actual`.
fn check_head(bytes: &[u8], actual: u64) -> Result<(), ElfProblem> {
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err(ElfProblem::NotElf);
    }
    let truncated = |needed: u64| ElfProblem::Truncated { needed, actual };
    if bytes.len() < 64 {
        return Err(truncated(64));
    }
    if bytes[4] != 2 {
        return Err(ElfProblem::Unsupported("not 64-bit"));
    }
    if bytes[5] != 1 {
        return Err(ElfProblem::Unsupported("not little-endian"));
    }
    if u16_at(bytes, 16) != Some(ET_DYN) {
        return Err(ElfProblem::NotShared);
    }
    let header = |at| u64_at(bytes, at).ok_or(truncated(64));
    let (phoff, shoff) = (header(32)?, header(40)?);
    let phentsize = u64::from(u16_at(bytes, 54).unwrap_or(0));
    let phnum = u64::from(u16_at(bytes, 56).unwrap_or(0));
    let shentsize = u64::from(u16_at(bytes, 58).unwrap_or(0));
    let shnum = u64::from(u16_at(bytes, 60).unwrap_or(0));
    let end = |offset: u64, size: u64| offset.saturating_add(size);
    let headers_end = end(phoff, phentsize.saturating_mul(phnum));
    if headers_end > actual {
        return Err(truncated(headers_end));
    }
    if headers_end > bytes.len() as u64 {
        return Err(ElfProblem::Unsupported("program headers beyond the first 64 KiB"));
    }
    let mut needed = end(shoff, shentsize.saturating_mul(shnum));
    for index in 0..phnum {
        let at = usize::try_from(phoff + index * phentsize).map_err(|_| truncated(headers_end))?;
        if u32_at(bytes, at) == Some(PT_LOAD) {
            let offset = u64_at(bytes, at + 8).ok_or(truncated(headers_end))?;
            let filesz = u64_at(bytes, at + 32).ok_or(truncated(headers_end))?;
            needed = needed.max(end(offset, filesz));
        }
    }
    if needed > actual {
        return Err(truncated(needed));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_executable() -> Vec<u8> {
        std::fs::read("/proc/self/exe").expect("read our own executable")
    }

    #[test]
    fn rejects_what_is_not_elf() {
        assert_eq!(check(b"#!/bin/sh\n"), Err(ElfProblem::NotElf));
        assert_eq!(check(b""), Err(ElfProblem::NotElf));
    }

    #[test]
    fn accepts_a_complete_pie_and_rejects_its_truncations() {
        // Test binaries are position-independent executables: ET_DYN, like
        // a shared library, with load segments spanning the file.
        let exe = own_executable();
        assert_eq!(check(&exe), Ok(()));
        for keep in [10, 63, 64, 200, exe.len() / 2, exe.len() - 1] {
            assert!(matches!(check(&exe[..keep]), Err(ElfProblem::Truncated { .. })), "kept {keep} bytes");
        }
    }

    #[test]
    fn checks_a_file_by_its_headers() {
        assert_eq!(check_file(Path::new("/proc/self/exe")).unwrap(), Ok(()));
        let path = std::env::temp_dir().join(format!("pounce-elf-test-{}", std::process::id()));
        let exe = own_executable();
        std::fs::write(&path, &exe[..exe.len() / 2]).unwrap();
        let checked = check_file(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(checked, Err(ElfProblem::Truncated { .. })), "{checked:?}");
    }

    #[test]
    fn checks_an_open_file_from_its_start() {
        use std::io::{Seek, SeekFrom};
        let mut file = File::open("/proc/self/exe").unwrap();
        file.seek(SeekFrom::End(0)).unwrap();
        assert_eq!(check_open_file(&file).unwrap(), Ok(()));
    }

    #[test]
    fn rejects_32_bit_and_big_endian() {
        let mut exe = own_executable();
        exe[5] = 2;
        assert_eq!(check(&exe), Err(ElfProblem::Unsupported("not little-endian")));
        exe[4] = 1;
        assert_eq!(check(&exe), Err(ElfProblem::Unsupported("not 64-bit")));
    }
}
