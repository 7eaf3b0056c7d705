//! `plugind check [-c FILE] [--probe] [--config-only] [--json]`: validates the configuration
//! and runs the loader's checks on every library the daemon would load, listing every
//! problem. No side effects: nothing is loaded into this process, nothing is written.
//!
//! Exit status: 0 all good; 78 the configuration is invalid, or its `state_dir` cannot be
//! created or written (the daemon could not start); 1 the configuration is valid but a
//! library is refused or missing (the daemon would start and run the rest).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde::Serialize;

use crate::{
    cli::{EXIT_CONFIG, EXIT_FAILURE, fail},
    config::{self, Config, ConfigError, Problem},
    loader::{self, Checked, ConfigCheck, LoadError, Policy, ProbeCommand},
};

/// What `check` found, as printed with `--json`.
#[derive(Debug, Default, Serialize)]
struct Report {
    config: ConfigReport,
    libraries: Vec<LibraryReport>,
    instances: Vec<InstanceReport>,
    /// Whether everything passed.
    ok: bool,
}

#[derive(Debug, Default, Serialize)]
struct ConfigReport {
    path: PathBuf,
    valid: bool,
    problems: Vec<Problem>,
    /// Why `state_dir` cannot be used, if it cannot.
    state_dir: Option<String>,
}

#[derive(Debug, Serialize)]
struct LibraryReport {
    path: PathBuf,
    name: Option<String>,
    version: Option<String>,
    sha256: Option<String>,
    /// `accepted` or `refused`.
    verdict: &'static str,
    /// `declared` (nothing loaded) or `probed` (loaded in a child process).
    verdict_kind: &'static str,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct InstanceReport {
    name: String,
    plugin: String,
    enabled: bool,
    /// Started from a library with no config entry (`autoload`).
    autoloaded: bool,
    library: Option<PathBuf>,
    error: Option<String>,
    /// The patterns routed to it: configured, or its library's own; `None` when it takes
    /// them from a library that is not there (nothing is routed to it yet, unless a daemon
    /// that ran it before remembers them).
    topics: Option<Vec<String>>,
    /// Whether its plugin checked its `config` table (`--probe`): `false` for a plugin built
    /// against plugind-api 1.0, which cannot check without starting; `None` when not probed.
    config_checked: Option<bool>,
}

/// Runs `check`.
pub fn run(config_flag: Option<&Path>, probe: bool, config_only: bool, json: bool) -> ExitCode {
    let (path, _) = match config::locate(config_flag) {
        Ok(found) => found,
        Err(e) => return fail(EXIT_CONFIG, format_args!("check: {e}")),
    };
    let mut report = Report {
        config: ConfigReport {
            path: path.clone(),
            ..ConfigReport::default()
        },
        ..Report::default()
    };
    let config = match config::load(&path) {
        Ok(config) => config,
        Err(ConfigError::Invalid(invalid)) => {
            if json {
                report.config.problems = invalid.problems.clone();
                print_json(&report);
            } else {
                eprintln!("{}\n", invalid.render());
            }
            let n = invalid.problems.len();
            return fail(
                EXIT_CONFIG,
                format_args!(
                    "{}: invalid configuration: {n} problem{}; nothing was changed",
                    path.display(),
                    if n == 1 { "" } else { "s" }
                ),
            );
        }
        Err(e) => return fail(EXIT_CONFIG, format_args!("check: {e}")),
    };
    // The state dir must be usable: a read-only one passed here, and the start then failed
    // over and over.
    if let Some(problem) = crate::daemon::state_dir_problem(&config.host.state_dir) {
        report.config.state_dir = Some(problem.clone());
        if json {
            print_json(&report);
        }
        return fail(
            EXIT_CONFIG,
            format_args!("{}: {problem}; the daemon cannot start", path.display()),
        );
    }
    report.config.valid = true;
    if !config_only {
        let probe = if probe {
            match ProbeCommand::current_exe() {
                Some(command) => Some(command),
                None => {
                    return fail(
                        EXIT_FAILURE,
                        "check --probe: cannot find the plugind executable",
                    );
                }
            }
        } else {
            None
        };
        check_libraries(&config, probe.as_ref(), &mut report);
    }
    report.ok = report.libraries.iter().all(|l| l.error.is_none())
        && report.instances.iter().all(|i| i.error.is_none());
    if json {
        print_json(&report);
    } else {
        print_text(&config, &report, config_only);
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        let refused = report
            .libraries
            .iter()
            .filter(|l| l.error.is_some())
            .count()
            + report
                .instances
                .iter()
                .filter(|i| i.error.is_some())
                .count();
        fail(
            EXIT_FAILURE,
            format_args!(
                "check: the configuration is valid, but {refused} librar{} or instance{} would \
                 not start (the daemon runs the rest)",
                if refused == 1 { "y" } else { "ies" },
                if refused == 1 { "" } else { "s" }
            ),
        )
    }
}

fn print_json(report: &Report) {
    println!(
        "{}",
        serde_json::to_string_pretty(report).expect("the report serializes")
    );
}

fn check_libraries(config: &Config, probe: Option<&ProbeCommand>, report: &mut Report) {
    let dir = &config.host.plugin_dir;
    let policy = Policy {
        trusted_owners: config.host.trusted_owner_uids.clone(),
        ..Policy::default()
    };
    let scanned = match loader::scan(dir, &policy) {
        Ok(scanned) => scanned,
        Err(e) => {
            report.libraries.push(LibraryReport {
                path: dir.clone(),
                name: None,
                version: None,
                sha256: None,
                verdict: "refused",
                verdict_kind: "declared",
                error: Some(format!("plugin_dir {}: cannot read: {e}", dir.display())),
            });
            return;
        }
    };
    // Manifest name → the libraries claiming it, in path order.
    let mut by_name: BTreeMap<String, Vec<(PathBuf, [u8; 32])>> = BTreeMap::new();
    // Manifest name → that plugin's own topics.
    let mut manifests: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Instance → what its plugin said of its config (probed libraries only).
    let mut config_checks: BTreeMap<String, ConfigCheck> = BTreeMap::new();
    for (path, checked) in scanned {
        // Probed only what the checks of the file alone accepted.
        let probed = probe.is_some() && checked.is_ok();
        let checked = checked.and_then(|checked| match probe {
            Some(command) => {
                // The plugin checks the config of every instance that runs it.
                let configs: BTreeMap<String, serde_json::Value> = config
                    .instances
                    .values()
                    .filter(|i| i.plugin == checked.manifest().name)
                    .map(|i| (i.name.clone(), i.config.clone()))
                    .collect();
                let checks = checked.probe_configs(command, &configs)?;
                config_checks.extend(checks);
                Ok(checked)
            }
            None => Ok(checked),
        });
        report
            .libraries
            .push(library_report(&path, &checked, probed));
        if let Ok(checked) = checked {
            manifests.insert(
                checked.manifest().name.clone(),
                checked.manifest().topics.clone(),
            );
            by_name
                .entry(checked.manifest().name.clone())
                .or_default()
                .push((path, checked.sha256()));
        }
    }
    for (name, claims) in &by_name {
        if claims.len() > 1 {
            let paths: Vec<String> = claims
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            for library in report
                .libraries
                .iter_mut()
                .filter(|l| l.name.as_ref() == Some(name))
            {
                library.verdict = "refused";
                library.error = Some(format!(
                    "{} libraries claim the plugin name `{name}`: {}; remove all but one",
                    claims.len(),
                    paths.join(" and ")
                ));
            }
        }
    }
    let mut used = Vec::new();
    // `plugins.toml`'s text, to place a config key a plugin refused.
    let mut source_text: Option<String> = None;
    for instance in config.instances.values() {
        let claims = by_name.get(&instance.plugin).filter(|c| c.len() == 1);
        let library = claims.map(|c| c[0].0.clone());
        let error = if !instance.enabled {
            None
        } else {
            match claims {
                None if by_name.contains_key(&instance.plugin) => Some(format!(
                    "plugin `{}` is claimed by several libraries (see above)",
                    instance.plugin
                )),
                None => Some(format!(
                    "no library in {} provides plugin `{}`",
                    dir.display(),
                    instance.plugin
                )),
                Some(c) => instance.sha256.filter(|pin| *pin != c[0].1).map(|pin| {
                    LoadError::DigestMismatch {
                        path: c[0].0.clone(),
                        expected: hex::encode(pin),
                        found: hex::encode(c[0].1),
                    }
                    .to_string()
                }),
            }
        };
        let check = config_checks.get(&instance.name);
        let error = error.or_else(|| match check {
            Some(ConfigCheck::Refused { path, message }) => {
                // Read once, and only if a plugin refused a config.
                let text = source_text.get_or_insert_with(|| {
                    std::fs::read_to_string(&config.source).unwrap_or_default()
                });
                let problem = config::plugin_config_problem(text, &instance.name, path, message);
                Some(format!("{}:{problem}", config.source.display()))
            }
            _ => None,
        });
        let config_checked = check.map(|c| !matches!(c, ConfigCheck::Unchecked));
        used.push(instance.plugin.clone());
        let topics = match &instance.topics {
            Some(configured) => Some(configured.iter().map(|p| p.as_str().to_owned()).collect()),
            None => manifests.get(&instance.plugin).cloned(),
        };
        report.instances.push(InstanceReport {
            name: instance.name.clone(),
            plugin: instance.plugin.clone(),
            enabled: instance.enabled,
            autoloaded: false,
            library,
            error,
            topics,
            config_checked,
        });
    }
    if config.host.autoload {
        for (name, claims) in by_name
            .iter()
            .filter(|(name, c)| c.len() == 1 && !used.contains(name))
        {
            report.instances.push(InstanceReport {
                name: name.clone(),
                plugin: name.clone(),
                enabled: true,
                autoloaded: true,
                library: Some(claims[0].0.clone()),
                error: None,
                topics: manifests.get(name).cloned(),
                config_checked: None,
            });
        }
    }
}

fn library_report(
    path: &Path,
    checked: &Result<Checked, LoadError>,
    probed: bool,
) -> LibraryReport {
    let ok = checked.as_ref().ok();
    LibraryReport {
        path: path.to_owned(),
        name: ok.map(|c| c.manifest().name.clone()),
        version: ok.map(|c| c.manifest().version.clone()),
        sha256: ok.map(|c| hex::encode(c.sha256())),
        verdict: if ok.is_some() { "accepted" } else { "refused" },
        verdict_kind: if probed { "probed" } else { "declared" },
        error: checked.as_ref().err().map(ToString::to_string),
    }
}

fn print_text(config: &Config, report: &Report, config_only: bool) {
    let enabled = config.instances.values().filter(|i| i.enabled).count();
    println!(
        "{}: valid configuration, {} instance{} ({enabled} enabled)",
        config.source.display(),
        config.instances.len(),
        if config.instances.len() == 1 { "" } else { "s" }
    );
    if config_only {
        return;
    }
    for library in &report.libraries {
        match (&library.error, &library.name, &library.version) {
            (None, Some(name), Some(version)) => println!(
                "library {}: {name} {version}, accepted ({})",
                library.path.display(),
                library.verdict_kind
            ),
            (error, _, _) => println!(
                "library {}: refused ({}): {}",
                library.path.display(),
                library.verdict_kind,
                error.as_deref().unwrap_or("")
            ),
        }
    }
    for instance in &report.instances {
        let mut line = match (&instance.error, &instance.library) {
            (Some(error), _) => format!("cannot start: {error}"),
            (None, _) if !instance.enabled => {
                "disabled (its messages wait in the ledger until it is enabled)".to_owned()
            }
            (None, Some(library)) if instance.autoloaded => format!(
                "autoloaded with the defaults from {} (no [plugins.{}] entry)",
                library.display(),
                instance.name
            ),
            (None, Some(library)) => format!("runs {} from {}", instance.plugin, library.display()),
            (None, None) => "disabled".to_owned(),
        };
        if instance.topics.is_none() {
            line.push_str(
                "; nothing is routed to it yet: it takes its topics from its plugin's library, \
                 which is not in plugin_dir (a daemon that loaded it before keeps routing by \
                 the topics it last saw)",
            );
        }
        if instance.config_checked == Some(false) {
            line.push_str(
                "; its config was not checked: its plugin was built with plugind-api 1.0, \
                 which cannot check a config without starting",
            );
        }
        println!("instance {}: {line}", instance.name);
    }
    let unchecked = report
        .instances
        .iter()
        .filter(|i| i.config_checked == Some(false))
        .count();
    if report.ok && unchecked == 0 {
        println!("all good");
    } else if report.ok {
        println!(
            "no problem found, but {unchecked} instance config{} could not be checked (see above)",
            if unchecked == 1 { "" } else { "s" }
        );
    }
}
