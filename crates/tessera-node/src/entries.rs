//! Tasks whose module was named by a Component Repository entry
//! ([`TaskMessage::component`](tessera_core::wire::TaskMessage::component)): the entry's
//! `needs`, resolved through the node's own hub, join the package's.

use tessera_core::manifest::Needs;
use tessera_core::{Digest, PackageRef};

use crate::{Node, NodeError};

impl Node {
    /// The needs a module named by Component Repository entry `entry` runs under: the
    /// entry's, resolved through this node's own hub (never taken from the task), joined
    /// with the package's `own`, as placement judged them. Refuses an entry that does not
    /// name a collection entry, or that no longer holds `digest`.
    pub(crate) async fn entry_needs(&self, entry: &str, digest: &Digest, own: &Needs) -> Result<Needs, NodeError> {
        let refuse = |why: String| NodeError::Refused(format!("the task names entry {entry:?}: {why}"));
        let reference: PackageRef = entry.parse().map_err(|e| refuse(format!("{e}")))?;
        if !matches!(reference, PackageRef::Component { .. }) {
            return Err(refuse("not a Component Repository entry".into()));
        }
        let record = self.resolve(&reference).await.map_err(|e| refuse(e.to_string()))?;
        if &record.digest != digest {
            return Err(refuse(format!("it now holds {}, not the task's {digest}", record.digest)));
        }
        Ok(own.joined(&record.manifest.needs))
    }
}
