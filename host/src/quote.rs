//! Untrusted text quoted in error messages. An error names the input at fault, but never
//! grows with it: at most [`MAX_QUOTED`] characters are shown (a 10 MB topic quoted whole made
//! a status too large for its header, and the client saw RESOURCE_EXHAUSTED instead of the
//! reason), and control and invisible characters are escaped so that a quoted name cannot
//! break a log line or hide what it is.

use std::fmt;

/// The most characters of an input an error message shows.
pub const MAX_QUOTED: usize = 200;

/// `text` in double quotes, cut after [`MAX_QUOTED`] characters (then followed by its full
/// length), control and invisible characters written as `\u{…}`, `"` and `\` escaped.
pub fn quote(text: &str) -> Quoted<'_> {
    Quoted(text)
}

/// See [`quote`].
#[derive(Debug, Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(MAX_QUOTED) {
            match c {
                '"' | '\\' => write!(f, "\\{c}")?,
                c if c.is_control() || invisible(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => write!(f, "{c}")?,
            }
        }
        if chars.next().is_some() {
            write!(f, "…\" ({} bytes)", self.0.len())
        } else {
            f.write_str("\"")
        }
    }
}

/// Whether `c` is a format character (Unicode general category Cf): zero-width characters,
/// bidirectional controls, the byte-order mark, tags and the like. They change how text
/// around them looks, or look like nothing: two topics or header names that print alike
/// must be the same bytes.
pub fn invisible(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_quoted_whole() {
        assert_eq!(quote("orders.eu").to_string(), "\"orders.eu\"");
        assert_eq!(quote("").to_string(), "\"\"");
        assert_eq!(quote("say \"hi\"").to_string(), "\"say \\\"hi\\\"\"");
    }

    #[test]
    fn long_text_is_cut_and_its_length_given() {
        let long = "x".repeat(1_000_000);
        let quoted = quote(&long).to_string();
        assert_eq!(
            quoted,
            format!("\"{}…\" ({} bytes)", "x".repeat(MAX_QUOTED), long.len())
        );
        // Exactly the limit is not cut.
        let exact = "y".repeat(MAX_QUOTED);
        assert_eq!(quote(&exact).to_string(), format!("\"{exact}\""));
        // Characters, not bytes: a multi-byte character is never split.
        let wide = "é".repeat(MAX_QUOTED + 1);
        assert!(
            quote(&wide)
                .to_string()
                .starts_with(&format!("\"{}…", "é".repeat(MAX_QUOTED)))
        );
    }

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert_eq!(quote("a\nb").to_string(), "\"a\\u{a}b\"");
        assert_eq!(quote("a\u{202e}b").to_string(), "\"a\\u{202e}b\"");
        assert_eq!(quote("a\u{200b}b").to_string(), "\"a\\u{200b}b\"");
        assert_eq!(quote("\u{feff}").to_string(), "\"\\u{feff}\"");
        assert!(!invisible('a') && !invisible('é') && !invisible(' '));
    }
}
