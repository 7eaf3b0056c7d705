//! `plugind ctl enable|disable`: the one key changed in `plugins.toml`, everything else kept
//! as written (comments, layout, order), the file replaced atomically with its mode and owner.

use std::{
    io::Write as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use sha2::{Digest as _, Sha256};

/// Sets `enabled` of `[plugins.NAME]` in `path`, keeping everything else as written; writes
/// a temporary file with the same mode and owner and renames it over `path`. Returns the
/// new file's SHA-256, or `None` when the file already said so and was left alone.
pub(super) fn edit_enabled(
    path: &Path,
    name: &str,
    enabled: bool,
) -> Result<Option<[u8; 32]>, String> {
    // Resolved once: the temporary file, the rename and the folder's sync use this one path.
    let path = &std::path::absolute(path)
        .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut document: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| format!("{}: cannot edit: {e}", path.display()))?;
    let table = document
        .get_mut("plugins")
        .and_then(|p| p.as_table_like_mut())
        .and_then(|p| p.get_mut(name))
        .and_then(|i| i.as_table_like_mut())
        .ok_or_else(|| {
            format!(
                "{}: no [plugins.{name}] table (an autoloaded instance is switched off by \
                 adding one with enabled = false)",
                path.display()
            )
        })?;
    match table
        .get_mut("enabled")
        .and_then(toml_edit::Item::as_value_mut)
    {
        // Only the value changes: its comment and spacing stay.
        Some(value) => {
            let decor = value.decor().clone();
            *value = enabled.into();
            *value.decor_mut() = decor;
        }
        None => {
            table.insert("enabled", toml_edit::value(enabled));
        }
    }
    let edited = document.to_string();
    if edited == text {
        return Ok(None);
    }
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{file_name}.plugind-ctl.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(edited.as_bytes())?;
        file.set_permissions(std::fs::Permissions::from_mode(metadata.mode() & 0o7777))?;
        // The same owner where this user may set it (root editing a service's file).
        let _ = std::os::unix::fs::fchown(&file, Some(metadata.uid()), Some(metadata.gid()));
        file.sync_all()?;
        std::fs::rename(&temp, path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&temp);
        return Err(format!(
            "cannot write {}: {e}; it was not changed",
            path.display()
        ));
    }
    // The file is in place from here on: a failure says so.
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        return Err(format!(
            "{} was written (enabled = {enabled} for `{name}`), but its folder {} could not be \
             synced ({e}); the reload was not asked for: run `plugind ctl reload`",
            path.display(),
            dir.display()
        ));
    }
    Ok(Some(Sha256::digest(edited.as_bytes()).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# top comment\n[host]\nautoload = false  # trailing\n\n\
                        [plugins.a]\nplugin   = \"x\"   # aligned\n\n[plugins.b]\nplugin = \"y\"\n\
                        enabled = true\n";

    #[test]
    fn only_the_one_key_changes_and_the_mode_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugins.toml");
        std::fs::write(&path, TEXT).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let hash = edit_enabled(&path, "a", false).unwrap();
        let edited = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            edited,
            TEXT.replace("# aligned\n", "# aligned\nenabled = false\n")
        );
        assert_eq!(hash, Some(Sha256::digest(edited.as_bytes()).into()));
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(
            edit_enabled(&path, "a", false),
            Ok(None),
            "already so: left alone"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o777,
            0o640,
            "same mode"
        );
        edit_enabled(&path, "b", false).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with("plugin = \"y\"\nenabled = false\n")
        );
        // The edited line's trailing comment stays; only the value changes.
        std::fs::write(&path, "[plugins.c]\nenabled = true   # keep me\n").unwrap();
        edit_enabled(&path, "c", false).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "[plugins.c]\nenabled = false   # keep me\n"
        );
        let missing = edit_enabled(&path, "zzz", true).unwrap_err();
        assert!(missing.contains("no [plugins.zzz] table"), "{missing}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left behind"
        );
    }
}
