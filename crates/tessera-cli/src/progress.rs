//! Per-round progress of a session on the terminal.

use indicatif::{ProgressBar, ProgressStyle};
use tessera_coordinator::{IterationReport, Observer, StageReport};
use tessera_core::registry::PackageRecord;
use tessera_core::wire::{NodeRecord, RoundReport};
use tessera_swarm::SwarmSpec;

/// A progress bar, and one line per finished round (printed plainly when the output is not
/// a terminal).
pub struct Progress {
    bar: ProgressBar,
    /// The rounds this process saw start, when the second did, when the last round
    /// finished and how many did.
    times: std::sync::Mutex<Times>,
}

/// See [`Progress::apart`].
#[derive(Default)]
struct Times {
    started: u32,
    second_started: Option<std::time::Instant>,
    finished: u32,
    last_finished: Option<std::time::Instant>,
}

impl Progress {
    /// A bar for `rounds` rounds.
    pub fn new(rounds: u32) -> Self {
        let bar = ProgressBar::new(u64::from(rounds));
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress { bar, times: Default::default() }
    }

    /// The wall time a round after the first took on average, in seconds: from the second
    /// round's start here to the last round's end, over the rounds after the first. What
    /// a round costs when its evaluation runs beside the next (a round ends after the next
    /// one's training). `None` before two rounds finished.
    pub fn apart(&self) -> Option<f64> {
        let t = self.times.lock().unwrap_or_else(|p| p.into_inner());
        let (from, to) = (t.second_started?, t.last_finished?);
        (t.finished > 1 && to > from).then(|| (to - from).as_secs_f64() / f64::from(t.finished - 1))
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn line(&self, text: String) {
        if self.bar.is_hidden() {
            println!("{text}");
        } else {
            self.bar.println(text);
        }
    }
}

impl Observer for Progress {
    fn started(&self, session: &str, module: &PackageRecord, eligible: &[NodeRecord], rounds: u32, done: u32) {
        let resumed = if done > 0 { format!(", resumed after round {done}") } else { String::new() };
        self.bar.set_length(u64::from(rounds));
        self.bar.set_position(u64::from(done));
        self.line(format!(
            "session {session}: {} of {}@{} on {} ({}){resumed}",
            count(u64::from(rounds), "round"),
            module.name,
            module.version,
            count(eligible.len() as u64, "node"),
            eligible.iter().map(|n| n.id.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    fn round_started(&self, round: u32, selected: &[String]) {
        {
            let mut t = self.times.lock().unwrap_or_else(|p| p.into_inner());
            t.started += 1;
            if t.started == 2 {
                t.second_started = Some(std::time::Instant::now());
            }
        }
        self.bar.set_message(format!("round {round}: training on {}", selected.join(", ")));
    }
    fn round_finished(&self, r: &RoundReport) {
        {
            let mut t = self.times.lock().unwrap_or_else(|p| p.into_inner());
            t.finished += 1;
            t.last_finished = Some(std::time::Instant::now());
        }
        self.bar.inc(1);
        let acc = r.eval_accuracy.map_or("-".into(), |a| format!("{a:.3}"));
        let loss = r.eval_loss.map_or("-".into(), |l| format!("{l:.4}"));
        let failed = failures(r);
        // Asynchronous sessions: how old the oldest update of the step was.
        let stale = r.staleness.iter().max().map_or(String::new(), |s| format!(", staleness up to {s}"));
        // Simulated participants are `<node>.c<j>`: count participants then, not nodes.
        let what = if r.contributed.iter().any(|p| p.contains(".c")) { "participant" } else { "node" };
        // An asynchronous session's rounds are server steps.
        let round = if r.staleness.is_empty() { "round" } else { "step" };
        self.line(format!(
            "{round} {:>2}  train loss {:.4}  test loss {loss}  test accuracy {acc}  ({}{failed}{stale}, {:.0} ms)",
            r.round,
            r.train_loss,
            count(r.contributed.len() as u64, what),
            r.seconds * 1000.0
        ));
    }
    fn swarm_started(&self, run: &str, spec: &SwarmSpec, done: u32) {
        let resumed = if done > 0 { format!(", resumed after iteration {done}") } else { String::new() };
        self.bar.set_length(u64::from(spec.iterations));
        self.bar.set_position(u64::from(done));
        self.line(format!(
            "swarm {run}: up to {} of {}{resumed}",
            count(u64::from(spec.iterations), "iteration"),
            spec.stages().join(" -> ")
        ));
    }
    fn stage_finished(&self, iteration: u32, s: &StageReport) {
        self.bar.set_message(format!(
            "iteration {iteration}: {} done on {}",
            s.task,
            count(s.succeeded.len() as u64, "node")
        ));
    }
    fn iteration_finished(&self, r: &IterationReport) {
        self.bar.inc(1);
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|s| {
                let failed =
                    if s.failures.is_empty() { String::new() } else { format!(", {} failed", s.failures.len()) };
                format!("{} on {}{failed}", s.task, count(s.succeeded.len() as u64, "node"))
            })
            .collect();
        let answer = match r.proceed {
            Some(false) => "; the scheduler ends the run",
            _ => "",
        };
        self.line(format!(
            "iteration {:>2}  {}{answer}  ({:.0} ms)",
            r.iteration,
            stages.join(", "),
            r.seconds * 1000.0
        ));
    }
}

/// `n thing` or `n things`.
pub fn count(n: u64, thing: &str) -> String {
    if n == 1 { format!("1 {thing}") } else { format!("{n} {thing}s") }
}

/// A round's failures for its line: the first few with their reason, then how many more.
fn failures(r: &RoundReport) -> String {
    const SHOWN: usize = 3;
    if r.failures.is_empty() {
        return String::new();
    }
    let mut parts: Vec<String> = r
        .failures
        .iter()
        .take(SHOWN)
        .map(|f| {
            let why: String = f.error.chars().take(80).collect();
            let cut = if f.error.chars().count() > 80 { "…" } else { "" };
            format!("{} ({why}{cut})", f.node)
        })
        .collect();
    if r.failures.len() > SHOWN {
        parts.push(format!("and {} more", r.failures.len() - SHOWN));
    }
    format!("; {} failed: {}", r.failures.len(), parts.join(", "))
}

/// "rounds after the first: … ms apart on average: … node work, … evaluation (… beside the
/// next round), … overhead" (the first round also fetches and compiles the module on every
/// node, so it is left out). `apart`: the mean wall time of a round after the first when
/// the caller measured it ([`Progress::apart`]); otherwise the rounds' mean `seconds`.
pub fn round_summary_line(reports: &[RoundReport], apart: Option<f64>) -> Option<String> {
    let steady = if reports.len() > 1 { &reports[1..] } else { reports };
    let (round, compute, eval, overhead) = tessera_core::wire::round_summary(steady)?;
    let n = steady.len() as f64;
    let mean = |f: &dyn Fn(&RoundReport) -> f64| steady.iter().map(f).sum::<f64>() / n * 1e3;
    let beside = mean(&|r| r.timings.evaluation_beside);
    Some(format!(
        "rounds after the first: {:.2} ms apart on average: {:.1} ms node work, {:.1} ms evaluation \
         ({beside:.1} ms beside the next round), {:.1} ms overhead \
         (dispatch {:.1} ms, to the nodes and back {:.1} ms, transfer {:.1} ms, aggregation {:.1} ms)",
        apart.unwrap_or(round) * 1e3,
        compute * 1e3,
        eval * 1e3 + beside,
        overhead * 1e3,
        mean(&|r| r.timings.dispatch),
        mean(&|r| (r.timings.waiting - r.compute_seconds).max(0.0)),
        mean(&|r| r.timings.transfer),
        mean(&|r| r.timings.aggregation),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::wire::Failure;

    #[test]
    fn a_round_s_wall_time_is_measured_from_the_second_round_s_start() {
        let p = Progress::new(3);
        let report = |round: u32| -> RoundReport {
            serde_json::from_value(serde_json::json!({
                "round": round, "selected": [], "contributed": [], "failures": [], "examples": 0, "train_loss": 0.0,
                "eval_loss": null, "eval_accuracy": null, "model": tessera_core::Digest::of(b"m").to_string(), "seconds": 0.1
            }))
            .unwrap()
        };
        p.round_started(1, &[]);
        p.round_started(2, &[]);
        // Round 1 ends after round 2's training (its evaluation ran beside it).
        p.round_finished(&report(1));
        assert_eq!(p.apart(), None, "one round finished");
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.round_finished(&report(2));
        let apart = p.apart().expect("two rounds finished");
        assert!(apart >= 0.002, "{apart}");
        p.finish();
    }

    #[test]
    fn counts_and_failures_read_well() {
        assert_eq!(count(1, "node"), "1 node");
        assert_eq!(count(4, "node"), "4 nodes");
        let mut r: RoundReport = serde_json::from_value(serde_json::json!({
            "round": 1, "selected": [], "contributed": [], "failures": [], "examples": 0, "train_loss": 0.0,
            "eval_loss": null, "eval_accuracy": null, "model": tessera_core::Digest::of(b"m").to_string(), "seconds": 0.1
        }))
        .unwrap();
        assert_eq!(failures(&r), "");
        r.failures = (0..2000)
            .map(|i| Failure { node: format!("node-0.c{i}"), error: "no reply within the round's time-out".into() })
            .collect();
        let line = failures(&r);
        assert!(line.starts_with("; 2000 failed: node-0.c0 (no reply within the round's time-out)"), "{line}");
        assert!(line.ends_with("and 1997 more"), "{line}");
        assert!(line.len() < 300, "a round line stays one line: {line}");
    }
}
