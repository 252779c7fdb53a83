//! Files editors write next to the one being saved.

/// Whether `name` (a file name, not a path) is an editor's temporary or
/// backup file: Emacs `name~`, `.#name` and `#name#`, vim `.name.swp`,
/// `.name.swx` and `4913` (its probe for a writable directory). Watchers
/// skip them: a save would otherwise trigger a reload before the real file
/// is written, or trigger one for a file that is gone a moment later.
pub fn is_editor_temp(name: &str) -> bool {
    name.ends_with('~')
        || name.starts_with(".#")
        || (name.starts_with('#') && name.ends_with('#'))
        || (name.starts_with('.') && (name.ends_with(".swp") || name.ends_with(".swx")))
        || name == "4913"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_temporary_files_are_recognized() {
        for name in ["index.html~", ".index.html.swp", ".index.html.swx", ".#index.html", "#index.html#", "4913"] {
            assert!(is_editor_temp(name), "{name}");
        }
        for name in ["index.html", "main.rs", "a#b", "notes.swp.txt"] {
            assert!(!is_editor_temp(name), "{name}");
        }
    }
}
