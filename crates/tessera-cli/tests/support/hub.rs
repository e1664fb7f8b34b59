//! A hub process started for a test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Spawns `serve` (a `tessera hub serve ... --listen 127.0.0.1:0` command) and gives the
/// process and the URL it says it listens at; the rest of its log is drained.
pub fn spawn_hub(mut serve: Command) -> (Child, String) {
    let mut child = serve.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the hub says where it listens").unwrap();
        if let Some(rest) = line.strip_prefix("hub: ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}
