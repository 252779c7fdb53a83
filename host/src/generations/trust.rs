//! Library trust, like sshd's `StrictModes`: the host runs the code in the
//! library file, so whoever can change that file, or rename another file
//! into its place, can run code as the server. It refuses a library file
//! that is writable by its group or by others, or that sits in a directory
//! (up to `/`) that is, or any of them owned by a user other than root or
//! the user running the server.
//!
//! A directory writable by group or others is accepted only with the sticky
//! bit (like `/tmp`): then only a file's owner (trusted, checked above) may
//! rename or remove it. The file itself never gets that exception.
//!
//! Only the standard library: modes and owners from [`MetadataExt`].

use std::fmt;
use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Logged once at start when the check is turned off.
pub const TURNED_OFF: &str =
    "--allow-insecure-library: the library is loaded even if users other than root and this one could change it";

const GROUP_WRITE: u32 = 0o020;
const OTHER_WRITE: u32 = 0o002;
const STICKY: u32 = 0o1000;

/// One reason a library cannot be trusted, with the command that fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The library file is writable by its group or by others.
    WritableFile { path: PathBuf, mode: u32 },
    /// A directory above the file is writable by its group or by others and
    /// has no sticky bit.
    WritableDirectory { path: PathBuf, mode: u32 },
    /// The file or a directory above it belongs to neither root nor the
    /// server's user.
    Owner { path: PathBuf, owner: u32, directory: bool, server_uid: u32 },
    /// A directory above the file could not be inspected.
    Uninspectable { path: PathBuf, error: String },
}

impl Problem {
    /// The path the problem is about.
    pub fn path(&self) -> &Path {
        match self {
            Problem::WritableFile { path, .. }
            | Problem::WritableDirectory { path, .. }
            | Problem::Owner { path, .. }
            | Problem::Uninspectable { path, .. } => path,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::WritableFile { path, mode } => write!(
                f,
                "the file {} is writable by {} (mode {:04o}); fix: `chmod go-w {}`",
                path.display(),
                writers(*mode),
                mode & 0o7777,
                quoted(path)
            ),
            Problem::WritableDirectory { path, mode } => write!(
                f,
                "the directory {} is writable by {} (mode {:04o}) without the sticky bit; fix: `chmod go-w {}`",
                path.display(),
                writers(*mode),
                mode & 0o7777,
                quoted(path)
            ),
            Problem::Owner { path, owner, directory, server_uid } => {
                let what = if *directory { "directory" } else { "file" };
                write!(
                    f,
                    "the {what} {} is owned by uid {owner}, neither root nor the user running pounce-host (uid {server_uid}); fix: `chown root {}`",
                    path.display(),
                    quoted(path)
                )?;
                if *server_uid != 0 {
                    write!(f, " (or `chown {server_uid} {}`)", quoted(path))?;
                }
                Ok(())
            }
            Problem::Uninspectable { path, error } => {
                write!(f, "cannot inspect the directory {} to check it: {error}", path.display())
            }
        }
    }
}

/// Every reason a library cannot be trusted, nearest the file first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insecure {
    problems: Vec<Problem>,
}

impl Insecure {
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

impl fmt::Display for Insecure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("refusing to load a library that other users could change: ")?;
        for (n, problem) in self.problems.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        f.write_str(" (--allow-insecure-library loads it anyway)")
    }
}

/// Checks the library file whose metadata is `file` (taken from the open
/// file, so it is the file that will be loaded) and whose canonical path
/// (absolute, no symbolic links) is `path`, and every directory above it,
/// for a server running as `server_uid`.
pub fn check(file: &Metadata, path: &Path, server_uid: u32) -> Result<(), Insecure> {
    let trusted = |owner: u32| owner == 0 || owner == server_uid;
    let mut problems = Vec::new();
    if !trusted(file.uid()) {
        problems.push(Problem::Owner { path: path.to_owned(), owner: file.uid(), directory: false, server_uid });
    }
    if file.mode() & (GROUP_WRITE | OTHER_WRITE) != 0 {
        problems.push(Problem::WritableFile { path: path.to_owned(), mode: file.mode() });
    }
    for dir in path.ancestors().skip(1).filter(|dir| !dir.as_os_str().is_empty()) {
        let metadata = match fs::metadata(dir) {
            Ok(metadata) => metadata,
            Err(error) => {
                problems.push(Problem::Uninspectable { path: dir.to_owned(), error: error.to_string() });
                continue;
            }
        };
        if !trusted(metadata.uid()) {
            problems.push(Problem::Owner { path: dir.to_owned(), owner: metadata.uid(), directory: true, server_uid });
        }
        let mode = metadata.mode();
        if mode & (GROUP_WRITE | OTHER_WRITE) != 0 && mode & STICKY == 0 {
            problems.push(Problem::WritableDirectory { path: dir.to_owned(), mode });
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Insecure { problems })
    }
}

/// Who may write, by the group and other write bits of `mode`.
fn writers(mode: u32) -> &'static str {
    match (mode & GROUP_WRITE != 0, mode & OTHER_WRITE != 0) {
        (true, true) => "its group and others",
        (true, false) => "its group",
        _ => "others",
    }
}

/// `path` as a shell word, quoted only if it has to be, so the advice can
/// be pasted as it is.
fn quoted(path: &Path) -> String {
    let text = path.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    use super::*;

    /// A directory of the test's own (mode 0755), removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let base = std::env::temp_dir().canonicalize().expect("temp dir exists");
            let path = base.join(format!("pounce-trust-test-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::DirBuilder::new().mode(0o755).create(&path).expect("temp dir is writable");
            chmod(&path, 0o755);
            Scratch(path)
        }

        /// A file in `dir` (relative to the scratch directory) with `mode`.
        fn file(&self, dir: &str, mode: u32) -> PathBuf {
            let dir = self.0.join(dir);
            fs::create_dir_all(&dir).unwrap();
            let path = dir.join("libapp.so");
            fs::write(&path, b"library").unwrap();
            chmod(&path, mode);
            path
        }

        fn dir(&self, dir: &str, mode: u32) -> PathBuf {
            let path = self.0.join(dir);
            fs::create_dir_all(&path).unwrap();
            chmod(&path, mode);
            path
        }

        /// The problems `check` finds at or below the scratch directory (the
        /// directories above it belong to the machine running the tests).
        fn problems(&self, file: &Path, server_uid: u32) -> Vec<Problem> {
            let metadata = fs::metadata(file).unwrap();
            match check(&metadata, file, server_uid) {
                Ok(()) => Vec::new(),
                Err(insecure) => insecure.problems.into_iter().filter(|p| p.path().starts_with(&self.0)).collect(),
            }
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn me(path: &Path) -> u32 {
        fs::metadata(path).unwrap().uid()
    }

    #[test]
    fn a_private_library_passes() {
        let scratch = Scratch::new("private");
        for mode in [0o644, 0o755, 0o600, 0o640, 0o444] {
            let file = scratch.file("app", mode);
            scratch.dir("app", 0o750);
            assert_eq!(scratch.problems(&file, me(&file)), [], "mode {mode:o}");
        }
    }

    #[test]
    fn a_group_or_world_writable_file_is_refused_even_in_a_sticky_directory() {
        let scratch = Scratch::new("writable-file");
        scratch.dir("sticky", 0o1777);
        for mode in [0o666, 0o664, 0o646, 0o775, 0o777] {
            let file = scratch.file("sticky", mode);
            let problems = scratch.problems(&file, me(&file));
            assert_eq!(problems, [Problem::WritableFile { path: file.clone(), mode: 0o100000 | mode }], "{mode:o}");
        }
        let file = scratch.file("sticky", 0o666);
        let message = scratch.problems(&file, me(&file))[0].to_string();
        assert!(message.contains(&format!("fix: `chmod go-w {}`", file.display())), "{message}");
        assert!(message.contains("writable by its group and others (mode 0666)"), "{message}");
    }

    #[test]
    fn a_writable_directory_is_refused_unless_sticky() {
        let scratch = Scratch::new("writable-dir");
        let file = scratch.file("shared", 0o644);
        let dir = file.parent().unwrap().to_owned();
        for mode in [0o775, 0o757, 0o777] {
            chmod(&dir, mode);
            let problems = scratch.problems(&file, me(&file));
            assert_eq!(problems, [Problem::WritableDirectory { path: dir.clone(), mode: 0o40000 | mode }], "{mode:o}");
            let message = problems[0].to_string();
            assert!(message.contains(&format!("fix: `chmod go-w {}`", dir.display())), "{message}");
        }
        for mode in [0o1777, 0o1775, 0o755, 0o700] {
            chmod(&dir, mode);
            assert_eq!(scratch.problems(&file, me(&file)), [], "{mode:o}");
        }
    }

    #[test]
    fn every_directory_up_to_the_root_is_checked() {
        let scratch = Scratch::new("ancestors");
        let file = scratch.file("a/b/c", 0o644);
        let a = scratch.dir("a", 0o777);
        let problems = scratch.problems(&file, me(&file));
        assert_eq!(problems, [Problem::WritableDirectory { path: a.clone(), mode: 0o40777 }]);
        chmod(&a, 0o755);
        assert_eq!(scratch.problems(&file, me(&file)), []);
        // The whole walk: "/" is among the directories looked at, and a
        // machine's own / is root's and not writable by others.
        let root = fs::metadata("/").unwrap();
        assert_eq!((root.uid(), root.mode() & 0o022), (0, 0), "/ on this machine");
    }

    #[test]
    fn files_and_directories_of_other_users_are_refused() {
        let scratch = Scratch::new("owner");
        let file = scratch.file("theirs", 0o644);
        let dir = file.parent().unwrap().to_owned();
        let mine = me(&file);
        // Another user: as root, really hand the file over; otherwise play a
        // server running as someone else, to whom our files are foreign.
        let (stranger, server_uid) = if mine == 0 {
            std::os::unix::fs::chown(&file, Some(4242), None).unwrap();
            std::os::unix::fs::chown(&dir, Some(4242), None).unwrap();
            (4242, 0)
        } else {
            (mine, mine + 1)
        };
        let problems = scratch.problems(&file, server_uid);
        assert!(
            problems.contains(&Problem::Owner { path: file.clone(), owner: stranger, directory: false, server_uid }),
            "{problems:?}"
        );
        assert!(
            problems.contains(&Problem::Owner { path: dir.clone(), owner: stranger, directory: true, server_uid }),
            "{problems:?}"
        );
        let message = problems[0].to_string();
        assert!(message.contains(&format!("fix: `chown root {}`", file.display())), "{message}");
        // Root's files are always trusted, and so are the server user's own.
        if mine == 0 {
            std::os::unix::fs::chown(&file, Some(0), None).unwrap();
            std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
        }
        assert_eq!(scratch.problems(&file, mine), []);
    }

    #[test]
    fn the_message_lists_every_problem_and_the_way_out() {
        let scratch = Scratch::new("message");
        let file = scratch.file("open dir", 0o666);
        let dir = scratch.dir("open dir", 0o777);
        let metadata = fs::metadata(&file).unwrap();
        let insecure = check(&metadata, &file, me(&file)).unwrap_err();
        let message = insecure.to_string();
        assert!(
            message.starts_with("refusing to load a library that other users could change: the file "),
            "{message}"
        );
        assert!(message.contains(&format!("`chmod go-w '{}'`", file.display())), "{message}");
        assert!(message.contains(&format!("`chmod go-w '{}'`", dir.display())), "{message}");
        assert!(message.ends_with("(--allow-insecure-library loads it anyway)"), "{message}");
    }

    #[test]
    fn paths_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(quoted(Path::new("/srv/app/libapp.so")), "/srv/app/libapp.so");
        assert_eq!(quoted(Path::new("/srv/my app/lib.so")), "'/srv/my app/lib.so'");
        assert_eq!(quoted(Path::new("/srv/it's/lib.so")), r"'/srv/it'\''s/lib.so'");
    }
}
