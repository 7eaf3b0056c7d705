//! `plugind check` through the real binary: a good configuration, one with three mistakes,
//! a bad library, two libraries claiming one name, a missing plugin, the probe, `--json`,
//! `--config-only`, and the config search order.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use plugind_tests::{
    binary,
    fixtures::{self, Profile},
    sandbox::Sandbox,
};

/// A deployment: `plugins.toml` and `plugins.d/` with the given fixture libraries.
fn deployment(config: &str, libraries: &[(&str, &str)]) -> Sandbox {
    let sandbox = Sandbox::new("check");
    sandbox.dir("plugins.d");
    for (file, fixture) in libraries {
        sandbox.copy(
            &format!("plugins.d/{file}"),
            &fixtures::library(fixture, Profile::Dev),
        );
    }
    sandbox.put("plugins.toml", config);
    sandbox
}

fn check(sandbox: &Sandbox, args: &[&str]) -> Output {
    Command::new(binary::plugind())
        .arg("check")
        .arg("-c")
        .arg(sandbox.path().join("plugins.toml"))
        .args(args)
        .env_remove("PLUGIND_CONFIG")
        .output()
        .expect("plugind runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const GOOD: &str = "\
# The demo deployment of these tests.
[host]
plugin_dir = \"plugins.d\"
state_dir = \"state\"

[plugins.echo]
plugin = \"fx-echo\"
topics = [\"echo.>\"]
[plugins.echo.config]
label = \"demo\"
";

#[test]
fn a_good_configuration_passes() {
    let d = deployment(GOOD, &[("fx-echo.so", "fx-echo")]);
    let out = check(&d, &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("valid configuration, 1 instance (1 enabled)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fx-echo 0.1.0, accepted (declared)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("instance echo: runs fx-echo from"),
        "{stdout}"
    );
    assert!(stdout.ends_with("all good\n"), "{stdout}");
}

#[test]
fn three_mistakes_are_all_listed_with_their_positions() {
    let d = deployment(
        "\
[host]
listen = \"tcp:127.0.0.1:7070\"

[defaults]
max_attempts = 0

[plugins.echo]
topics = [\"echo.>.x\"]
",
        &[],
    );
    let out = check(&d, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    let file = d.path().join("plugins.toml");
    for (position, words) in [
        ("2:10", "no `tcp_token_file`"),
        ("5:16", "`max_attempts` is 0"),
        ("8:11", "topic pattern \"echo.>.x\""),
    ] {
        let line = format!("{}:{position}: ", file.display());
        assert!(stderr.contains(&line), "missing {line} in:\n{stderr}");
        assert!(stderr.contains(words), "missing {words} in:\n{stderr}");
    }
    assert!(
        stderr.contains("|          ^^^^^^^^^^^^^^^^^^^^\n"),
        "caret snippets:\n{stderr}"
    );
    assert!(
        stderr
            .trim_end()
            .ends_with("invalid configuration: 3 problems; nothing was changed"),
        "{stderr}"
    );
}

#[test]
fn a_bad_library_is_named_with_the_loaders_message() {
    let d = deployment(GOOD, &[("fx-echo.so", "fx-echo")]);
    let bytes = std::fs::read(fixtures::library("fx-echo", Profile::Dev)).unwrap();
    d.put("plugins.d/broken.so", &bytes[..bytes.len() / 2]);
    let out = check(&d, &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("broken.so: refused (declared)"), "{stdout}");
    assert!(stdout.contains("incomplete file"), "{stdout}");
    assert!(
        stdout.contains("instance echo: runs fx-echo"),
        "the rest still runs: {stdout}"
    );
    assert!(text(&out.stderr).contains("the daemon runs the rest"));
    // The same deployment passes --config-only: a library never blocks a service start.
    assert_eq!(check(&d, &["--config-only"]).status.code(), Some(0));
}

#[test]
fn two_libraries_claiming_one_name_are_both_named() {
    let d = deployment(GOOD, &[("a-echo.so", "fx-echo"), ("b-echo.so", "fx-echo2")]);
    let out = check(&d, &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let a = d.path().join("plugins.d/a-echo.so");
    let b = d.path().join("plugins.d/b-echo.so");
    let claim = format!(
        "2 libraries claim the plugin name `fx-echo`: {} and {}",
        a.display(),
        b.display()
    );
    assert!(stdout.contains(&claim), "{stdout}");
    assert!(stdout.contains("instance echo: cannot start"), "{stdout}");
}

#[test]
fn a_missing_plugin_and_a_wrong_pin_stop_only_their_instance() {
    let pin = "ab".repeat(32);
    let config = format!(
        "{GOOD}\n[plugins.ghost]\nplugin = \"nope\"\n\n[plugins.pinned]\nplugin = \"fx-faulty\"\nsha256 = \"{pin}\"\n"
    );
    let d = deployment(
        &config,
        &[("fx-echo.so", "fx-echo"), ("fx-faulty.so", "fx-faulty")],
    );
    let out = check(&d, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["config"]["valid"], true);
    let instance = |name: &str| {
        report["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(instance("echo")["error"], serde_json::Value::Null);
    let ghost = instance("ghost")["error"].as_str().unwrap().to_owned();
    assert!(ghost.contains("provides plugin `nope`"), "{ghost}");
    // It takes its topics from a library that is not there: nothing is routed to it yet.
    assert_eq!(instance("ghost")["topics"], serde_json::Value::Null);
    let stdout = text(&check(&d, &[]).stdout);
    assert!(
        stdout.contains("instance ghost: cannot start")
            && stdout.contains("nothing is routed to it yet"),
        "{stdout}"
    );
    let pinned = instance("pinned")["error"].as_str().unwrap().to_owned();
    assert!(
        pinned.contains(&format!("sha256 mismatch: expected {pin}")),
        "{pinned}"
    );
}

#[test]
fn autoload_starts_unreferenced_libraries_with_the_defaults() {
    let d = deployment(GOOD, &[("fx-echo.so", "fx-echo"), ("noop.so", "fx-noop")]);
    let out = check(&d, &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("instance fx-noop: autoloaded with the defaults"),
        "{stdout}"
    );
    let off = GOOD.replace("state_dir", "autoload = false\nstate_dir");
    let d = deployment(&off, &[("fx-echo.so", "fx-echo"), ("noop.so", "fx-noop")]);
    let stdout = text(&check(&d, &[]).stdout);
    assert!(!stdout.contains("autoloaded"), "{stdout}");
}

#[test]
fn the_probe_catches_what_reading_the_file_cannot() {
    let d = deployment(
        GOOD,
        &[("fx-echo.so", "fx-echo"), ("crash.so", "fx-ctor-crash")],
    );
    assert_eq!(
        check(&d, &[]).status.code(),
        Some(0),
        "declared: looks fine"
    );
    let out = check(&d, &["--probe"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("crash.so: refused (probed)"), "{stdout}");
    assert!(stdout.contains("killed by SIGSEGV"), "{stdout}");
    assert!(
        stdout.contains("fx-echo 0.1.0, accepted (probed)"),
        "{stdout}"
    );
}

#[test]
fn the_configuration_is_found_by_env_then_working_directory() {
    let d = deployment(GOOD, &[("fx-echo.so", "fx-echo")]);
    let run = |dir: &Path, env: Option<PathBuf>| {
        let mut command = Command::new(binary::plugind());
        command
            .arg("check")
            .current_dir(dir)
            .env_remove("PLUGIND_CONFIG");
        if let Some(env) = env {
            command.env("PLUGIND_CONFIG", env);
        }
        command.output().unwrap()
    };
    let elsewhere = Sandbox::new("elsewhere");
    let by_env = run(elsewhere.path(), Some(d.path().join("plugins.toml")));
    assert_eq!(by_env.status.code(), Some(0), "{}", text(&by_env.stderr));
    let by_cwd = run(d.path(), None);
    assert_eq!(by_cwd.status.code(), Some(0), "{}", text(&by_cwd.stderr));
    assert!(text(&by_cwd.stdout).starts_with("plugins.toml: valid configuration"));
    if !Path::new("/etc/plugind/plugins.toml").exists() {
        let none = run(elsewhere.path(), None);
        assert_eq!(none.status.code(), Some(78));
        assert!(text(&none.stderr).starts_with("plugind: check: no configuration file"));
    }
    let missing = run(elsewhere.path(), Some(elsewhere.path().join("nope.toml")));
    assert_eq!(missing.status.code(), Some(78));
    assert!(text(&missing.stderr).contains("nope.toml: cannot read"));
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(binary::plugind())
        .args(["check", "--config-only", "--probe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(binary::plugind())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_probe_asks_each_plugin_about_its_config_and_names_a_refused_key_in_plugins_toml() {
    let config = "\
[host]
plugin_dir = \"plugins.d\"
state_dir = \"state\"

[plugins.good]
plugin = \"fx-defer\"
[plugins.good.config]
report = \"out/good.jsonl\"

[plugins.typo]
plugin = \"fx-defer\"
[plugins.typo.config]
report = \"out/typo.jsonl\"
report_cals = true

[plugins.wrong]
plugin = \"fx-defer\"
[plugins.wrong.config]
report = 7
";
    let d = deployment(config, &[("fx-defer.so", "fx-defer")]);
    // Without the probe nothing runs plugin code: the config is not checked.
    let out = check(&d, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = check(&d, &["--probe"]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let file = d.path().join("plugins.toml");
    let typo = format!(
        "instance typo: cannot start: {}:14:1: plugins.typo.config.report_cals: the plugin \
         refuses it: unknown field `report_cals`",
        file.display()
    );
    assert!(stdout.contains(&typo), "{stdout}");
    let wrong = format!(
        "instance wrong: cannot start: {}:19:1: plugins.wrong.config.report: the plugin refuses \
         it: invalid type: integer `7`",
        file.display()
    );
    assert!(stdout.contains(&wrong), "{stdout}");
    assert!(stdout.contains("instance good: runs fx-defer"), "{stdout}");
    let out = check(&d, &["--probe", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let good = report["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "good")
        .unwrap();
    assert_eq!(good["config_checked"], true);
    assert_eq!(good["error"], serde_json::Value::Null);
}
