//! Where the workspace is, where cargo builds it, and which cargo to run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (this crate's parent directory), fixed at compile
/// time: the tools run from the checkout they were built in.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Where cargo puts the workspace's builds: `$CARGO_TARGET_DIR` when set
/// (cargo honours it, so built binaries are there), else `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

/// A command running cargo: `$CARGO`, which cargo sets for what it runs
/// (tests, `cargo run`, so `cargo xtask`), keeps the toolchain the developer
/// chose (`cargo +nightly ...`); plain `cargo` otherwise. The working
/// directory is left to the caller: cargo reads its configuration from
/// there, which differs for an app outside the workspace.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_is_the_checkout_root() {
        let root = workspace();
        assert!(root.join("Cargo.toml").is_file(), "{}", root.display());
        assert!(root.join("devkit/src/lib.rs").is_file(), "{}", root.display());
    }
}
