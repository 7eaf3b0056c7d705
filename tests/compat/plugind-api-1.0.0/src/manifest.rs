//! The plugin manifest: encoded at compile time into a section the host reads without running
//! plugin code, and decoded by the host.
//!
//! Encoding (format version 1): `b"PLUGIND\0"`, then the format version and the JSON length as
//! little-endian `u32`s, then the JSON object
//! `{"format":1,"name":…,"version":…,"api_version":…,"topics":[…],"description":…}`.
//! `export_plugin!` places it in an exported `#[no_mangle]` static in the section
//! [`SECTION_NAME`], which survives `lto = "fat"`, `strip = true` and `opt-level = "z"`
//! (exported symbols are kept by LTO and by `--gc-sections`; `strip` keeps section headers).
//! Readers must use the length field, not the section size.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The ELF section that holds the manifest.
pub const SECTION_NAME: &str = ".plugind_manifest";
/// The exported symbol of the manifest static.
pub const SYMBOL_NAME: &str = "PLUGIND_MANIFEST";
/// The first 8 bytes of an encoded manifest.
pub const MAGIC: [u8; 8] = *b"PLUGIND\0";
/// The encoding this crate writes; readers accept it and refuse newer ones.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = MAGIC.len() + 8;

/// A decoded manifest: what a library says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The encoding's format version.
    pub format: u32,
    /// The plugin's name (`plugin = …` in `plugins.toml` refers to it).
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// The `plugind-api` version the plugin was built against.
    pub api_version: String,
    /// The topic patterns an instance subscribes to unless its config overrides them.
    pub topics: Vec<String>,
    /// One line for operators.
    pub description: String,
}

/// Why bytes are not a valid manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// Shorter than the fixed header or than the length it declares.
    Truncated { needed: usize, found: usize },
    /// The first 8 bytes are not [`MAGIC`].
    BadMagic,
    /// Written by a newer encoder than this reader knows.
    UnsupportedFormat { found: u32, supported: u32 },
    /// The JSON is malformed or lacks a field.
    Json(String),
    /// The JSON's `format` differs from the header's.
    FormatMismatch { header: u32, json: u32 },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, found } => {
                write!(f, "truncated: needs {needed} bytes, found {found}")
            }
            Self::BadMagic => write!(f, "does not start with the manifest magic \"PLUGIND\\0\""),
            Self::UnsupportedFormat { found, supported } => write!(
                f,
                "format version {found} is newer than this daemon reads (up to {supported})"
            ),
            Self::Json(e) => write!(f, "malformed JSON: {e}"),
            Self::FormatMismatch { header, json } => {
                write!(f, "header says format {header} but the JSON says {json}")
            }
        }
    }
}

impl std::error::Error for ManifestError {}

impl Manifest {
    /// Decodes a manifest from the start of `bytes` (section padding after it is ignored).
    ///
    /// # Errors
    /// [`ManifestError`] names what is wrong with the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() < HEADER_LEN {
            return Err(ManifestError::Truncated {
                needed: HEADER_LEN,
                found: bytes.len(),
            });
        }
        if bytes[..MAGIC.len()] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let word = |at: usize| {
            u32::from_le_bytes(
                bytes[at..at + 4]
                    .try_into()
                    .expect("a 4-byte slice converts to [u8; 4]"),
            )
        };
        let format = word(MAGIC.len());
        if format > FORMAT_VERSION || format == 0 {
            return Err(ManifestError::UnsupportedFormat {
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        let len = word(MAGIC.len() + 4) as usize;
        let needed = HEADER_LEN.saturating_add(len);
        if bytes.len() < needed {
            return Err(ManifestError::Truncated {
                needed,
                found: bytes.len(),
            });
        }
        let manifest: Manifest = serde_json::from_slice(&bytes[HEADER_LEN..needed])
            .map_err(|e| ManifestError::Json(e.to_string()))?;
        if manifest.format != format {
            return Err(ManifestError::FormatMismatch {
                header: format,
                json: manifest.format,
            });
        }
        Ok(manifest)
    }

    /// The exact length of the encoded manifest at the start of `bytes`, if its header is
    /// readable. Used to compare a section with the root module's copy byte for byte.
    pub fn encoded_len_of(bytes: &[u8]) -> Option<usize> {
        let len = bytes.get(MAGIC.len() + 4..HEADER_LEN)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        HEADER_LEN.checked_add(len)
    }
}

/// What `export_plugin!` knows at compile time; encoded by [`encode`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct ManifestSource {
    pub name: &'static str,
    pub version: &'static str,
    pub api_version: &'static str,
    pub topics: &'static [&'static str],
    pub description: &'static str,
}

/// The number of bytes [`encode`] writes for `source`.
#[doc(hidden)]
pub const fn encoded_len(source: &ManifestSource) -> usize {
    HEADER_LEN + emit_json(source, &mut [])
}

/// Encodes `source` into exactly `N` bytes; `N` must be [`encoded_len`] of it (checked at
/// compile time when used in a `static`).
#[doc(hidden)]
pub const fn encode<const N: usize>(source: &ManifestSource) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < MAGIC.len() {
        out[i] = MAGIC[i];
        i += 1;
    }
    let json_len = emit_json(source, &mut []);
    assert!(
        N == HEADER_LEN + json_len,
        "manifest buffer has the wrong size"
    );
    put_u32(&mut out, MAGIC.len(), FORMAT_VERSION);
    put_u32(&mut out, MAGIC.len() + 4, json_len as u32);
    let mut json = [0u8; N];
    let written = emit_json(source, &mut json);
    let mut i = 0;
    while i < written {
        out[HEADER_LEN + i] = json[i];
        i += 1;
    }
    out
}

const fn put_u32(out: &mut [u8], at: usize, value: u32) {
    let bytes = value.to_le_bytes();
    let mut i = 0;
    while i < 4 {
        out[at + i] = bytes[i];
        i += 1;
    }
}

/// Writes the JSON into `out` (as far as it reaches; pass `&mut []` to measure) and returns
/// the length the whole JSON needs.
const fn emit_json(source: &ManifestSource, out: &mut [u8]) -> usize {
    let mut at = 0;
    at = raw(out, at, b"{\"format\":");
    at = raw(out, at, FORMAT_DIGITS);
    at = raw(out, at, b",\"name\":");
    at = string(out, at, source.name);
    at = raw(out, at, b",\"version\":");
    at = string(out, at, source.version);
    at = raw(out, at, b",\"api_version\":");
    at = string(out, at, source.api_version);
    at = raw(out, at, b",\"topics\":[");
    let mut t = 0;
    while t < source.topics.len() {
        if t > 0 {
            at = raw(out, at, b",");
        }
        at = string(out, at, source.topics[t]);
        t += 1;
    }
    at = raw(out, at, b"],\"description\":");
    at = string(out, at, source.description);
    raw(out, at, b"}")
}

// Invariant: FORMAT_VERSION is a single digit; `format_digits_match` checks it.
const FORMAT_DIGITS: &[u8] = b"1";

const fn raw(out: &mut [u8], mut at: usize, bytes: &[u8]) -> usize {
    let mut i = 0;
    while i < bytes.len() {
        if at < out.len() {
            out[at] = bytes[i];
        }
        at += 1;
        i += 1;
    }
    at
}

/// Writes `s` as a JSON string literal with the escapes JSON requires.
const fn string(out: &mut [u8], mut at: usize, s: &str) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    at = raw(out, at, b"\"");
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        at = match b {
            b'"' => raw(out, at, b"\\\""),
            b'\\' => raw(out, at, b"\\\\"),
            b'\n' => raw(out, at, b"\\n"),
            b'\r' => raw(out, at, b"\\r"),
            b'\t' => raw(out, at, b"\\t"),
            0..=0x1f => raw(
                out,
                at,
                &[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 0xf) as usize],
                ],
            ),
            _ => raw(out, at, &[b]),
        };
        i += 1;
    }
    raw(out, at, b"\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: ManifestSource = ManifestSource {
        name: "file-sink",
        version: "1.2.3",
        api_version: crate::API_VERSION,
        topics: &["orders.>", "a.*.c"],
        description: "quotes \" backslash \\ newline \n tab \t bell \u{7} and ünïcödé",
    };
    const LEN: usize = encoded_len(&SOURCE);
    static ENCODED: [u8; LEN] = encode::<LEN>(&SOURCE);

    #[test]
    fn format_digits_match() {
        assert_eq!(FORMAT_DIGITS, FORMAT_VERSION.to_string().as_bytes());
    }

    #[test]
    fn round_trips_through_the_const_encoder() {
        let m = Manifest::decode(&ENCODED).expect("the const encoder writes valid manifests");
        assert_eq!(m.format, FORMAT_VERSION);
        assert_eq!(m.name, SOURCE.name);
        assert_eq!(m.version, SOURCE.version);
        assert_eq!(m.api_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(m.topics, ["orders.>", "a.*.c"]);
        assert_eq!(m.description, SOURCE.description);
        assert_eq!(Manifest::encoded_len_of(&ENCODED), Some(LEN));
    }

    #[test]
    fn trailing_padding_is_ignored() {
        let mut padded = ENCODED.to_vec();
        padded.extend_from_slice(&[0; 13]);
        assert_eq!(
            Manifest::decode(&padded).unwrap(),
            Manifest::decode(&ENCODED).unwrap()
        );
    }

    #[test]
    fn every_malformation_is_named() {
        assert_eq!(
            Manifest::decode(&ENCODED[..10]),
            Err(ManifestError::Truncated {
                needed: HEADER_LEN,
                found: 10
            })
        );
        assert_eq!(
            Manifest::decode(&ENCODED[..LEN - 1]),
            Err(ManifestError::Truncated {
                needed: LEN,
                found: LEN - 1
            })
        );
        let mut bad = ENCODED.to_vec();
        bad[0] = b'X';
        assert_eq!(Manifest::decode(&bad), Err(ManifestError::BadMagic));
        let mut newer = ENCODED.to_vec();
        newer[8] = 2;
        assert_eq!(
            Manifest::decode(&newer),
            Err(ManifestError::UnsupportedFormat {
                found: 2,
                supported: 1
            })
        );
        let mut garbled = ENCODED.to_vec();
        garbled[HEADER_LEN] = b'[';
        assert!(matches!(
            Manifest::decode(&garbled),
            Err(ManifestError::Json(_))
        ));
    }
}
