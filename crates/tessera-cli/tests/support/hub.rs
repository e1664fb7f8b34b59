//! A hub process started for a test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Spawns `serve` (a `tessera hub serve ... --listen 127.0.0.1:0` command) and gives the
/// process and the URL it says it listens at ([`hub_url`]).
#[allow(dead_code)]
pub fn spawn_hub(mut serve: Command) -> (Child, String) {
    let mut child = serve.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let url = hub_url(&mut child);
    (child, url)
}

/// The URL a hub process started with its stderr piped says it listens at (a panic with
/// what it said instead when it ends first); the rest of its log is drained.
pub fn hub_url(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stderr.take().expect("the hub's stderr is piped")).lines();
    let mut said = String::new();
    let url = loop {
        let line = lines.next().unwrap_or_else(|| panic!("the hub says where it listens; it said:\n{said}")).unwrap();
        said.push_str(&line);
        said.push('\n');
        if let Some(rest) = line.strip_prefix("hub: ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    url
}
