//! Checks on a library's bytes that need no loading: a complete 64-bit little-endian ELF
//! shared object for this machine, and its manifest section.
//!
//! Completeness matters: `dlopen` of a truncated ELF dies with SIGBUS inside the loader
//! instead of returning an error, so the file must reach the end of its section-header table
//! (linkers put it last; a file cut anywhere fails this). Bytes after the table are accepted:
//! a file longer than its headers say is not a partial write.

use std::path::Path;

use object::{Object as _, ObjectSection as _};
use plugind_api::manifest::{self, Manifest, ManifestError};

use super::LoadError;

const ET_DYN: u16 = 3;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_FLAGS_1: u64 = 0x6fff_fffb;
const DF_1_PIE: u64 = 0x0800_0000;

#[cfg(target_arch = "x86_64")]
const HOST_MACHINE: u16 = 62;
#[cfg(target_arch = "aarch64")]
const HOST_MACHINE: u16 = 183;

/// Checks that `bytes` are a complete ELF shared library for this machine.
pub(super) fn check(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    let refuse = |reason: String| LoadError::NotSharedObject {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < 64 || bytes[..4] != *b"\x7fELF" {
        return Err(refuse("no ELF header".to_owned()));
    }
    if bytes[4] != ELFCLASS64 || bytes[5] != ELFDATA2LSB {
        return Err(refuse("not a 64-bit little-endian ELF file".to_owned()));
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u32_at = |at: usize| {
        u32::from_le_bytes(
            bytes[at..at + 4]
                .try_into()
                .expect("a 4-byte slice converts to [u8; 4]"),
        )
    };
    let u64_at = |at: usize| {
        u64::from_le_bytes(
            bytes[at..at + 8]
                .try_into()
                .expect("an 8-byte slice converts to [u8; 8]"),
        )
    };
    if u16_at(16) != ET_DYN {
        return Err(refuse(
            "an ELF file that is not a shared library".to_owned(),
        ));
    }
    let machine = u16_at(18);
    if machine != HOST_MACHINE {
        return Err(refuse(format!(
            "built for ELF machine {machine}, this daemon runs on {HOST_MACHINE}"
        )));
    }
    let size = bytes.len() as u64;
    let shoff = u64_at(40);
    let shentsize = u64::from(u16_at(58));
    let shnum = u64::from(u16_at(60));
    let expected = shoff.saturating_add(shentsize.saturating_mul(shnum));
    if shoff == 0 {
        return Err(refuse("no section header table".to_owned()));
    }
    // Bytes after the table (a signature appended, padding) are no sign of a partial write;
    // a file that ends before the table does is one (linkers write the table last).
    if expected > size {
        return Err(LoadError::Incomplete {
            path: path.to_owned(),
            size,
            expected,
        });
    }
    // A position-independent executable is ET_DYN too; linkers mark it DF_1_PIE.
    // (A program interpreter is no sign: glibc's libc.so.6 has one and is a library.)
    let phoff = u64_at(32);
    let phentsize = u64::from(u16_at(54));
    let phnum = u64::from(u16_at(56));
    let within = |at: u64, len: u64| {
        usize::try_from(at).ok().filter(|&at| {
            at.checked_add(len as usize)
                .is_some_and(|end| end <= bytes.len())
        })
    };
    for index in 0..phnum {
        let header = phoff.saturating_add(index.saturating_mul(phentsize));
        let Some(header) = within(header, 56) else {
            return Err(refuse("program headers outside the file".to_owned()));
        };
        if u32_at(header) != PT_DYNAMIC {
            continue;
        }
        let (offset, size) = (u64_at(header + 8), u64_at(header + 32));
        let Some(start) = within(offset, size) else {
            return Err(refuse("dynamic section outside the file".to_owned()));
        };
        for entry in (start..start + size as usize)
            .step_by(16)
            .take_while(|e| e + 16 <= bytes.len())
        {
            let (tag, value) = (u64_at(entry), u64_at(entry + 8));
            if tag == DT_NULL {
                break;
            }
            if tag == DT_FLAGS_1 && value & DF_1_PIE != 0 {
                return Err(refuse(
                    "an executable (marked PIE), not a library".to_owned(),
                ));
            }
        }
    }
    Ok(())
}

/// Decodes the manifest section.
pub(super) fn manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, LoadError> {
    let file = object::File::parse(bytes).map_err(|e| LoadError::NotSharedObject {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let section = file
        .section_by_name(manifest::SECTION_NAME)
        .ok_or(LoadError::NoManifest {
            path: path.to_owned(),
            section: manifest::SECTION_NAME,
        })?;
    let data = section.data().map_err(|e| LoadError::ManifestMalformed {
        path: path.to_owned(),
        error: ManifestError::Json(e.to_string()),
    })?;
    Manifest::decode(data).map_err(|error| LoadError::ManifestMalformed {
        path: path.to_owned(),
        error,
    })
}

/// Checks the declared `plugind-api` version: the same major as this daemon's.
pub(super) fn check_api_version(path: &Path, declared: &str) -> Result<(), LoadError> {
    let major = |version: &str| version.split('.').next().map(str::to_owned);
    if major(declared).is_some() && major(declared) == major(plugind_api::API_VERSION) {
        return Ok(());
    }
    Err(LoadError::IncompatibleApiVersion {
        path: path.to_owned(),
        expected: format!("{}.x", major(plugind_api::API_VERSION).unwrap_or_default()),
        found: declared.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_file_is_not_a_shared_object() {
        let e = check(Path::new("x.so"), b"hello").unwrap_err();
        assert!(matches!(e, LoadError::NotSharedObject { .. }), "{e}");
    }

    #[test]
    fn a_file_cut_by_one_byte_is_incomplete() {
        // Rust links test binaries as PIE, which are ET_DYN like a shared library.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let cut = &me[..me.len() - 1];
        match check(Path::new("cut"), cut) {
            Err(LoadError::Incomplete { size, expected, .. }) => assert_eq!(size + 1, expected),
            other => panic!("a truncated file passed or failed otherwise: {other:?}"),
        }
    }

    /// Found by the hostile-input campaign: a library with bytes after its section headers
    /// (a signature appended, say) was refused as "incomplete".
    #[test]
    fn bytes_after_the_section_headers_are_not_an_incomplete_file() {
        let mut me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        me.extend_from_slice(b"appended after the section headers");
        match check(Path::new("long"), &me) {
            // The test binary is a PIE: refused as an executable, past the completeness check.
            Err(LoadError::NotSharedObject { reason, .. }) => {
                assert!(reason.contains("executable"), "{reason}")
            }
            other => panic!("a file with trailing bytes failed otherwise: {other:?}"),
        }
    }

    #[test]
    fn an_executable_is_not_a_library() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        match check(Path::new("me"), &me) {
            Err(LoadError::NotSharedObject { reason, .. }) => {
                assert!(reason.contains("executable"), "{reason}")
            }
            other => panic!("an executable passed: {other:?}"),
        }
    }

    #[test]
    fn only_the_same_api_major_is_accepted() {
        assert!(check_api_version(Path::new("p"), "1.0.0").is_ok());
        assert!(check_api_version(Path::new("p"), "1.7.2").is_ok());
        for bad in ["2.0.0", "0.9.0", "", "x"] {
            match check_api_version(Path::new("p"), bad) {
                Err(LoadError::IncompatibleApiVersion {
                    expected, found, ..
                }) => {
                    assert_eq!((expected.as_str(), found.as_str()), ("1.x", bad))
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
