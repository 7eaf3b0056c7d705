//! Topics and topic patterns, as NATS subjects: dot-separated tokens; in a pattern `*`
//! matches exactly one token and `>` (only as the last token) one or more trailing tokens.

use std::fmt;

use crate::quote::{invisible, quote};

/// The longest topic or pattern accepted, in bytes.
pub const MAX_LEN: usize = 255;

/// Why a topic or pattern is invalid; the message names the token at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("is empty")]
    Empty,
    #[error("is {len} bytes long, more than {MAX_LEN}")]
    TooLong { len: usize },
    #[error("has an empty token at position {position} (two dots, or a dot at an end)")]
    EmptyToken { position: usize },
    #[error("token {position} {} contains {what}", quote(token))]
    BadChar {
        position: usize,
        token: String,
        what: &'static str,
    },
    #[error("`>` may only be the last token, found at position {position}")]
    TailNotLast { position: usize },
    #[error(
        "a topic cannot contain the wildcard `{wildcard}` (token {position}); only patterns can"
    )]
    WildcardInTopic { position: usize, wildcard: char },
}

fn tokens(text: &str) -> Result<impl Iterator<Item = (usize, &str)>, TopicError> {
    if text.is_empty() {
        return Err(TopicError::Empty);
    }
    if text.len() > MAX_LEN {
        return Err(TopicError::TooLong { len: text.len() });
    }
    Ok(text.split('.').enumerate().map(|(i, t)| (i + 1, t)))
}

fn check_token(position: usize, token: &str, allow_wildcards: bool) -> Result<(), TopicError> {
    if token.is_empty() {
        return Err(TopicError::EmptyToken { position });
    }
    if !allow_wildcards && (token.contains('*') || token.contains('>')) {
        if token == "*" || token == ">" {
            return Err(TopicError::WildcardInTopic {
                position,
                wildcard: token.chars().next().unwrap_or('*'),
            });
        }
    } else if allow_wildcards && (token == "*" || token == ">") {
        return Ok(());
    }
    let bad = |what| TopicError::BadChar {
        position,
        token: token.to_owned(),
        what,
    };
    for c in token.chars() {
        match c {
            c if c.is_whitespace() => return Err(bad("whitespace")),
            c if c.is_control() => return Err(bad("a control character")),
            // Zero-width and bidirectional characters make two different topics look alike
            // (and a topic look like what it is not) in logs, `ctl` and plugins.
            c if invisible(c) => {
                return Err(bad(
                    "an invisible format character (zero-width or bidirectional)",
                ));
            }
            '*' | '>' => return Err(bad("a wildcard inside a token (use it as a whole token)")),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a concrete topic (no wildcards).
///
/// # Errors
/// [`TopicError`] naming the token at fault.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    for (position, token) in tokens(topic)? {
        check_token(position, token, false)?;
    }
    Ok(())
}

/// A validated topic pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern(String);

impl Pattern {
    /// Parses and validates a pattern.
    ///
    /// # Errors
    /// [`TopicError`] naming the token at fault.
    pub fn parse(text: &str) -> Result<Self, TopicError> {
        let count = text.split('.').count();
        for (position, token) in tokens(text)? {
            check_token(position, token, true)?;
            if token == ">" && position != count {
                return Err(TopicError::TailNotLast { position });
            }
        }
        Ok(Self(text.to_owned()))
    }

    /// The pattern's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` (a valid topic) matches this pattern.
    pub fn matches(&self, topic: &str) -> bool {
        let mut pattern = self.0.split('.');
        let mut topic = topic.split('.');
        loop {
            match (pattern.next(), topic.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(p), Some(t)) if p == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    #[test]
    fn wildcards_match_as_nats_subjects_do() {
        let cases = [
            ("orders.>", "orders.eu.new", true),
            ("orders.>", "orders.eu", true),
            ("orders.>", "orders", false),
            ("orders.*", "orders.eu", true),
            ("orders.*", "orders.eu.new", false),
            ("*.new", "orders.new", true),
            ("*.*.new", "orders.eu.new", true),
            ("a.b", "a.b", true),
            ("a.b", "a.bb", false),
            ("a.b", "a", false),
            (">", "anything.at.all", true),
            ("*", "one", true),
            ("*", "one.two", false),
        ];
        for (pattern, topic, expected) in cases {
            assert_eq!(p(pattern).matches(topic), expected, "{pattern} vs {topic}");
        }
    }

    #[test]
    fn bad_patterns_name_the_token() {
        assert_eq!(Pattern::parse(""), Err(TopicError::Empty));
        assert_eq!(
            Pattern::parse("a..b"),
            Err(TopicError::EmptyToken { position: 2 })
        );
        assert_eq!(
            Pattern::parse("a.>.b"),
            Err(TopicError::TailNotLast { position: 2 })
        );
        assert!(matches!(
            Pattern::parse("a.b*"),
            Err(TopicError::BadChar { position: 2, .. })
        ));
        assert!(matches!(
            Pattern::parse("a b"),
            Err(TopicError::BadChar {
                position: 1,
                what: "whitespace",
                ..
            })
        ));
        assert_eq!(
            Pattern::parse(&"a".repeat(300)),
            Err(TopicError::TooLong { len: 300 })
        );
    }

    #[test]
    fn topics_refuse_control_zero_width_and_bidirectional_characters() {
        for (topic, what) in [
            ("orders.e\u{1}u", "a control character"),
            ("orders.\u{7f}", "a control character"),
            ("orders.e\u{200b}u", "an invisible format character"),
            ("orders.\u{feff}eu", "an invisible format character"),
            ("orders.\u{202e}ue", "an invisible format character"),
            ("orders.eu\u{2066}", "an invisible format character"),
        ] {
            match validate_topic(topic) {
                Err(e @ TopicError::BadChar { position: 2, .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(what), "{topic:?}: {text}");
                    // The token is quoted with the character escaped, never raw.
                    assert!(text.contains("\\u{"), "{topic:?}: {text}");
                }
                other => panic!("{topic:?}: {other:?}"),
            }
        }
        assert!(Pattern::parse("orders.\u{200d}.>").is_err());
        // Visible non-ASCII text is a topic like any other.
        assert!(validate_topic("commandes.été.nouvelle").is_ok());
    }

    #[test]
    fn topics_refuse_wildcards() {
        assert!(validate_topic("orders.eu.new").is_ok());
        assert_eq!(
            validate_topic("orders.*"),
            Err(TopicError::WildcardInTopic {
                position: 2,
                wildcard: '*'
            })
        );
        assert_eq!(
            validate_topic("orders."),
            Err(TopicError::EmptyToken { position: 2 })
        );
    }
}
