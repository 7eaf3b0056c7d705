//! Opens a plugin file the way sudo and sshd open what they trust: relative to its
//! directory's fd, never through a symlink, judged by `fstat` of the open fd, and read once.
//!
//! Refused: anything that is not a regular file; a file writable by group or others; a file
//! owned by someone outside the trusted owners (the daemon's own user is always trusted); a
//! file in a directory writable by group or others, or whose ancestors are (sticky
//! world-writable ancestors such as `/tmp` are accepted: nobody can rename another's entry
//! there); directories owned by someone other than root, the daemon's user or a trusted owner.

use std::{
    ffi::{CStr, CString, OsStr},
    fs::File,
    io::Read as _,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use super::LoadError;

/// The largest plugin file accepted; a guard against reading a device or a runaway file.
const MAX_SIZE: u64 = 1 << 30;

/// What the file checks need to know.
#[derive(Debug, Clone)]
pub(super) struct Owners {
    /// Trusted owners besides the daemon's own user.
    pub(super) trusted: Vec<u32>,
}

impl Owners {
    fn trusts(&self, uid: u32) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        uid == unsafe { libc::geteuid() } || self.trusted.contains(&uid)
    }

    fn trusts_dir(&self, uid: u32) -> bool {
        uid == 0 || self.trusts(uid)
    }

    fn describe(&self) -> String {
        // SAFETY: as above.
        let mut names = vec![user_label(unsafe { libc::geteuid() })];
        names.extend(self.trusted.iter().map(|&uid| user_label(uid)));
        names.dedup();
        names.join(", ")
    }
}

/// A file's bytes and where they came from.
#[derive(Debug)]
pub(super) struct FileBytes {
    pub(super) bytes: Vec<u8>,
}

/// Opens `path` below its parent directory without following a symlink, checks it and its
/// directories, and reads it whole.
pub(super) fn read(path: &Path, owners: &Owners) -> Result<FileBytes, LoadError> {
    let (dir, name) = split(path)?;
    let dir_fd = open_dir(&dir, path)?;
    check_dirs(&dir, &dir_fd, path, owners)?;
    let fd = open_beneath(&dir_fd, name, path)?;
    let stat = fstat(&fd).map_err(|source| read_error(path, source))?;
    check_file(path, &stat, owners)?;
    let mut bytes = Vec::with_capacity(usize::try_from(stat.st_size).unwrap_or(0));
    File::from(fd)
        .take(MAX_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| read_error(path, source))?;
    if bytes.len() as u64 > MAX_SIZE {
        return Err(too_large(path));
    }
    Ok(FileBytes { bytes })
}

/// Checks directory `dir` and its ancestors as [`read`] checks the directories above every
/// file it reads (mode and owner).
pub(super) fn check_dir(dir: &Path, owners: &Owners) -> Result<(), LoadError> {
    let dir_fd = open_dir(dir, dir)?;
    check_dirs(dir, &dir_fd, dir, owners)
}

/// The refusal of a file larger than [`MAX_SIZE`].
pub(super) fn too_large(path: &Path) -> LoadError {
    LoadError::NotSharedObject {
        path: path.to_owned(),
        reason: format!("larger than {} MiB", MAX_SIZE >> 20),
    }
}

/// `path`'s directory (`.` when it has none) and file name.
fn split(path: &Path) -> Result<(PathBuf, &OsStr), LoadError> {
    let name = path.file_name().ok_or_else(|| LoadError::NotFound {
        path: path.to_owned(),
    })?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

fn read_error(path: &Path, source: std::io::Error) -> LoadError {
    LoadError::Read {
        path: path.to_owned(),
        source,
    }
}

fn open_dir(dir: &Path, file: &Path) -> Result<OwnedFd, LoadError> {
    let c_dir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| LoadError::NotFound {
        path: file.to_owned(),
    })?;
    // SAFETY: `c_dir` is a valid C string; the flags are valid open flags.
    let fd = unsafe {
        libc::open(
            c_dir.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        return Err(match error.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => LoadError::NotFound {
                path: file.to_owned(),
            },
            _ => read_error(file, error),
        });
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_beneath(dir: &OwnedFd, name: &OsStr, path: &Path) -> Result<OwnedFd, LoadError> {
    let c_name = CString::new(name.as_bytes()).map_err(|_| LoadError::NotFound {
        path: path.to_owned(),
    })?;
    // O_NOFOLLOW refuses a symlink as the last (and only) component; O_NONBLOCK keeps a FIFO
    // from blocking the open, so that fstat can refuse it.
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: `dir` is an open directory fd and `c_name` a valid C string without '/'.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c_name.as_ptr(), flags) };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        return Err(match error.raw_os_error() {
            Some(libc::ENOENT) => LoadError::NotFound {
                path: path.to_owned(),
            },
            Some(libc::ELOOP) => LoadError::NotRegularFile {
                path: path.to_owned(),
                kind: "a symlink (symlinks are refused)",
            },
            _ => read_error(path, error),
        });
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `stat` is a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat)
}

fn kind_of(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symlink (symlinks are refused)",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "not a regular file",
    }
}

fn check_file(path: &Path, stat: &libc::stat, owners: &Owners) -> Result<(), LoadError> {
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(LoadError::NotRegularFile {
            path: path.to_owned(),
            kind: kind_of(stat.st_mode),
        });
    }
    check_mode(path, "file", stat.st_mode)?;
    if !owners.trusts(stat.st_uid) {
        return Err(LoadError::UntrustedOwner {
            path: path.to_owned(),
            owner: user_label(stat.st_uid),
            trusted: owners.describe(),
        });
    }
    Ok(())
}

fn check_mode(path: &Path, what: &'static str, mode: libc::mode_t) -> Result<(), LoadError> {
    let bit = if mode & libc::S_IWOTH != 0 {
        "writable by others (o+w)"
    } else if mode & libc::S_IWGRP != 0 {
        "writable by its group (g+w)"
    } else {
        return Ok(());
    };
    Err(LoadError::UnsafePermissions {
        path: path.to_owned(),
        what,
        bit,
        mode: mode & 0o7777,
    })
}

/// The directory holding the file (through its open fd) and every ancestor of it.
fn check_dirs(dir: &Path, dir_fd: &OwnedFd, file: &Path, owners: &Owners) -> Result<(), LoadError> {
    let stat = fstat(dir_fd).map_err(|source| read_error(file, source))?;
    check_mode(dir, "directory", stat.st_mode)?;
    if !owners.trusts_dir(stat.st_uid) {
        return Err(LoadError::UntrustedOwner {
            path: dir.to_owned(),
            owner: user_label(stat.st_uid),
            trusted: format!("root, {}", owners.describe()),
        });
    }
    let canonical = std::fs::canonicalize(dir).map_err(|source| read_error(file, source))?;
    for ancestor in canonical.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor).map_err(|source| read_error(file, source))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
        let sticky = mode & libc::S_ISVTX != 0;
        if !sticky {
            check_mode(ancestor, "ancestor directory", mode)?;
        }
        let uid = std::os::unix::fs::MetadataExt::uid(&meta);
        if !owners.trusts_dir(uid) {
            return Err(LoadError::UntrustedOwner {
                path: ancestor.to_owned(),
                owner: user_label(uid),
                trusted: format!("root, {}", owners.describe()),
            });
        }
    }
    Ok(())
}

/// `name (uid)` when the user database knows the uid, else the number.
pub(super) fn user_label(uid: u32) -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: an all-zero `passwd` is a valid value of this plain C struct.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `pwd`'s fields.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() && !pwd.pw_name.is_null() {
        // SAFETY: `pw_name` points into `buf`, NUL-terminated by getpwuid_r.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) };
        format!("{} (uid {uid})", name.to_string_lossy())
    } else {
        format!("uid {uid}")
    }
}

/// The uid of user `name`, if the user database knows it.
pub fn uid_of(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: an all-zero `passwd` is a valid value of this plain C struct.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(pwd.pw_uid)
}

/// The gid of group `name` and the names of its listed members, if the group database knows
/// it.
pub fn group_of(name: &str) -> Option<(u32, Vec<String>)> {
    let c_name = CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero `group` is a valid value of this plain C struct.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    let mut members = Vec::new();
    let mut member = grp.gr_mem;
    // SAFETY: `gr_mem` is a NULL-terminated array of NUL-terminated strings in `buf`, which
    // outlives this loop.
    unsafe {
        while !member.is_null() && !(*member).is_null() {
            members.push(
                std::ffi::CStr::from_ptr(*member)
                    .to_string_lossy()
                    .into_owned(),
            );
            member = member.add(1);
        }
    }
    Some((grp.gr_gid, members))
}
