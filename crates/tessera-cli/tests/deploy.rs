//! The deployment files in `deploy/` agree with the binary and with their tools: every
//! `tessera` command they run parses (each flag is one the command has), the systemd units
//! pass `systemd-analyze verify`, the NATS configurations pass `nats-server -t`, the Helm
//! chart's values satisfy its schema and its templates read only values it defines (and,
//! where `helm` is installed, `helm lint` and `helm template` pass: no registry this
//! project may use ships helm), and the container file builds with the workspace's Rust
//! version and the same cargo command as a machine does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// Checks that `args` (`hub serve --data X --open`...) name a real command and that every
/// `--flag` is one of its options, asking the binary's own help.
fn check_command(origin: &str, args: &[String]) {
    let words: Vec<&str> = args.iter().map(String::as_str).take_while(|a| !a.starts_with('-')).collect();
    assert!(!words.is_empty(), "{origin}: no tessera command in {args:?}");
    let help = Command::new(env!("CARGO_BIN_EXE_tessera")).args(&words).arg("--help").output().unwrap();
    assert!(help.status.success(), "{origin}: `tessera {}` is not a command", words.join(" "));
    let help = String::from_utf8(help.stdout).unwrap();
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(
            help.lines().any(|l| l.trim_start().split([' ', ',']).any(|w| w == flag)),
            "{origin}: `tessera {}` has no option {flag}",
            words.join(" ")
        );
    }
}

#[test]
fn the_systemd_units_verify_and_run_real_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    let nats_server = tessera_nats::testing::binary();
    let nats_server = std::fs::canonicalize(&nats_server).unwrap_or(nats_server);
    for e in std::fs::read_dir(repo().join("deploy/systemd")).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        for line in text.lines() {
            if let Some(cmd) = line.strip_prefix("ExecStart=/usr/local/bin/tessera ") {
                // Variables from the environment file expand to options; the check sees
                // the unit's own words.
                let args: Vec<String> =
                    cmd.split_whitespace().filter(|w| !w.starts_with('$')).map(|w| w.replace("%i", "n1")).collect();
                check_command(&name, &args);
            }
        }
        // systemd-analyze checks that the binaries exist: point them at this build and at
        // the nats-server the tests run (the scripts install it under target/, not /usr).
        let text = text
            .replace("/usr/local/bin/tessera", env!("CARGO_BIN_EXE_tessera"))
            .replace("/usr/sbin/nats-server", &nats_server.to_string_lossy());
        std::fs::write(dir.path().join(&name), text).unwrap();
        units.push(name.replace("@.", "@n1."));
    }
    assert_eq!(units.len(), 3, "{units:?}");
    if !have("systemd-analyze") {
        eprintln!("systemd-analyze is not installed: the units' syntax was not verified");
        return;
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&units).current_dir(dir.path()).output().unwrap();
    let complaints = String::from_utf8_lossy(&out.stderr);
    // It reports unknown keys and bad values on stderr, naming the file, and exits 0.
    let ours: Vec<&str> = complaints.lines().filter(|l| l.contains(dir.path().to_str().unwrap())).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{complaints}");
}

#[test]
fn the_nats_configurations_are_valid() {
    let server = tessera_nats::testing::binary();
    assert!(have(server.to_str().unwrap()), "{} is needed (scripts/test installs it)", server.display());
    let mut n = 0;
    for e in std::fs::read_dir(repo().join("deploy/nats")).unwrap() {
        let path = e.unwrap().path();
        let out = Command::new(&server).arg("-t").arg("-c").arg(&path).output().unwrap();
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("jetstream") && text.contains("routes"), "{}", path.display());
        n += 1;
    }
    assert_eq!(n, 3, "three servers");
}

/// Every `.Values.a.b` path a template reads.
fn value_paths(template: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in template.match_indices(".Values.") {
        let rest = &template[i + ".Values.".len()..];
        let path: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_').collect();
        out.insert(path.trim_end_matches('.').to_owned());
    }
    out
}

fn lookup<'a>(values: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(values, |v, k| v.get(k))
}

#[test]
fn the_helm_chart_s_values_match_its_schema_and_templates() {
    let chart = repo().join("deploy/helm/tessera");
    let meta: Value = tessera_core::yaml::from_str_located(&read("deploy/helm/tessera/Chart.yaml")).unwrap();
    assert_eq!(meta["apiVersion"], "v2");
    assert_eq!(meta["name"], "tessera");
    semver::Version::parse(meta["version"].as_str().unwrap()).expect("the chart's version is semver");
    let workspace = read("Cargo.toml");
    assert!(workspace.contains(&format!("version = \"{}\"", meta["appVersion"].as_str().unwrap())), "appVersion");

    let values: Value = tessera_core::yaml::from_str_located(&read("deploy/helm/tessera/values.yaml")).unwrap();
    let schema: Value = serde_json::from_str(&read("deploy/helm/tessera/values.schema.json")).unwrap();
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.add_resource("urn:values", schema).unwrap();
    let index = compiler.compile("urn:values", &mut schemas).unwrap();
    schemas.validate(&values, index).unwrap_or_else(|e| panic!("values.yaml against values.schema.json: {e}"));
    // The schema refuses what it should: a typo'd key, a bad port, a relative dataset path.
    for (path, bad) in [
        ("hub", serde_json::json!({"port": 7700, "storage": "1Gi", "opne": true})),
        ("hub", serde_json::json!({"port": 70000, "storage": "1Gi"})),
        (
            "node",
            serde_json::json!({"replicas": 1, "gatewayPort": 7800, "storage": "1Gi", "datasets": [{"name": "d", "path": "rel"}]}),
        ),
    ] {
        let mut v = values.clone();
        v[path] = bad;
        assert!(schemas.validate(&v, index).is_err(), "the schema accepted {v}");
    }

    let mut read_paths = BTreeSet::new();
    let mut commands = 0;
    for e in std::fs::read_dir(chart.join("templates")).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        read_paths.extend(value_paths(&text));
        commands += check_template_commands(&path, &text);
    }
    assert_eq!(commands, 2, "the hub's and the nodes' commands were checked");
    for p in &read_paths {
        assert!(lookup(&values, p).is_some(), "a template reads .Values.{p}, which values.yaml does not define");
    }
    assert!(read_paths.len() >= 15, "{read_paths:?}");

    if have("helm") {
        for args in [vec!["lint"], vec!["template", "t"]] {
            let out = Command::new("helm").args(&args).arg(&chart).output().unwrap();
            assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    } else {
        eprintln!("helm is not installed (no registry here ships it): helm lint and template were not run");
    }
}

/// Checks each `command: ["/usr/local/bin/tessera", ...]` of a template with the `- --flag`
/// items of the `args:` list under it; gives how many it checked.
fn check_template_commands(path: &Path, text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let mut checked = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(list) = line.trim().strip_prefix("command: [\"/usr/local/bin/tessera\", ") else { continue };
        let mut args: Vec<String> =
            list.trim_end_matches(']').split(", ").map(|w| w.trim_matches('"').to_owned()).collect();
        for l in &lines[i + 1..] {
            let t = l.trim();
            if t == "args:" || t.starts_with("{{") {
                continue;
            }
            match t.strip_prefix("- --") {
                Some(flag) => args.push(format!("--{flag}")),
                None => break,
            }
        }
        check_command(&path.display().to_string(), &args);
        checked += 1;
    }
    checked
}

#[test]
fn the_container_file_builds_what_cargo_builds() {
    let file = read("deploy/Containerfile");
    let workspace = read("Cargo.toml");
    let rust =
        workspace.lines().find_map(|l| l.strip_prefix("rust-version = \"")).and_then(|v| v.strip_suffix('"')).unwrap();
    assert!(file.contains(&format!("FROM docker.io/library/rust:{rust}-bookworm AS build")), "rust {rust}");
    assert!(file.contains("cargo build --release --locked -p tessera-cli"), "the build command");
    assert!(file.contains("COPY --from=build /src/target/release/tessera /usr/local/bin/tessera"));
    // Its default command is a real one.
    let cmd = file.lines().find_map(|l| l.strip_prefix("CMD ")).unwrap();
    let args: Vec<String> = serde_json::from_str(cmd).unwrap();
    check_command("deploy/Containerfile", &args);
    // The build context leaves out what cargo builds.
    assert!(read(".dockerignore").lines().any(|l| l == "target/"));
}
