//! Signed tasks and replies: what crosses the bus between coordinators and nodes.
//!
//! A task is signed by its sender for the node it is addressed to (method `TASK`, path the
//! node's task queue); a reply by the node for the task's sender (method `REPLY`, path the
//! reply queue). The signature covers the message's JSON without its `auth` field (and,
//! for a task, without its `trace`: logging context, which nodes of an earlier version do
//! not know, so a signed task reads the same to them).

use tessera_core::Digest;
use tessera_core::wire::{self, TaskMessage, TaskReply};

use crate::envelope::{Envelope, Verifier, VerifyError};
use crate::keys::{KeyPair, PublicKey};

/// The digest a task's signature covers: everything but `auth` and `trace`.
pub fn task_digest(task: &TaskMessage) -> Digest {
    let mut t = task.clone();
    t.auth = None;
    t.trace = None;
    Digest::of(&wire::encode(&t))
}

/// The digest a reply's signature covers.
pub fn reply_digest(reply: &TaskReply) -> Digest {
    let mut r = reply.clone();
    r.auth = None;
    Digest::of(&wire::encode(&r))
}

/// Signs a task for the node whose key is `node` and whose queue is `queue`.
pub fn sign_task(task: &mut TaskMessage, key: &KeyPair, node: &PublicKey, queue: &str, now_ms: u64) {
    task.auth = None;
    let env = Envelope::sign_digest(key, node, "TASK", queue, task_digest(task), now_ms);
    task.auth = Some(env.to_header());
}

/// Checks a task's signature: returns its signer (`None` when unsigned).
pub fn verify_task(
    task: &TaskMessage,
    verifier: &Verifier,
    queue: &str,
    now_ms: u64,
) -> Result<Option<PublicKey>, VerifyError> {
    let Some(auth) = &task.auth else { return Ok(None) };
    let env = Envelope::parse(auth)?;
    verifier.verify_envelope(&env, "TASK", queue, &task_digest(task), now_ms).map(Some)
}

/// Signs a reply for the task's sender.
pub fn sign_reply(reply: &mut TaskReply, key: &KeyPair, to: &PublicKey, queue: &str, now_ms: u64) {
    reply.auth = None;
    let env = Envelope::sign_digest(key, to, "REPLY", queue, reply_digest(reply), now_ms);
    reply.auth = Some(env.to_header());
}

/// Checks a reply's signature: returns its signer (`None` when unsigned).
pub fn verify_reply(
    reply: &TaskReply,
    verifier: &Verifier,
    queue: &str,
    now_ms: u64,
) -> Result<Option<PublicKey>, VerifyError> {
    let Some(auth) = &reply.auth else { return Ok(None) };
    let env = Envelope::parse(auth)?;
    verifier.verify_envelope(&env, "REPLY", queue, &reply_digest(reply), now_ms).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyType;
    use tessera_core::wire::{SCHEMA_VERSION, TaskOutcome};

    fn task() -> TaskMessage {
        TaskMessage {
            schema: SCHEMA_VERSION,
            task_id: "s.r1.n".into(),
            session: "s".into(),
            round: 1,
            module: Digest::of(b"m"),
            config: serde_json::json!({"lr": 0.5, "seed": 7}),
            inputs: vec![],
            reply_to: "q.replies".into(),
            dispatch: "d".into(),
            world: None,
            auth: None,
            inline_outputs: 0,
            fresh: false,
            trace: None,
            component: None,
        }
    }

    #[test]
    fn tasks_survive_the_wire_and_refuse_alteration() {
        let coord = KeyPair::generate(KeyType::Ed25519);
        let node = KeyPair::generate(KeyType::Ed25519);
        let mut t = task();
        sign_task(&mut t, &coord, node.public(), "node.q", 1000);
        // Through JSON and back, as on the bus.
        let t: TaskMessage = wire::decode(&wire::encode(&t)).unwrap();
        let v = Verifier::new(node.public().clone()).with_window_ms(3_600_000).without_replay_check();
        assert_eq!(verify_task(&t, &v, "node.q", 2000).unwrap(), Some(coord.public().clone()));
        assert_eq!(verify_task(&t, &v, "node.q", 2000).unwrap(), Some(coord.public().clone()), "redelivery passes");
        let mut altered = t.clone();
        altered.config["lr"] = serde_json::json!(5.0);
        assert_eq!(verify_task(&altered, &v, "node.q", 2000), Err(VerifyError::BodyMismatch));
        assert!(verify_task(&t, &v, "other.q", 2000).is_err(), "bound to the queue");
        let other = Verifier::new(coord.public().clone()).without_replay_check();
        assert!(matches!(verify_task(&t, &other, "node.q", 2000), Err(VerifyError::WrongAudience { .. })));
        assert_eq!(verify_task(&task(), &v, "node.q", 2000).unwrap(), None);
        // The trace is logging context outside the signature: a node that drops the field
        // (an earlier version) or a relay that rewrites it verifies the same task.
        let mut traced = task();
        traced.trace = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        sign_task(&mut traced, &coord, node.public(), "node.q", 1000);
        let mut untraced = traced.clone();
        untraced.trace = None;
        let v = Verifier::new(node.public().clone()).with_window_ms(3_600_000).without_replay_check();
        assert_eq!(verify_task(&untraced, &v, "node.q", 2000).unwrap(), Some(coord.public().clone()));
    }

    #[test]
    fn replies_too() {
        let coord = KeyPair::generate(KeyType::Ed25519);
        let node = KeyPair::generate(KeyType::Ed25519);
        let mut r = TaskReply {
            schema: SCHEMA_VERSION,
            task_id: "t".into(),
            session: "s".into(),
            round: 1,
            node: "n".into(),
            outcome: TaskOutcome::Failed { error: "x".into() },
            auth: None,
        };
        sign_reply(&mut r, &node, coord.public(), "q.replies", 1000);
        let v = Verifier::new(coord.public().clone()).without_replay_check();
        assert_eq!(verify_reply(&r, &v, "q.replies", 1500).unwrap(), Some(node.public().clone()));
        r.node = "someone-else".into();
        assert!(verify_reply(&r, &v, "q.replies", 1500).is_err());
    }
}
