//! A running child process: handshake, calls, context requests, shutdown.

use std::collections::VecDeque;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Value, json};
use tessera_ports::{Instance, Invocation, LogLevel, Outputs, RuntimeError, TaskContext};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::task::JoinHandle;

use crate::frame::{self, BlobKind, FrameError, Header, PROTOCOL_VERSION};
use crate::{ProcessLimits, sandbox};

/// How many stderr lines are kept for error messages.
const TAIL_LINES: usize = 20;
/// Longest stderr line passed on (longer lines are split).
const MAX_LINE: u64 = 8 * 1024;
/// How long a child gets to exit after `shutdown`, or to be reaped after it closed stdout.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Largest read a `dataset_read` request gets in one reply.
const MAX_DATASET_READ: u64 = 16 << 20;

/// The last lines a child wrote to stderr, and how much it wrote since the last call
/// started.
#[derive(Clone, Default)]
pub(crate) struct StderrTail(Arc<TailInner>);

#[derive(Default)]
pub(crate) struct TailInner {
    lines: Mutex<VecDeque<String>>,
    /// Bytes logged since the current call (or the start) began.
    logged: std::sync::atomic::AtomicU64,
    /// Set once the child went past its log limit (and was killed for it).
    flooded: std::sync::atomic::AtomicBool,
}

impl StderrTail {
    fn push(&self, line: String) {
        let mut tail = self.0.lines.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    /// A call starts: its log allowance starts afresh.
    fn new_call(&self) {
        self.0.logged.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// `"; last stderr lines:\n..."`, or a note that there were none.
    fn describe(&self) -> String {
        let tail = self.0.lines.lock().unwrap_or_else(|e| e.into_inner());
        if tail.is_empty() {
            "; last stderr lines: (none)".into()
        } else {
            let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
            format!("; last stderr lines:\n{}", lines.join("\n"))
        }
    }
}

/// Passes the child's stderr lines to the task's log, keeping the last few. A child
/// writing more than `max_bytes` while it starts or during one call has its process
/// group killed (and its further output read and dropped).
pub(crate) fn pump_stderr(
    stderr: ChildStderr,
    ctx: Arc<dyn TaskContext>,
    tail: StderrTail,
    max_bytes: u64,
    pid: Option<u32>,
) -> JoinHandle<()> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tail.0.flooded.load(Ordering::Relaxed) {
                        continue;
                    }
                    if tail.0.logged.fetch_add(n as u64, Ordering::Relaxed) + n as u64 > max_bytes {
                        tail.0.flooded.store(true, Ordering::Relaxed);
                        let why = format!("wrote more than {max_bytes} bytes to its log in one call");
                        ctx.log(LogLevel::Error, &format!("module process {why}: killed"));
                        tail.push(why);
                        #[cfg(unix)]
                        if let Some(pid) =
                            pid.and_then(|p| i32::try_from(p).ok()).and_then(rustix::process::Pid::from_raw)
                        {
                            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                        }
                        continue;
                    }
                    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        line.pop();
                    }
                    let text = String::from_utf8_lossy(&line).into_owned();
                    tracing::trace!(target: "tessera_process::stderr", "{text}");
                    ctx.log(LogLevel::Info, &text);
                    tail.push(text);
                }
            }
        }
    })
}

/// Why an exchange with the child failed, before it becomes a [`RuntimeError`].
enum Failure {
    /// The module reported an error (or its output was refused after being read in
    /// full): the child is still usable.
    Module(String),
    /// The output was over the limit (read and dropped, or refused unread when `true`).
    OutputLimit(u64, bool),
    /// The child broke the protocol.
    Protocol(String),
    /// The child's stdout ended or its stdin broke: it exited, or is about to.
    Gone,
}

impl From<FrameError> for Failure {
    fn from(e: FrameError) -> Self {
        if e.is_disconnect() { Failure::Gone } else { Failure::Protocol(e.to_string()) }
    }
}

/// A started child process speaking the Tessera protocol: one replica of an actor.
///
/// Calls run one at a time; the child's state lives across calls. The child is killed
/// when the instance is dropped; an orderly drop first sends `shutdown` and gives it
/// [`EXIT_GRACE`] to exit (when a Tokio runtime is available).
pub struct ProcessInstance {
    /// What the child leaves to end: its process group, its cgroup, its scratch folder.
    pub(crate) tree: Option<Tree>,
    pub(crate) label: String,
    pub(crate) child: Mutex<Option<Child>>,
    pub(crate) stdin: Option<ChildStdin>,
    pub(crate) stdout: BufReader<ChildStdout>,
    pub(crate) pid: Option<u32>,
    pub(crate) functions: Vec<String>,
    pub(crate) hooks: Vec<String>,
    pub(crate) ctx: Arc<dyn TaskContext>,
    pub(crate) limits: ProcessLimits,
    pub(crate) tail: StderrTail,
    pub(crate) stderr_task: Option<JoinHandle<()>>,
    /// Why the instance cannot take more calls, once it cannot.
    pub(crate) broken: Option<String>,
    /// True while a call runs: still true at the next call if a call's future was dropped
    /// half-way, leaving the stream out of step.
    pub(crate) in_call: bool,
    pub(crate) next_id: u64,
}

impl std::fmt::Debug for ProcessInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessInstance")
            .field("module", &self.label)
            .field("pid", &self.pid)
            .field("functions", &self.functions)
            .field("hooks", &self.hooks)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl ProcessInstance {
    /// The child's process id (None if the OS did not give one).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The functions the child exposes (from its `hello`).
    pub fn functions(&self) -> &[String] {
        &self.functions
    }

    /// The state hooks the child implements (`save_state`, `restore_state`).
    pub fn hooks(&self) -> &[String] {
        &self.hooks
    }

    /// The child's exit status, if it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Reads and checks the child's `hello`, within `start_timeout`.
    pub(crate) async fn handshake(&mut self) -> Result<(), RuntimeError> {
        let limit = self.limits.start_timeout;
        let max = self.limits.max_message_bytes;
        let hello = match tokio::time::timeout(limit, frame::read_frame(&mut self.stdout, max)).await {
            Err(_) => {
                self.kill("no hello in time");
                return Err(RuntimeError::Load(format!(
                    "{}: the process sent no hello within {} ms{}",
                    self.label,
                    limit.as_millis(),
                    self.tail.describe()
                )));
            }
            Ok(Err(e)) if e.is_disconnect() => {
                let why = self.exit_report().await;
                return Err(RuntimeError::Load(format!("{}: {why}", self.label)));
            }
            Ok(Err(e)) => {
                self.kill("protocol error in hello");
                return Err(RuntimeError::Load(format!("{}: protocol: {e}{}", self.label, self.tail.describe())));
            }
            Ok(Ok(frame)) => frame,
        };
        match check_hello(&hello.header) {
            Ok((functions, hooks)) => {
                self.functions = functions;
                self.hooks = hooks;
                tracing::debug!(module = %self.label, pid = ?self.pid, functions = ?self.functions, hooks = ?self.hooks, "process started");
                Ok(())
            }
            Err(why) => {
                self.kill("bad hello");
                Err(RuntimeError::Load(format!("{}: protocol: {why}", self.label)))
            }
        }
    }

    /// Runs one call with the given function name.
    pub(crate) async fn call_function(
        &mut self,
        function: &str,
        invocation: Invocation,
    ) -> Result<Outputs, RuntimeError> {
        if self.in_call {
            self.mark_broken("a previous call was interrupted half-way".into());
        }
        if let Some(why) = &self.broken {
            return Err(RuntimeError::Trap(format!("{}: the process cannot take calls: {why}", self.label)));
        }
        if let Some(status) = self.exit_status() {
            self.broken = Some(format!("process exited with {status}"));
            let why = self.exit_report().await;
            return Err(RuntimeError::Gone(format!("{}: {why}", self.label)));
        }
        let limit = match invocation.timeout {
            Some(t) => t.min(self.limits.max_time),
            None => self.limits.max_time,
        };
        let id = self.next_id;
        self.next_id += 1;
        self.in_call = true;
        self.tail.new_call();
        let result = tokio::time::timeout(limit, self.exchange(id, function, invocation)).await;
        self.in_call = false;
        match result {
            Err(_) => {
                let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
                self.kill(&format!("killed after the time limit of {limit_ms} ms"));
                Err(RuntimeError::TimeLimit { limit_ms })
            }
            Ok(Ok(outputs)) => Ok(outputs),
            Ok(Err(Failure::Module(msg))) => Err(RuntimeError::Module(msg)),
            Ok(Err(Failure::OutputLimit(limit_bytes, unread))) => {
                if unread {
                    self.kill("output refused unread");
                }
                Err(RuntimeError::OutputLimit { limit_bytes })
            }
            Ok(Err(Failure::Protocol(why))) => {
                self.kill(&format!("protocol: {why}"));
                Err(RuntimeError::Trap(format!("{}: protocol: {why}{}", self.label, self.tail.describe())))
            }
            Ok(Err(Failure::Gone)) => {
                // The status as the child ended by itself, before `exit_report` kills a child
                // that closed its output but lingers (that kill is not one from outside).
                let ended = self.wait_exit().await;
                let why = self.exit_report().await;
                let killed = ended.is_some_and(|s| killed_from_outside(&s));
                self.mark_broken(why.clone());
                if killed {
                    // SIGKILL comes from outside (kill -9, the OOM killer), not from the
                    // module: the caller may give the call to a new instance.
                    Err(RuntimeError::Gone(format!("{}: {why}", self.label)))
                } else {
                    Err(RuntimeError::Trap(format!("{}: {why}", self.label)))
                }
            }
        }
    }

    /// Sends the call, answers context requests, and reads the answer.
    async fn exchange(&mut self, id: u64, function: &str, invocation: Invocation) -> Result<Outputs, Failure> {
        let config = invocation.config;
        let args = config.get("args").cloned().unwrap_or_else(|| json!([]));
        let kwargs = config.get("kwargs").cloned().unwrap_or_else(|| json!({}));
        if !args.is_array() {
            return Err(Failure::Module("config.args must be a list".into()));
        }
        if !kwargs.is_object() {
            return Err(Failure::Module("config.kwargs must be a mapping".into()));
        }
        let blobs: Vec<(String, BlobKind, Bytes)> =
            invocation.inputs.into_iter().map(|(name, bytes)| (name, BlobKind::sniff(&bytes), bytes)).collect();
        let header = json!({
            "type": "call",
            "id": id,
            "function": function,
            "args": args,
            "kwargs": kwargs,
            "config": config,
        });
        self.send(&header, &blobs).await?;
        // Sent: a large input is not held while the outputs come back.
        drop(blobs);
        loop {
            let header = frame::read_header(&mut self.stdout, self.limits.max_message_bytes).await?;
            match header.ty.as_str() {
                "result" | "error" if header.id() != Some(id) => {
                    return Err(Failure::Protocol(format!(
                        "a {} for call {} during call {id}",
                        header.ty,
                        header.get("id").unwrap_or(&Value::Null)
                    )));
                }
                "result" => return self.read_result(header).await,
                "error" => {
                    frame::skip_blobs(&mut self.stdout, &header).await?;
                    return Err(Failure::Module(self.describe_error(&header)));
                }
                "ctx" => {
                    let total = header.blobs_len();
                    if total > self.limits.max_message_bytes {
                        return Err(Failure::Protocol(format!(
                            "a context request with {total} bytes of blobs exceeds the limit of {} bytes",
                            self.limits.max_message_bytes
                        )));
                    }
                    let blobs = frame::read_blobs(&mut self.stdout, &header).await?;
                    self.context_request(&header, blobs).await?;
                }
                other => return Err(Failure::Protocol(format!("unexpected message {other:?} during a call"))),
            }
        }
    }

    async fn read_result(&mut self, header: Header) -> Result<Outputs, Failure> {
        let total = header.blobs_len();
        let max_out = self.limits.max_output_bytes;
        if total > max_out {
            if total <= self.limits.max_message_bytes {
                frame::skip_blobs(&mut self.stdout, &header).await?;
                return Err(Failure::OutputLimit(max_out, false));
            }
            return Err(Failure::OutputLimit(max_out, true));
        }
        let blobs = frame::read_blobs(&mut self.stdout, &header).await?;
        Ok(header.blobs.into_iter().zip(blobs).map(|(spec, bytes)| (spec.name, bytes)).collect())
    }

    /// The text of a `RuntimeError::Module` for an `error` message.
    fn describe_error(&self, header: &Header) -> String {
        let kind = header.str("kind").unwrap_or("exception");
        let message = header.str("message").unwrap_or("(no message)");
        let traceback = header.str("traceback").unwrap_or("");
        if !traceback.is_empty() {
            self.ctx.log(LogLevel::Warn, &format!("{kind}: {message}\n{traceback}"));
        }
        // The innermost place named by the traceback (`File "...", line N, in f`).
        let place = traceback.lines().rev().map(str::trim).find(|l| l.starts_with("File "));
        match place {
            Some(place) if kind == "exception" => format!("{message} ({place})"),
            _ => message.to_owned(),
        }
    }

    async fn send(&mut self, header: &Value, blobs: &[(String, BlobKind, Bytes)]) -> Result<(), Failure> {
        let stdin = self.stdin.as_mut().ok_or(Failure::Gone)?;
        frame::write_frame(stdin, header, blobs).await.map_err(|e| match e {
            FrameError::Io(_) => Failure::Gone,
            other => Failure::Protocol(other.to_string()),
        })
    }

    /// Answers one `ctx` request from the task context.
    async fn context_request(&mut self, header: &Header, blobs: Vec<Bytes>) -> Result<(), Failure> {
        let op = header.str("op").unwrap_or("");
        if op == "log" {
            let level = match header.str("level").unwrap_or("info") {
                "trace" => LogLevel::Trace,
                "debug" => LogLevel::Debug,
                "warn" | "warning" => LogLevel::Warn,
                "error" => LogLevel::Error,
                _ => LogLevel::Info,
            };
            self.ctx.log(level, header.str("message").unwrap_or(""));
            return Ok(());
        }
        let Some(req) = header.id() else {
            return Err(Failure::Protocol("a ctx request without an id".into()));
        };
        let blob = |name: &str| header.blobs.iter().position(|b| b.name == name).map(|i| blobs[i].clone());
        let reply = self.context_op(op, header, blob).await;
        let (head, out) = match reply {
            Ok((value, out)) => (json!({"type": "ctx_reply", "id": req, "ok": true, "value": value}), out),
            Err(error) => (json!({"type": "ctx_reply", "id": req, "ok": false, "error": error}), Vec::new()),
        };
        self.send(&head, &out).await
    }

    async fn context_op(
        &self,
        op: &str,
        header: &Header,
        blob: impl Fn(&str) -> Option<Bytes>,
    ) -> Result<(Value, Vec<(String, BlobKind, Bytes)>), String> {
        let ctx = &self.ctx;
        let field = |name: &str| header.str(name).ok_or_else(|| format!("{op}: \"{name}\" is missing"));
        let number =
            |name: &str| header.get(name).and_then(Value::as_u64).ok_or_else(|| format!("{op}: \"{name}\" is missing"));
        let bytes_blob = |kind: BlobKind, b: Bytes| vec![("value".to_string(), kind, b)];
        match op {
            "datasets" => Ok((json!(ctx.datasets()), Vec::new())),
            "dataset_size" => {
                let size = ctx.dataset_size(field("name")?).await.map_err(|e| e.to_string())?;
                Ok((json!(size), Vec::new()))
            }
            "dataset_read" => {
                let name = field("name")?;
                let offset = number("offset")?;
                let len = number("len")?.min(MAX_DATASET_READ).min(self.limits.max_message_bytes);
                let len = u32::try_from(len).unwrap_or(u32::MAX);
                let data = ctx.dataset_read(name, offset, len).await.map_err(|e| e.to_string())?;
                Ok((json!(data.len()), vec![("data".to_string(), BlobKind::Bytes, data)]))
            }
            "resources" => Ok((serde_json::to_value(ctx.resources()).map_err(|e| e.to_string())?, Vec::new())),
            "globals_get" => match ctx.globals_get(field("key")?).await.map_err(|e| e.to_string())? {
                Some(v) => Ok((Value::Null, bytes_blob(BlobKind::Bytes, v))),
                None => Ok((Value::Null, Vec::new())),
            },
            "globals_set" => {
                let value = blob("value").ok_or("globals_set: blob \"value\" is missing")?;
                ctx.globals_set(field("key")?, value).await.map_err(|e| e.to_string())?;
                Ok((Value::Null, Vec::new()))
            }
            "results_add" => {
                let value = blob("value").ok_or("results_add: blob \"value\" is missing")?;
                ctx.results_add(field("key")?, value).await.map_err(|e| e.to_string())?;
                Ok((Value::Null, Vec::new()))
            }
            "results_select" => {
                let all = ctx.results_select(field("key")?).await.map_err(|e| e.to_string())?;
                let nodes: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
                let value = json!(nodes);
                let out = all.into_iter().map(|(n, v)| (n, BlobKind::Bytes, v)).collect();
                Ok((value, out))
            }
            other => Err(format!("unknown context operation {other:?}")),
        }
    }

    /// Kills the child and marks the instance unusable.
    pub(crate) fn kill(&mut self, why: &str) {
        tracing::info!(module = %self.label, pid = ?self.pid, "killing the process: {why}");
        self.mark_broken(why.to_owned());
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = guard.as_mut() {
            let _ = child.start_kill();
        }
        if let Some(tree) = &self.tree {
            tree.kill();
        }
    }

    fn mark_broken(&mut self, why: String) {
        if self.broken.is_none() {
            self.broken = Some(why);
        }
    }

    /// The child's exit status, waiting up to [`EXIT_GRACE`] for it to end by itself.
    async fn wait_exit(&self) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + EXIT_GRACE;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (a little) for the child to exit and its stderr to drain, then says how it
    /// ended: `process exited with <status>; last stderr lines: ...`. Kills a child that
    /// closed its stdout but does not exit.
    pub(crate) async fn exit_report(&mut self) -> String {
        let status = self.wait_exit().await;
        if status.is_none() {
            self.kill("closed its output without exiting");
        }
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        let tail = self.tail.describe();
        let oom = self.tree.as_ref().and_then(|t| t.cgroup.as_ref()).is_some_and(sandbox::Cgroup::oom_killed);
        let flooded = self.tail.0.flooded.load(std::sync::atomic::Ordering::Relaxed);
        let why = match status {
            Some(status) if flooded => format!(
                "process wrote more than {} bytes to its log in one call and was killed ({status}){tail}",
                self.limits.max_log_bytes
            ),
            Some(status) if oom => format!("process exceeded its memory limit and was killed ({status}){tail}"),
            Some(status) => format!("process exited with {status}{tail}"),
            None => format!("protocol: the process closed its output without exiting{tail}"),
        };
        self.mark_broken(why.clone());
        why
    }

    /// Sends `shutdown`, waits up to [`EXIT_GRACE`] for the child to exit, then kills it.
    pub async fn shutdown(mut self) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        let stdin = self.stdin.take();
        if let Some(child) = child {
            let orderly = self.broken.is_none() && !self.in_call;
            close_child(child, stdin, orderly, self.tree.take()).await;
        }
    }
}

/// What a child leaves to end, ended when dropped: every process in its process group
/// and its cgroup (what it started, however it detached), then the cgroup and the scratch
/// folder themselves.
pub(crate) struct Tree {
    /// The child's pid, recorded when it started as the leader of its own process group
    /// (tokio forgets it once the child is reaped; the group outlives its leader while
    /// anything it started runs, and Linux gives no new process that id meanwhile). Used
    /// only where there is no cgroup: once the group is empty its id can be reused.
    pub(crate) pid: Option<u32>,
    /// Its cgroup, where the machine has one.
    pub(crate) cgroup: Option<sandbox::Cgroup>,
    /// Its HOME and TMPDIR.
    pub(crate) _scratch: Option<tempfile::TempDir>,
}

impl Tree {
    /// Kills every process of the tree, the child included: everything in its cgroup
    /// (which nothing it starts can leave), else its process group.
    pub(crate) fn kill(&self) {
        if let Some(group) = &self.cgroup {
            group.kill();
            return;
        }
        #[cfg(unix)]
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()).and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for Tree {
    /// Kills the tree; the cgroup removes itself when dropped, then the scratch folder
    /// goes.
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ends a child: `shutdown` and a grace period when `orderly`, then a kill; then whatever
/// it left running (its [`Tree`], also when this is dropped unfinished, as by a runtime
/// shutting down).
async fn close_child(mut child: Child, stdin: Option<ChildStdin>, orderly: bool, tree: Option<Tree>) {
    let mut ended = false;
    if orderly && let Some(mut stdin) = stdin {
        let header = json!({"type": "shutdown"});
        let bye = frame::write_frame(&mut stdin, &header, &[]);
        if tokio::time::timeout(EXIT_GRACE, bye).await.is_ok_and(|r| r.is_ok()) {
            drop(stdin);
            ended = tokio::time::timeout(EXIT_GRACE, child.wait()).await.is_ok();
        }
    }
    if let Some(tree) = &tree {
        tree.kill();
    }
    if !ended {
        let _ = child.kill().await;
    }
    drop(tree);
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut child) = child else { return };
        let orderly = self.broken.is_none() && !self.in_call;
        let stdin = self.stdin.take();
        let tree = self.tree.take();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(close_child(child, stdin, orderly, tree));
            }
            // No runtime to wait in: kill now (the child is also `kill_on_drop`).
            Err(_) => {
                drop(tree);
                let _ = child.start_kill();
            }
        }
    }
}

fn check_hello(header: &Header) -> Result<(Vec<String>, Vec<String>), String> {
    if header.ty != "hello" {
        return Err(format!("expected a hello, got a {:?} message", header.ty));
    }
    match header.get("protocol").and_then(Value::as_u64) {
        Some(PROTOCOL_VERSION) => {}
        Some(v) => return Err(format!("the process speaks protocol {v}; this node speaks {PROTOCOL_VERSION}")),
        None => return Err("the hello has no protocol version".into()),
    }
    let names = |key: &str| -> Result<Vec<String>, String> {
        match header.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| format!("hello.{key} holds a non-string")))
                .collect(),
            Some(_) => Err(format!("hello.{key} is not a list")),
        }
    };
    let functions = names("functions")?;
    let hooks = names("hooks")?;
    if let Some(h) = hooks.iter().find(|h| !matches!(h.as_str(), "save_state" | "restore_state")) {
        return Err(format!("unknown hook {h:?} in hello"));
    }
    Ok((functions, hooks))
}

#[async_trait]
impl Instance for ProcessInstance {
    async fn call(&mut self, invocation: Invocation) -> Result<Outputs, RuntimeError> {
        let function = crate::function_of(&invocation.config);
        self.call_function(&function, invocation).await
    }

    fn healthy(&self) -> bool {
        if self.broken.is_some() || self.in_call {
            return false;
        }
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// True when the process was ended by SIGKILL, which a module does not send itself.
fn killed_from_outside(status: &std::process::ExitStatus) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        status.signal() == Some(9)
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        false
    }
}
