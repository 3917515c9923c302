//! Another instance's invalidation, delivered by the bus: applied here, locally only;
//! and what a loss of the bus's subscription does to the in-process tier.

use crate::bus::{Item, Message, Receive};
use crate::deps::Node;
use crate::inner::Inner;

impl Inner {
    /// Applies another instance's invalidation here, locally only.
    pub(crate) fn apply_received(&self, message: Message) {
        // its own, or a probe (a message naming nothing)
        if message.sender == self.instance_id || message.items.is_empty() {
            return;
        }
        self.sync_stats.received();
        let mut nodes = Vec::new();
        let mut named = Vec::new();
        for item in message.items {
            match item {
                Item::Removed(text) | Item::Replaced(text) => named.push(text),
                Item::Dependency(d) => nodes.push(Node::Key(d.into())),
                Item::Clear => self.clear_local(),
            }
        }
        nodes.extend(self.nodes_named(&named));
        if !nodes.is_empty() {
            self.invalidating(nodes, true, |_| ());
        }
    }
}

impl Receive for Inner {
    fn message(&self, message: Message) {
        self.apply_received(message);
    }

    fn undecodable(&self, error: &str) {
        self.sync_stats.bump(&self.sync_stats.undecodable);
        self.warn.warn(format_args!(
            "an invalidation message does not decode: {error}"
        ));
    }

    fn missed(&self) {
        self.clear_after_loss();
    }

    fn waiting(&self) {
        self.memory.bypass(false);
    }

    fn receiving(&self) {
        self.resume_after_loss();
    }

    fn stale(&self) {
        self.clear_local();
        self.sync_stats.bump(&self.sync_stats.l1_clears);
    }
}

impl Inner {
    /// Clears the in-process tier because invalidations may have been missed, and
    /// bypasses it (storing nothing) until the bus receives again.
    pub(crate) fn clear_after_loss(&self) {
        self.memory.bypass(true);
        self.clear_local();
        self.sync_stats.bump(&self.sync_stats.l1_clears);
    }

    /// Serves the in-process tier again once the bus receives; after a loss, clears it
    /// once more first (counted): whatever computations started before the loss
    /// still finish are out of date.
    pub(crate) fn resume_after_loss(&self) {
        if self.memory.missed() {
            self.clear_local();
            self.sync_stats.bump(&self.sync_stats.l1_clears);
        }
        self.memory.serve();
    }
}
