//! The desired state: which libraries `plugin_dir` holds and which instances should run
//! which of them, from the configuration and those libraries.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{
    background,
    config::{Config, Settings},
    ledger::{Origin, Remembered, Subscription},
    loader::{self, Checked, LoadError, Policy},
    topic::Pattern,
};

/// The libraries of `plugin_dir` that passed the checks, with their bytes.
#[derive(Debug, Default)]
pub struct Libraries {
    /// Path → (arrival number, checked library). Files present at the first scan arrive as
    /// 0; later ones count up (a newcomer that claims a name already claimed is refused).
    by_path: BTreeMap<PathBuf, (u64, Checked)>,
    /// Files refused, with why (reported once per distinct reason); `plugin_dir` itself
    /// when it is unsafe.
    refused: BTreeMap<PathBuf, String>,
    arrivals: u64,
    /// Why `plugin_dir` itself is refused (writable by group or others, or owned by an
    /// untrusted user): nothing is taken from it until that is fixed, and every instance
    /// that needs a library it does not have yet is told this, not "no library provides".
    unsafe_dir: Option<String>,
    /// Library files read and checked since the first scan (carried across rescans).
    checks: u64,
}

/// Why no library provides a plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoProvider {
    /// `plugin_dir` itself is refused, and nothing taken from it while it was safe claims
    /// the name.
    #[error("plugin `{plugin}`: {problem}")]
    UnsafeDir { plugin: String, problem: String },
    #[error("no library in plugin_dir provides plugin `{0}`")]
    Missing(String),
    /// Several libraries present from the start claim the name: none is chosen.
    #[error(
        "{} libraries claim the plugin name `{plugin}`: {}; none is loaded",
        .paths.len(),
        .paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ")
    )]
    Claimed { plugin: String, paths: Vec<PathBuf> },
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
    /// Every library file in `dir`, checked; refusals are returned to be reported. An
    /// unsafe `dir` is one refusal naming it and its permission problem, and nothing in it
    /// is taken.
    pub fn scan(dir: &Path, policy: &Policy) -> (Self, Vec<Refusal>) {
        let mut libraries = Self::default();
        let mut refusals = Vec::new();
        // A directory that cannot be read at all is reported by the scan below.
        if let Err(e @ (LoadError::UnsafePermissions { .. } | LoadError::UntrustedOwner { .. })) =
            loader::check_dir(dir, policy)
        {
            let error = format!(
                "plugin_dir refused: {e}; no library is loaded from it until this is fixed"
            );
            libraries.refused.insert(dir.to_owned(), error.clone());
            libraries.unsafe_dir = Some(error.clone());
            refusals.push(Refusal {
                path: dir.to_owned(),
                error,
            });
            return (libraries, refusals);
        }
        match background::run(|| loader::scan(dir, policy)) {
            Ok(scanned) => {
                libraries.checks = scanned.len() as u64;
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
    /// newcomers; only refusals not reported before are returned. When `plugin_dir` has
    /// become unsafe, the libraries taken while it was safe stay (what runs keeps running,
    /// as when one file is refused) and nothing new is taken from it.
    pub fn rescan(old: &Self, config: &Config, policy: &Policy) -> (Self, Vec<Refusal>) {
        let (mut new, refusals) = Self::scan(&config.host.plugin_dir, policy);
        if new.unsafe_dir.is_some() {
            new.by_path.clone_from(&old.by_path);
            for (path, error) in &old.refused {
                new.refused
                    .entry(path.clone())
                    .or_insert_with(|| error.clone());
            }
        }
        new.arrivals = old.arrivals;
        new.checks += old.checks;
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

    /// The watcher reported `path` (it appeared, was written, is another file, or went):
    /// checks it again. Bytes with the sha256 of the library held there are
    /// [`Found::Same`], nothing to do: for libraries, this is where that is decided.
    pub fn update(&mut self, path: &Path, policy: &Policy) -> (Found, Option<Refusal>) {
        // A dangling symlink is there (and refused as a symlink), not gone.
        if std::fs::symlink_metadata(path).is_err() {
            self.refused.remove(path);
            return match self.by_path.remove(path) {
                Some(_) => (Found::Gone, None),
                None => (Found::Same, None),
            };
        }
        self.checks += 1;
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
    pub fn provider(&self, name: &str) -> Result<&Checked, NoProvider> {
        let mut claims: Vec<(u64, &Checked)> = self
            .by_path
            .values()
            .filter(|(_, c)| c.manifest().name == name)
            .map(|(n, c)| (*n, c))
            .collect();
        claims.sort_by_key(|(n, c)| (*n, c.path().to_owned()));
        match claims.as_slice() {
            [] => Err(match &self.unsafe_dir {
                Some(problem) => NoProvider::UnsafeDir {
                    plugin: name.to_owned(),
                    problem: problem.clone(),
                },
                None => NoProvider::Missing(name.to_owned()),
            }),
            [(_, one)] => Ok(one),
            [(first, one), (second, _), ..] if first < second => Ok(one),
            _ => Err(NoProvider::Claimed {
                plugin: name.to_owned(),
                paths: claims.iter().map(|(_, c)| c.path().to_owned()).collect(),
            }),
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

    /// How many library files were read and checked since the first scan: every file of
    /// each scan of `plugin_dir`, and each file the watcher reported.
    pub fn checks(&self) -> u64 {
        self.checks
    }

    /// The sha256 of every library present.
    pub fn digests(&self) -> Vec<[u8; 32]> {
        self.by_path.values().map(|(_, c)| c.sha256()).collect()
    }
}

/// One instance with a subscription: what it runs, what is routed to it, and whether a
/// generation of it should run.
#[derive(Debug, Clone)]
pub struct Want {
    pub plugin: String,
    pub settings: Settings,
    /// The patterns routed to it: its configured `topics`, else its plugin's own (from the
    /// library, or as last seen when the library is missing or refused); empty when neither
    /// is known.
    pub topics: Vec<Pattern>,
    /// Whether `topics` is known: `false` for an instance that takes its topics from a
    /// library never loaded (nothing is routed to it yet).
    pub topics_known: bool,
    pub config: serde_json::Value,
    pub pin: Option<[u8; 32]>,
    /// Whether a generation should run: `false` for a disabled instance, and for an
    /// autoloaded one while `autoload` is off or a table claims its plugin. Its deliveries
    /// wait either way.
    pub run: bool,
    /// The subscription to keep in the ledger (it outlives the library and a restart).
    pub subscription: Subscription,
}

/// Every instance with a subscription, from the configuration, the libraries of
/// `plugin_dir` and what the ledger remembers (docs/design.md §7: a subscription ends only when
/// its table is removed from `plugins.toml` or an operator forgets it):
/// - every `[plugins.NAME]` table, enabled or not;
/// - with `autoload`, one instance per library that no table names;
/// - every autoloaded instance the ledger remembers, its library present or not.
pub fn wants(
    config: &Config,
    libraries: &Libraries,
    remembered: &BTreeMap<String, Remembered>,
) -> BTreeMap<String, Want> {
    // The plugin's own topics: from its library, else as last seen for this instance.
    let own_topics = |name: &str, plugin: &str| -> Option<Vec<String>> {
        match libraries.provider(plugin) {
            Ok(library) => Some(library.manifest().topics.clone()),
            Err(_) => remembered
                .get(name)
                .and_then(|r| r.subscription.as_ref())
                .filter(|s| s.plugin == plugin)
                .and_then(|s| s.topics.clone()),
        }
    };
    let parse = |topics: &[String]| -> Vec<Pattern> {
        topics
            .iter()
            .filter_map(|t| Pattern::parse(t).ok())
            .collect()
    };
    let claimed = |plugin: &str| {
        config
            .instances
            .values()
            .any(|i| i.plugin == plugin || i.name == plugin)
    };
    let mut wants: BTreeMap<String, Want> = config
        .instances
        .values()
        .map(|i| {
            let own = own_topics(&i.name, &i.plugin);
            let (topics, topics_known) = match (&i.topics, &own) {
                (Some(configured), _) => (configured.clone(), true),
                (None, Some(own)) => (parse(own), true),
                (None, None) => (Vec::new(), false),
            };
            (
                i.name.clone(),
                Want {
                    plugin: i.plugin.clone(),
                    settings: i.settings.clone(),
                    topics,
                    topics_known,
                    config: i.config.clone(),
                    pin: i.sha256,
                    run: i.enabled,
                    subscription: Subscription {
                        origin: Origin::Configured,
                        plugin: i.plugin.clone(),
                        topics: own,
                    },
                },
            )
        })
        .collect();
    let autoloaded = |name: &str, plugin: &str, run: bool| {
        let own = own_topics(name, plugin);
        Want {
            plugin: plugin.to_owned(),
            settings: config.defaults.clone(),
            topics: own.as_deref().map(parse).unwrap_or_default(),
            topics_known: own.is_some(),
            config: serde_json::json!({}),
            pin: None,
            run,
            subscription: Subscription {
                origin: Origin::Autoloaded,
                plugin: plugin.to_owned(),
                topics: own,
            },
        }
    };
    if config.host.autoload {
        for name in libraries.names() {
            if !claimed(&name) {
                wants.insert(name.clone(), autoloaded(&name, &name, true));
            }
        }
    }
    for (name, r) in remembered {
        if let Some(s) = &r.subscription
            && s.origin == Origin::Autoloaded
            && !wants.contains_key(name)
            && !config.instances.contains_key(name)
        {
            let run = config.host.autoload && !claimed(&s.plugin);
            wants.insert(name.clone(), autoloaded(name, &s.plugin, run));
        }
    }
    wants
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::parse(std::path::Path::new("/etc/plugind/plugins.toml"), text).unwrap()
    }

    fn remembered(
        name: &str,
        origin: Origin,
        plugin: &str,
        topics: &[&str],
    ) -> (String, Remembered) {
        (
            name.to_owned(),
            Remembered {
                subscription: Some(Subscription {
                    origin,
                    plugin: plugin.to_owned(),
                    topics: Some(topics.iter().map(|t| (*t).to_owned()).collect()),
                }),
                paused: false,
            },
        )
    }

    fn topics(want: &Want) -> Vec<&str> {
        want.topics.iter().map(Pattern::as_str).collect()
    }

    /// Found by the hostile-input campaign: an unsafe plugin_dir was reported as "no library
    /// in plugin_dir provides …" for every instance.
    #[test]
    fn an_unsafe_plugin_dir_is_one_refusal_naming_its_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("plugins.d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (libraries, refusals) = Libraries::scan(&dir, &Policy::default());
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert_eq!(refusals[0].path, dir);
        assert!(
            refusals[0].error.contains("writable by others"),
            "{}",
            refusals[0].error
        );
        let error = libraries.provider("p").unwrap_err().to_string();
        assert!(error.contains("writable by others"), "{error}");
        assert!(!error.contains("provides"), "{error}");
        // Safe again: the ordinary answer.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (libraries, refusals) = Libraries::scan(&dir, &Policy::default());
        assert!(refusals.is_empty(), "{refusals:?}");
        assert_eq!(
            libraries.provider("p").unwrap_err().to_string(),
            "no library in plugin_dir provides plugin `p`"
        );
    }

    #[test]
    fn a_disabled_instance_is_subscribed_and_does_not_run() {
        let wants = wants(
            &config("[plugins.a]\nenabled = false\ntopics = [\"x.>\"]\n"),
            &Libraries::default(),
            &BTreeMap::new(),
        );
        let a = &wants["a"];
        assert!(!a.run);
        assert!(a.topics_known);
        assert_eq!(topics(a), ["x.>"]);
        assert_eq!(a.subscription.origin, Origin::Configured);
    }

    #[test]
    fn a_missing_library_routes_by_the_topics_last_seen_for_the_same_plugin_only() {
        let config = config("[plugins.b]\nplugin = \"p\"\n[plugins.c]\nplugin = \"q\"\n");
        let memory: BTreeMap<String, Remembered> = [
            remembered("b", Origin::Configured, "p", &["p.>"]),
            // `c` ran another plugin then: its topics say nothing about `q`.
            remembered("c", Origin::Configured, "other", &["o.>"]),
        ]
        .into();
        let wants = wants(&config, &Libraries::default(), &memory);
        assert_eq!(topics(&wants["b"]), ["p.>"]);
        assert!(wants["b"].topics_known);
        assert_eq!(
            wants["b"].subscription.topics,
            Some(vec!["p.>".to_owned()]),
            "kept as they were"
        );
        assert!(topics(&wants["c"]).is_empty());
        assert!(!wants["c"].topics_known, "nothing is routed to it yet");
    }

    #[test]
    fn an_autoloaded_instance_outlives_its_library_until_forgotten() {
        let memory: BTreeMap<String, Remembered> =
            [remembered("z", Origin::Autoloaded, "z", &["z.*"])].into();
        let on = wants(&config(""), &Libraries::default(), &memory);
        assert_eq!(topics(&on["z"]), ["z.*"]);
        assert!(on["z"].run, "it runs when its library is back");
        let off = wants(
            &config("[host]\nautoload = false\n"),
            &Libraries::default(),
            &memory,
        );
        assert!(!off["z"].run, "subscribed, not run, while autoload is off");
        // A table of the same name takes it over.
        let table = wants(
            &config("[plugins.z]\ntopics = [\"t\"]\n"),
            &Libraries::default(),
            &memory,
        );
        assert_eq!(table["z"].subscription.origin, Origin::Configured);
        assert_eq!(topics(&table["z"]), ["t"]);
        // Forgotten (not remembered, no table, no library): no subscription at all.
        assert!(wants(&config(""), &Libraries::default(), &BTreeMap::new()).is_empty());
    }
}
