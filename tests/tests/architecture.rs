//! The house rules that a reading of the source can check: no circles among the top-level
//! modules of the daemon (`host/src`), so that no arrow runs back up (ARCHITECTURE.md,
//! "Invariants").

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Each top-level module of `host/src` and the top-level modules its code names
/// (`crate::X` paths and `use crate::{X, …}` groups), test modules left out.
fn module_graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut folders = vec![root.to_owned()];
    while let Some(folder) = folders.pop() {
        for entry in fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(root).unwrap();
            let top = relative.components().next().unwrap().as_os_str();
            let top = top.to_string_lossy().trim_end_matches(".rs").to_owned();
            if top == "main" || top == "lib" {
                continue;
            }
            let text = fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            let named = graph.entry(top.clone()).or_default();
            named.extend(crate_paths(code));
            named.remove(&top);
        }
    }
    graph
}

/// The first segment after every `crate::` in `code`, and the top-level names of every
/// `use crate::{…}` group.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            names.insert(ident(item.trim()));
        } else {
            names.insert(ident(rest));
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

/// Every circle of `graph` (its strongly connected components of more than one module).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    let reaches = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut next = vec![from.to_owned()];
        while let Some(m) = next.pop() {
            for n in graph.get(&m).into_iter().flatten() {
                if graph.contains_key(n) && seen.insert(n.clone()) {
                    next.push(n.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reaches(m))).collect();
    let mut found: Vec<BTreeSet<String>> = Vec::new();
    for (m, r) in &reach {
        let circle: BTreeSet<String> = r
            .iter()
            .filter(|n| reach[n].contains(*m))
            .cloned()
            .collect();
        if !circle.is_empty() && !found.contains(&circle) {
            found.push(circle);
        }
    }
    found
}

#[test]
fn no_circles_among_the_daemons_top_level_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/src");
    let graph = module_graph(&root);
    assert!(graph.len() > 20, "the modules were found: {graph:?}");
    assert!(
        graph["front"].contains("engine"),
        "the front names the engine"
    );
    let found = circles(&graph);
    assert!(
        found.is_empty(),
        "circles among the top-level modules of host/src: {found:?}"
    );
}

#[test]
fn a_circle_is_found() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", &["b"][..]),
        ("b", &["c"]),
        ("c", &["a"]),
        ("d", &["a"]),
    ]
    .into_iter()
    .map(|(m, to)| (m.to_owned(), to.iter().map(|s| (*s).to_owned()).collect()))
    .collect();
    assert_eq!(circles(&graph), [["a", "b", "c"].map(str::to_owned).into()]);
    assert_eq!(
        crate_paths("use crate::{a::X, b::{c, d}, self};\nlet x = crate::e::f();"),
        ["a", "b", "e"].map(str::to_owned).into()
    );
}
