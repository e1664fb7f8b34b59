//! The dashboard in a real browser: `tessera quickstart --ui` runs a short session and keeps
//! serving; headless Chromium (driven by scripts/browser.py over the DevTools protocol)
//! opens the runs, nodes, model and module pages; the test checks what they show, that
//! they requested nothing from any other host, and scrapes /metrics.
//!
//! Needs Chromium (`chromium-headless-shell`; scripts/test installs it). With
//! TESSERA_UPDATE_SCREENSHOTS=1 the screenshots are copied to docs/screenshots/.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(url: &str) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new().get(url).timeout(Duration::from_secs(10)).send().await.unwrap();
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.text().await.unwrap()
    })
}

/// The value of the first sample of `metric` whose labels contain `labels`.
fn sample(metrics: &str, metric: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| (l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} "))) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {metric}{{{labels}}} in /metrics:\n{metrics}"))
}

#[test]
fn the_dashboard_shows_the_session_rounds_nodes_and_lineage_from_this_host_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["quickstart", "--ui", "--listen", "127.0.0.1:0", "--rounds", "3", "--home"])
        .arg(dir.path().join("home"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let quickstart = Killed(child);
    // The last line names the model's page once the session has ended.
    let mut seen = Vec::new();
    let mut base = None;
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("dashboard: ")
            && rest.contains("#/models/")
        {
            base = Some(rest.split("/ui").next().unwrap().to_owned());
            break;
        }
        seen.push(line);
    }
    let base =
        base.unwrap_or_else(|| panic!("the quickstart did not say where its dashboard is:\n{}", seen.join("\n")));
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    // Metrics of the hub, the coordinator and the nodes of this process.
    let metrics = get(&format!("{base}/metrics"));
    assert_eq!(sample(&metrics, "tessera_rounds_total", "strategy=\"fedavg\""), 3.0);
    assert_eq!(sample(&metrics, "tessera_round_seconds_count", "strategy=\"fedavg\""), 3.0);
    assert!(sample(&metrics, "tessera_round_seconds_sum", "strategy=\"fedavg\"") > 0.0);
    assert_eq!(sample(&metrics, "tessera_tasks_total", "outcome=\"ok\""), 12.0, "3 rounds of 4 nodes");
    assert!(sample(&metrics, "tessera_node_tasks_total", "node=\"node-0\",outcome=\"ok\"") >= 3.0);
    assert_eq!(sample(&metrics, "tessera_round_participants", ""), 4.0);

    // The pages, in Chromium.
    let shots = dir.path().join("shots");
    let pages = [
        ("runs", "#chart-accuracy circle[data-round]"),
        ("nodes", "#nodes tr[data-node]"),
        ("models/digits.softmax/0.1.0", "#lineage .lnode"),
        ("modules/fl.softmax.worker/0.1.2", "#module-view #manifest"),
    ];
    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("scripts/browser.py")).arg(&shots);
    for (page, selector) in pages {
        cmd.arg(format!("{base}/ui#/{page}|{selector}"));
    }
    let run = cmd.output().unwrap();
    assert!(run.status.success(), "scripts/browser.py: {}", String::from_utf8_lossy(&run.stderr));
    let reports: Vec<serde_json::Value> =
        String::from_utf8(run.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.len(), pages.len());
    let html: Vec<String> =
        reports.iter().map(|r| std::fs::read_to_string(r["html"].as_str().unwrap()).unwrap()).collect();

    // Every request went to the hub (a data: URL is no request to a host).
    for r in &reports {
        let requests = r["requests"].as_array().unwrap();
        assert!(requests.len() >= 4, "the page, its script and style, and its data: {requests:?}");
        for u in requests {
            let u = u.as_str().unwrap();
            assert!(u.starts_with(&format!("{base}/")) || u.starts_with("data:"), "{} requested {u}", r["url"]);
        }
    }
    let has = |page: usize, what: &str| assert!(html[page].contains(what), "page {} lacks {what}", pages[page].0);
    // The runs page: the session, a point per round on the accuracy chart, a bar per round.
    let chart = |id: &str| {
        let start = html[0].find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} on the runs page"));
        let end = start + html[0][start..].find("</svg>").unwrap();
        html[0][start..end].to_owned()
    };
    let accuracy = chart("chart-accuracy");
    for round in 1..=3 {
        assert!(
            accuracy.contains(&format!("data-round=\"{round}\" data-series=\"test\"")),
            "round {round}: {accuracy}"
        );
    }
    assert_eq!(chart("chart-durations").matches("class=\"bar\"").count(), 3);
    assert_eq!(chart("chart-loss").matches("<circle").count(), 6, "test and train loss of 3 rounds");
    has(0, "fl.softmax.worker@0.1.2");
    // The node list.
    for k in 0..4 {
        has(1, &format!("data-node=\"node-{k}\""));
    }
    // The model's lineage as a graph: the run, its data set, module and nodes, the model.
    for (kind, label) in [
        ("model", "digits.softmax@0.1.0"),
        ("dataset", "digits"),
        ("module", "fl.softmax.worker@0.1.2"),
        ("node", "node-3"),
    ] {
        has(2, &format!("data-kind=\"{kind}\" data-label=\"{label}\""));
    }
    has(2, "data-kind=\"run\"");
    // The module's card and manifest.
    has(3, "Learning and testing federated sessions");
    has(3, "\"entry\": \"module.wasm\"");

    if std::env::var_os("TESSERA_UPDATE_SCREENSHOTS").is_some() {
        let docs = repo().join("docs/screenshots");
        std::fs::create_dir_all(&docs).unwrap();
        for (r, name) in reports.iter().zip(["runs", "nodes", "model-lineage", "module"]) {
            std::fs::copy(r["png"].as_str().unwrap(), docs.join(format!("dashboard-{name}.png"))).unwrap();
        }
    }
    drop(quickstart);
}
