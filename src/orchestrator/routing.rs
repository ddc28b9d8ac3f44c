//! Which partitions this replica consumes, and the queue names that go with them.
//!
//! Resolved once per broker session (the partition count comes from the topology), then
//! read on every input: which partition a delivery came from, where a journey's task
//! replies go, whether journey commands must name their client in a header.

use std::collections::HashMap;

use crate::domain::partition::Replica;
use crate::wire::names::{Names, PartitionQueue};

#[derive(Debug, Clone)]
pub struct Routing {
    pub partitions: u16,
    pub replica: Replica,
    /// The partitions this replica owns, ascending; never empty.
    pub owned: Vec<u16>,
    by_queue: HashMap<String, u16>,
    names: Names,
}

impl Routing {
    pub fn new(names: &Names, partitions: u16, replica: Replica) -> Self {
        let mut owned = replica.partitions(partitions);
        if owned.is_empty() {
            // Refused before a session starts (`Replica::check`); a safe value meanwhile.
            owned.push(0);
        }
        let mut by_queue = HashMap::new();
        for &p in &owned {
            for kind in PartitionQueue::ALL {
                by_queue.insert(names.partition_queue(p, kind), p);
            }
        }
        Self {
            partitions,
            replica,
            owned,
            by_queue,
            names: names.clone(),
        }
    }

    /// The partition a delivery's queue belongs to, if it is one of ours.
    pub fn partition_of_queue(&self, queue: &str) -> Option<u16> {
        self.by_queue.get(queue).copied()
    }

    /// Where the task replies of a journey in `partition` go. A journey not tagged yet
    /// (older than partitions) gets this replica's first reply queue: it is consumed here,
    /// and the journey is tagged at its next command.
    pub fn reply_queue(&self, partition: Option<u16>) -> String {
        let p = partition.unwrap_or(self.owned[0]);
        self.names.partition_queue(p, PartitionQueue::Replies)
    }

    /// With one partition everything reaches this replica whatever the headers say; with
    /// more, a command without its client id header lands on an arbitrary partition.
    pub fn requires_client_header(&self) -> bool {
        self.partitions > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_its_queues_and_where_replies_go() {
        let names = Names::new("t");
        let r = Routing::new(&names, 16, Replica::new(1, 3).unwrap());
        assert_eq!(r.owned, vec![1, 4, 7, 10, 13]);
        assert_eq!(r.partition_of_queue("t.journeys.p07.commands"), Some(7));
        assert_eq!(r.partition_of_queue("t.journeys.p08.commands"), None);
        assert_eq!(r.reply_queue(Some(13)), "t.journeys.p13.replies");
        assert_eq!(r.reply_queue(None), "t.journeys.p01.replies");
        assert!(r.requires_client_header());
        assert!(!Routing::new(&names, 1, Replica::default()).requires_client_header());
    }
}
