//! The desired state: which libraries `plugin_dir` holds and which instances should run
//! which of them, from the configuration and those libraries.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{
    background,
    config::{Config, Settings},
    loader::{self, Checked, Policy},
    topic::Pattern,
};

/// The libraries of `plugin_dir` that passed the checks, with their bytes.
#[derive(Debug, Default)]
pub struct Libraries {
    /// Path → (arrival number, checked library). Files present at the first scan arrive as
    /// 0; later ones count up (a newcomer that claims a name already claimed is refused).
    by_path: BTreeMap<PathBuf, (u64, Checked)>,
    /// Files refused, with why (reported once per distinct reason).
    refused: BTreeMap<PathBuf, String>,
    arrivals: u64,
}

/// What a scan or a file change found worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub path: PathBuf,
    pub error: String,
}

/// What happened to `plugin_dir` at one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// New bytes were taken in.
    Changed,
    /// The bytes equal what was there (nothing to do).
    Same,
    /// The file was refused (reported); what was there before stays.
    Refused,
    /// The file is gone.
    Gone,
}

impl Libraries {
    /// Every library file in `dir`, checked; refusals are returned to be reported.
    pub fn scan(dir: &Path, policy: &Policy) -> (Self, Vec<Refusal>) {
        let mut libraries = Self::default();
        let mut refusals = Vec::new();
        match background::run(|| loader::scan(dir, policy)) {
            Ok(scanned) => {
                for (path, checked) in scanned {
                    match checked {
                        Ok(checked) => {
                            libraries.by_path.insert(path, (0, checked));
                        }
                        Err(e) => {
                            libraries.refused.insert(path.clone(), e.to_string());
                            refusals.push(Refusal {
                                path,
                                error: e.to_string(),
                            });
                        }
                    }
                }
            }
            Err(e) => refusals.push(Refusal {
                path: dir.to_owned(),
                error: format!("cannot read plugin_dir: {e}"),
            }),
        }
        (libraries, refusals)
    }

    /// `plugin_dir` read again (a reload): known files keep their arrival, new ones are
    /// newcomers; only refusals not reported before are returned.
    pub fn rescan(old: &Self, config: &Config, policy: &Policy) -> (Self, Vec<Refusal>) {
        let (mut new, refusals) = Self::scan(&config.host.plugin_dir, policy);
        new.arrivals = old.arrivals;
        for (path, (arrival, _)) in &mut new.by_path {
            *arrival = match old.by_path.get(path) {
                Some((known, _)) => *known,
                None => {
                    new.arrivals += 1;
                    new.arrivals
                }
            };
        }
        let refusals = refusals
            .into_iter()
            .filter(|r| old.refused.get(&r.path) != Some(&r.error))
            .collect();
        (new, refusals)
    }

    /// The file at `path` changed (appeared, got new bytes or went): checks it again.
    pub fn update(&mut self, path: &Path, policy: &Policy) -> (Found, Option<Refusal>) {
        if !path.exists() {
            self.refused.remove(path);
            return match self.by_path.remove(path) {
                Some(_) => (Found::Gone, None),
                None => (Found::Same, None),
            };
        }
        match background::run(|| loader::check(path, policy)) {
            Ok(checked) => {
                self.refused.remove(path);
                if let Some((_, known)) = self.by_path.get_mut(path) {
                    if known.sha256() == checked.sha256() {
                        return (Found::Same, None);
                    }
                    *known = checked;
                } else {
                    self.arrivals += 1;
                    self.by_path
                        .insert(path.to_owned(), (self.arrivals, checked));
                }
                (Found::Changed, None)
            }
            Err(e) => {
                let error = e.to_string();
                if self.refused.get(path) == Some(&error) {
                    return (Found::Refused, None);
                }
                self.refused.insert(path.to_owned(), error.clone());
                (
                    Found::Refused,
                    Some(Refusal {
                        path: path.to_owned(),
                        error,
                    }),
                )
            }
        }
    }

    /// The library providing plugin `name`: the only one claiming it, or the first to arrive
    /// among several (a newcomer is refused, naming both paths); several present from the
    /// start: none, naming all.
    pub fn provider(&self, name: &str) -> Result<&Checked, String> {
        let mut claims: Vec<(u64, &Checked)> = self
            .by_path
            .values()
            .filter(|(_, c)| c.manifest().name == name)
            .map(|(n, c)| (*n, c))
            .collect();
        claims.sort_by_key(|(n, c)| (*n, c.path().to_owned()));
        match claims.as_slice() {
            [] => Err(format!("no library in plugin_dir provides plugin `{name}`")),
            [(_, one)] => Ok(one),
            [(first, one), (second, _), ..] if first < second => Ok(one),
            _ => {
                let paths: Vec<String> = claims
                    .iter()
                    .map(|(_, c)| c.path().display().to_string())
                    .collect();
                Err(format!(
                    "{} libraries claim the plugin name `{name}`: {}; none is loaded",
                    claims.len(),
                    paths.join(" and ")
                ))
            }
        }
    }

    /// Whether `path` arrived after another library claiming the same name (it is refused).
    pub fn is_newcomer(&self, path: &Path) -> Option<String> {
        let (_, checked) = self.by_path.get(path)?;
        let provider = self.provider(&checked.manifest().name).ok()?;
        (provider.path() != path).then(|| {
            format!(
                "{} claims the plugin name `{}`, which {} already provides; refused",
                path.display(),
                checked.manifest().name,
                provider.path().display()
            )
        })
    }

    /// The manifest names of every library, in order.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_path
            .values()
            .map(|(_, c)| c.manifest().name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The sha256 of every library present.
    pub fn digests(&self) -> Vec<[u8; 32]> {
        self.by_path.values().map(|(_, c)| c.sha256()).collect()
    }
}

/// One instance that should run.
#[derive(Debug, Clone)]
pub struct Want {
    pub plugin: String,
    pub settings: Settings,
    /// Configured, or else the library's default topics (none when there is no library).
    pub topics: Vec<Pattern>,
    pub config: serde_json::Value,
    pub pin: Option<[u8; 32]>,
}

/// The enabled instances of `config`, then (with `autoload`) one per library that no entry
/// names.
pub fn wants(config: &Config, libraries: &Libraries) -> BTreeMap<String, Want> {
    let default_topics = |plugin: &str| -> Vec<Pattern> {
        libraries.provider(plugin).map_or_else(
            |_| Vec::new(),
            |c| {
                c.manifest()
                    .topics
                    .iter()
                    .filter_map(|t| Pattern::parse(t).ok())
                    .collect()
            },
        )
    };
    let mut wants: BTreeMap<String, Want> = config
        .instances
        .values()
        .filter(|i| i.enabled)
        .map(|i| {
            (
                i.name.clone(),
                Want {
                    plugin: i.plugin.clone(),
                    settings: i.settings.clone(),
                    topics: i
                        .topics
                        .clone()
                        .unwrap_or_else(|| default_topics(&i.plugin)),
                    config: i.config.clone(),
                    pin: i.sha256,
                },
            )
        })
        .collect();
    if config.host.autoload {
        for name in libraries.names() {
            let named = config
                .instances
                .values()
                .any(|i| i.plugin == name || i.name == name);
            if !named {
                wants.insert(
                    name.clone(),
                    Want {
                        topics: default_topics(&name),
                        plugin: name,
                        settings: config.defaults.clone(),
                        config: serde_json::json!({}),
                        pin: None,
                    },
                );
            }
        }
    }
    wants
}
