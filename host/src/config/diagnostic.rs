//! A configuration problem and how it is shown: `file:line:column: message`, then the line
//! with a caret under the span, as rustc and the toml crate do.

use std::{fmt, ops::Range, path::Path};

use serde::Serialize;

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Byte range in the file, when the problem has a place.
    #[serde(skip)]
    pub span: Option<Range<usize>>,
    /// 1-based line and column of the span's start.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl Problem {
    /// A problem at `span` of `text`.
    pub fn at(text: &str, span: Option<Range<usize>>, message: impl Into<String>) -> Self {
        let position = span.as_ref().map(|s| line_column(text, s.start));
        Self {
            line: position.map(|(line, _)| line),
            column: position.map(|(_, column)| column),
            span,
            message: message.into(),
        }
    }

    /// `file:line:column: message` and a caret snippet from `text`.
    pub fn render(&self, file: &Path, text: &str) -> String {
        let (Some(span), Some(line), Some(column)) = (&self.span, self.line, self.column) else {
            return format!("{}: {}", file.display(), self.message);
        };
        let source = text.lines().nth(line - 1).unwrap_or("");
        let width = line.to_string().len();
        let line_start = text[..span.start.min(text.len())]
            .rfind('\n')
            .map_or(0, |at| at + 1);
        let line_end = line_start + source.len();
        let carets = text
            .get(span.start.min(line_end)..span.end.clamp(span.start, line_end))
            .map_or(1, |covered| covered.chars().count().max(1));
        format!(
            "{}:{line}:{column}: {}\n{pad} |\n{line} | {source}\n{pad} | {indent}{carets}",
            file.display(),
            self.message,
            pad = " ".repeat(width),
            indent = " ".repeat(column - 1),
            carets = "^".repeat(carets),
        )
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, "{line}:{column}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before, |at| &before[at + 1..])
        .chars()
        .count()
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_and_carets_under_the_span() {
        let text = "[host]\nretires = 3\n";
        let problem = Problem::at(text, Some(7..14), "unknown field `retires`");
        assert_eq!((problem.line, problem.column), (Some(2), Some(1)));
        assert_eq!(
            problem.render(Path::new("plugins.toml"), text),
            "plugins.toml:2:1: unknown field `retires`\n  |\n2 | retires = 3\n  | ^^^^^^^"
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let text = "name = \"ü\" x";
        let at = text.find('x').unwrap();
        assert_eq!(line_column(text, at), (1, 12));
    }
}
