//! Condenses abi_stable's layout-mismatch report (hundreds of lines: both type layouts in
//! full) into one line naming what differs and where: the error kinds with their expected and
//! found values, then the trail of fields from the root module to the differing type.

/// One line: `incompatible type size (expected 1, found 2); … at PluginMod.instantiate(arg 2:
/// RawHost).vtable → HostVTable.log_enabled(arg 2: LogLevel).field_0: u16`.
pub(super) fn summarize(report: &str) -> String {
    let errors = error_kinds(report);
    let trail = trail(report);
    match (errors.is_empty(), trail.is_empty()) {
        (true, _) => fallback(report),
        (false, true) => errors.join("; "),
        (false, false) => format!("{} at {trail}", errors.join("; ")),
    }
}

/// `Error:<kind>` blocks, each with its `Expected:`/`Found:` values when they are short.
fn error_kinds(report: &str) -> Vec<String> {
    let lines: Vec<&str> = report.lines().collect();
    let mut kinds = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(kind) = line.trim().strip_prefix("Error:") else {
            continue;
        };
        let value_after = |label: &str| {
            let label_at = lines[at + 1..]
                .iter()
                .take(4)
                .position(|l| l.trim() == label)?;
            let value = lines.get(at + 2 + label_at)?.trim();
            (!value.is_empty() && value.len() <= 60 && !value.ends_with(':')).then_some(value)
        };
        let entry = match (value_after("Expected:"), value_after("Found:")) {
            (Some(expected), Some(found)) => {
                format!("{} (expected {expected}, found {found})", kind.trim())
            }
            _ => kind.trim().to_owned(),
        };
        if !kinds.contains(&entry) {
            kinds.push(entry);
        }
    }
    kinds
}

/// The `field_name:`/`type:` pairs after `inside:`, rendered as a path.
fn trail(report: &str) -> String {
    // The layout dumps before the first `Error:` may contain the word too.
    let errors_start = report.find("Error:").unwrap_or(0);
    let Some(inside) = report[errors_start..].find("inside:") else {
        return String::new();
    };
    let section = &report[errors_start + inside..];
    let section = section
        .find("Layout of expected type")
        .map_or(section, |end| &section[..end]);
    let mut pairs = Vec::new();
    let mut field: Option<&str> = None;
    for line in section.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("field_name:") {
            field = Some(name);
        } else if let (Some(ty), Some(name)) = (line.strip_prefix("type:"), field.take()) {
            pairs.push((name, ty));
        }
    }
    let last = pairs.len().saturating_sub(1);
    let mut out = String::new();
    for (i, (name, ty)) in pairs.into_iter().enumerate() {
        let named = ty != "AFunctionPointer" && !ty.starts_with("PrefixRef");
        if name == "0" {
            if named {
                if !out.is_empty() {
                    out.push_str(" → ");
                }
                out.push_str(ty);
            }
        } else if let Some(index) = name.strip_prefix("param_") {
            let position = index.parse::<usize>().map_or(0, |n| n + 1);
            out.push_str(&format!("(arg {position}: {ty})"));
        } else {
            out.push('.');
            out.push_str(name);
            if named && i == last {
                out.push_str(&format!(": {ty}"));
            }
        }
    }
    out
}

/// Without recognisable structure: the text from the first `Error:`, on one line, bounded.
fn fallback(report: &str) -> String {
    const LIMIT: usize = 600;
    let tail = report.find("Error:").map_or(report, |at| &report[at..]);
    let joined = tail.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.len() <= LIMIT {
        return joined;
    }
    let cut = (0..=LIMIT)
        .rev()
        .find(|&i| joined.is_char_boundary(i))
        .unwrap_or(0);
    format!("{} …", &joined[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tail of a real report: `LogLevel` widened from u8 to u16 in the plugin's API copy.
    const SAMPLE: &str = include_str!("abi_error_sample.txt");

    #[test]
    fn a_real_report_becomes_one_line_naming_the_field_trail() {
        assert_eq!(
            summarize(SAMPLE),
            "incompatible type size (expected 1, found 2); incompatible type alignment \
             (expected 1, found 2); mismatched type (expected u8, found u16) at \
             PluginMod.instantiate(arg 2: RawHost).vtable → HostVTable.log_enabled(arg 2: \
             LogLevel).field_0: u16"
        );
    }

    #[test]
    fn an_unrecognised_report_is_kept_from_its_first_error_on_one_line() {
        assert_eq!(
            summarize("long layout dump\nError:something new\n  detail\n"),
            "something new"
        );
        assert_eq!(summarize("no structure at all\n"), "no structure at all");
    }
}
