//! How many tasks a node runs at once, and what they reserve.
//!
//! Two bounds: a count of task slots (`NodeConfig::max_tasks`, the machine's cores by
//! default, as Ray's one CPU per task), which bounds how many deliveries the node takes
//! from its queue; and the resources a task's module declares in `needs` (CPU, memory,
//! GPUs), reserved against the node's capacity with the module manager's admission
//! ([`tessera_core::manager::admit`], never evicting). A task whose module does not fit
//! waits until running tasks release enough; one that cannot fit even alone runs when
//! nothing else does, rather than never.

use std::sync::{Arc, Mutex};

use tessera_core::manager::{Admission, Running, admit};
use tessera_core::manifest::Needs;
use tessera_core::wire::Resources;
use tokio::sync::Notify;

/// The reservations of a node's running tasks.
pub struct TaskSlots {
    capacity: Resources,
    state: Mutex<(Vec<Running>, u64)>,
    released: Notify,
}

/// A running task's reservation; released when dropped.
pub struct Reservation {
    slots: Arc<TaskSlots>,
    name: String,
}

impl TaskSlots {
    /// Reservations against `capacity`.
    pub fn new(capacity: Resources) -> Arc<Self> {
        Arc::new(TaskSlots { capacity, state: Mutex::new((Vec::new(), 0)), released: Notify::new() })
    }

    /// Waits until `needs` fits beside the running tasks, then reserves it for `task`.
    pub async fn reserve(self: &Arc<Self>, task: &str, needs: &Needs) -> Reservation {
        let needs = Needs { libraries: Vec::new(), ..needs.clone() };
        loop {
            let released = self.released.notified();
            {
                let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let (running, seq) = &mut *g;
                let fits = running.is_empty() || admit(&self.capacity, running, &needs, i32::MIN) == Admission::Fits;
                if fits {
                    *seq += 1;
                    let name = format!("{task}#{seq}");
                    running.push(Running { name: name.clone(), needs, priority: i32::MIN, launched: *seq });
                    return Reservation { slots: self.clone(), name };
                }
            }
            tracing::debug!(%task, "waiting for running tasks to release what its module needs");
            released.await;
        }
    }

    /// Tasks holding a reservation.
    pub fn running(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut g = self.slots.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0.retain(|r| r.name != self.name);
        drop(g);
        self.slots.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tessera_core::ByteSize;

    use super::*;

    fn capacity() -> Resources {
        Resources { cpu: 2.0, memory: ByteSize(4 << 30), gpu: 0, disk: ByteSize(0) }
    }

    #[tokio::test]
    async fn a_task_waits_until_what_it_needs_is_released() {
        let slots = TaskSlots::new(capacity());
        let one = Needs { cpu: 1.5, ..Needs::default() };
        let first = slots.reserve("a", &one).await;
        // Nothing declared: fits beside anything.
        let free = slots.reserve("b", &Needs::default()).await;
        assert_eq!(slots.running(), 2);
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.reserve("c", &one).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "1.5 + 1.5 cores do not fit in 2");
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("released").unwrap();
        assert_eq!(slots.running(), 2);
        drop((free, third));
        assert_eq!(slots.running(), 0);
    }

    #[tokio::test]
    async fn a_task_too_big_for_the_node_runs_alone() {
        let slots = TaskSlots::new(capacity());
        let huge = Needs { memory: ByteSize(64 << 30), ..Needs::default() };
        let r = tokio::time::timeout(Duration::from_secs(5), slots.reserve("big", &huge)).await.expect("runs alone");
        let small = Needs { memory: ByteSize(1 << 30), ..Needs::default() };
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.reserve("small", &small).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "nothing runs beside a task that takes more than the node");
        drop(r);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("released").unwrap();
    }
}
