//! A run's standard output or error: held in memory up to a capacity per run, and emptied
//! between the runs of an instance that takes several (an actor's replica, a reused
//! instance), so what one run wrote is never read as the next one's, and a long-lived
//! instance never fills it for good.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Bytes a module wrote to one stream during its current run, at most `capacity`.
/// Clones share the buffer: the runtime keeps one, WASI the other.
#[derive(Clone, Debug)]
pub(crate) struct RunPipe {
    capacity: usize,
    buffer: Arc<Mutex<BytesMut>>,
}

impl RunPipe {
    /// An empty pipe that takes up to `capacity` bytes a run.
    pub(crate) fn new(capacity: usize) -> Self {
        RunPipe { capacity, buffer: Arc::default() }
    }

    /// What was written since the last call, leaving the pipe empty for the next run.
    pub(crate) fn take(&self) -> Bytes {
        std::mem::take(&mut *self.lock()).freeze()
    }

    /// What was written since the last [`take`](Self::take), left in place.
    pub(crate) fn contents(&self) -> Bytes {
        Bytes::copy_from_slice(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// WASI 0.2's stream: a write past the capacity traps the run (as wasmtime's own memory pipe
// does), so output is never lost silently.
#[async_trait::async_trait]
impl OutputStream for RunPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        let mut buf = self.lock();
        if bytes.len() > self.capacity.saturating_sub(buf.len()) {
            return Err(StreamError::Trap(wasmtime::format_err!(
                "the run wrote more than {} bytes to one standard stream",
                self.capacity
            )));
        }
        buf.extend_from_slice(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        let used = self.lock().len();
        if used < self.capacity { Ok(self.capacity - used) } else { Err(StreamError::Closed) }
    }
}

#[async_trait::async_trait]
impl Pollable for RunPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for RunPipe {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut buffer = self.lock();
        let n = buf.len().min(self.capacity.saturating_sub(buffer.len()));
        buffer.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for RunPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for RunPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_empties_the_pipe_and_the_capacity_is_per_run() {
        let pipe = RunPipe::new(8);
        let mut writer: Box<dyn OutputStream> = pipe.p2_stream();
        writer.write(Bytes::from_static(b"12345")).unwrap();
        assert_eq!(pipe.contents(), Bytes::from_static(b"12345"));
        assert!(writer.write(Bytes::from_static(b"6789")).is_err(), "past the capacity");
        assert_eq!(writer.check_write().unwrap(), 3);
        assert_eq!(pipe.take(), Bytes::from_static(b"12345"));
        assert!(pipe.contents().is_empty());
        // The next run has the whole capacity again.
        writer.write(Bytes::from_static(b"abcdefgh")).unwrap();
        assert!(matches!(writer.check_write(), Err(StreamError::Closed)));
        assert_eq!(pipe.take(), Bytes::from_static(b"abcdefgh"));
    }
}
