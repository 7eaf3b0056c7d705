//! A private temporary directory for a test (mode 0700, removed on drop), with helpers to
//! place files in it the way an operator would (plugin files mode 0644, dirs 0755).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// A temporary directory, removed with everything in it when dropped.
#[derive(Debug)]
pub struct Sandbox {
    path: PathBuf,
}

impl Sandbox {
    /// A new empty directory under the system temp dir, mode 0700.
    pub fn new(label: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "plugind-{label}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("the temp dir is writable");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod works");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates `relative` (and its parents) with mode 0755.
    pub fn dir(&self, relative: &str) -> PathBuf {
        let path = self.path.join(relative);
        fs::create_dir_all(&path).expect("the sandbox is writable");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod works");
        path
    }

    /// Writes `bytes` at `relative`, mode 0644.
    pub fn put(&self, relative: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path.join(relative);
        fs::write(&path, bytes).expect("the sandbox is writable");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod works");
        path
    }

    /// Copies `from` to `relative`, mode 0644.
    pub fn copy(&self, relative: &str, from: &Path) -> PathBuf {
        self.put(relative, fs::read(from).expect("the source is readable"))
    }

    /// A new sandbox (named after `label`) whose `plugins.d` holds the dev build of each
    /// fixture crate of `fixtures` (`"fx-echo"` → `plugins.d/fx-echo.so`).
    pub fn with_fixtures(label: &str, fixtures: &[&str]) -> Self {
        let sandbox = Self::new(label);
        sandbox.dir("plugins.d");
        for fixture in fixtures {
            sandbox.copy(
                &format!("plugins.d/{fixture}.so"),
                &crate::fixtures::library(fixture, crate::fixtures::Profile::Dev),
            );
        }
        sandbox
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
