//! What pounce-host's development tools share: the end-to-end tests
//! (`tests/`), `cargo xtask` (`xtask/`) and the host's `--reload` file
//! watcher. One copy of each, so the tools cannot drift apart:
//!
//! - [`workspace`], [`target_dir`], [`cargo`]: where the workspace and its
//!   builds are, and the cargo to build with;
//! - [`ready_address`]: the address a started pounce-host listens on, read
//!   from its machine-readable `server_ready` event (text or JSON logs);
//!   [`log_field`]: any field of any event line, for tools that read more;
//! - [`is_editor_temp`]: files editors write beside the one being saved,
//!   which no watcher should react to.
//!
//! std only, no dependencies.

mod editor;
mod events;
mod workspace;

pub use editor::is_editor_temp;
pub use events::{log_field, ready_address};
pub use workspace::{cargo, target_dir, workspace};
