//! Where a plugin's refusal of its config points in `plugins.toml`: a plugin's `Config` type
//! names the offending key by its dotted path inside the instance's `config` table (its
//! deserializer's own path, `headers.x` or `targets[2].url`); this finds that key — or the
//! deepest part of the path that exists, down to `[plugins.NAME.config]` itself — and makes
//! it a [`Problem`] with line and column, like every other config problem.

use std::ops::Range;

use super::Problem;

/// A [`Problem`] in `text` (the `plugins.toml` the instance comes from) for `message` about
/// `path` in the `config` table of instance `instance`.
pub fn plugin_config_problem(text: &str, instance: &str, path: &str, message: &str) -> Problem {
    let shown = if path.is_empty() {
        format!("plugins.{instance}.config: the plugin refuses it: {message}")
    } else {
        format!("plugins.{instance}.config.{path}: the plugin refuses it: {message}")
    };
    Problem::at(text, span_of(text, instance, path), shown)
}

/// The span of the deepest part of `path` found in `[plugins.<instance>.config]`.
fn span_of(text: &str, instance: &str, path: &str) -> Option<Range<usize>> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let plugins = doc.get("plugins")?.as_table_like()?;
    let (instance_key, table) = plugins.get_key_value(instance)?;
    let table = table.as_table_like()?;
    let Some((config_key, config)) = table.get_key_value("config") else {
        return instance_key.span();
    };
    let mut best = config_key.span().or_else(|| config.span());
    let mut node = Node::Item(config);
    for segment in segments(path) {
        let next = match segment {
            Segment::Key(key) => node
                .table()
                .and_then(|t| t.get_key_value(key))
                .map(|(k, v)| (k.span(), Node::Item(v))),
            Segment::Index(index) => node.element(index).map(|v| (v.span(), Node::Value(v))),
        };
        let Some((span, next)) = next else {
            break;
        };
        best = span.or_else(|| next.span()).or(best);
        node = next;
    }
    best
}

/// A place in the document: a table entry, or an element of an array.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a toml_edit::Item),
    Value(&'a toml_edit::Value),
}

impl<'a> Node<'a> {
    fn table(self) -> Option<&'a dyn toml_edit::TableLike> {
        match self {
            Self::Item(item) => item.as_table_like(),
            Self::Value(value) => value
                .as_inline_table()
                .map(|t| t as &dyn toml_edit::TableLike),
        }
    }

    fn element(self, index: usize) -> Option<&'a toml_edit::Value> {
        match self {
            Self::Item(item) => item.as_array()?.get(index),
            Self::Value(value) => value.as_array()?.get(index),
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Self::Item(item) => item.span(),
            Self::Value(value) => value.span(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// `a.b[2].c` → `a`, `b`, `2`, `c`.
fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(close) = rest.find(']') {
            if let Ok(index) = rest[1..close].parse() {
                out.push(Segment::Index(index));
            }
            rest = &rest[close + 1..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[host]\nautoload = false\n\n[plugins.hook]\nplugin = \"webhook\"\n\
                        [plugins.hook.config]\nurl = \"http://x\"\ntimeout = 5\n\
                        headers = { a = 1 }\n\n[plugins.bare]\nplugin = \"x\"\n";

    #[test]
    fn a_key_the_plugin_refuses_is_found_at_its_line_and_column() {
        let p = plugin_config_problem(TEXT, "hook", "timeout", "invalid type: integer");
        assert_eq!((p.line, p.column), (Some(8), Some(1)));
        assert!(
            p.message
                .starts_with("plugins.hook.config.timeout: the plugin refuses it")
        );
        let p = plugin_config_problem(TEXT, "hook", "headers.a", "invalid type");
        assert_eq!((p.line, p.column), (Some(9), Some(13)));
        // A key that is not there (a misspelling the plugin names): its table.
        let p = plugin_config_problem(TEXT, "hook", "urll", "unknown field `urll`");
        assert_eq!((p.line, p.column), (Some(6), Some(15)));
        // Into an array of inline tables.
        let text = "[plugins.t]\n[plugins.t.config]\ntargets = [{ url = 1 }, { url = 2 }]\n";
        let p = plugin_config_problem(text, "t", "targets[1].url", "invalid type");
        assert_eq!((p.line, p.column), (Some(3), Some(27)));
        // No config table at all: the instance's table.
        let p = plugin_config_problem(TEXT, "bare", "", "missing field `url`");
        assert_eq!(p.line, Some(11));
    }

    #[test]
    fn paths_split_into_keys_and_indexes() {
        assert_eq!(
            segments("a.b[2].c"),
            [
                Segment::Key("a"),
                Segment::Key("b"),
                Segment::Index(2),
                Segment::Key("c")
            ]
        );
        assert_eq!(segments(""), []);
    }
}
