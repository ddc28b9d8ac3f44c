//! Which replica owns which journeys.
//!
//! A namespace has a fixed number of partitions, chosen when its topology is first
//! declared; the broker routes each journey command to the partition of its client id
//! (a consistent-hash exchange on the `x-journeyman-client-id` header). Partitions are
//! dealt to the replicas round-robin, `partition % count == index`: a function of the two
//! numbers only, so every replica, the store tools and the docs agree without talking.

use std::fmt;
use std::str::FromStr;

/// Partitions of a namespace unless chosen otherwise: enough for 16 replicas, few enough
/// that a small broker carries their queues easily.
pub const DEFAULT_PARTITIONS: u16 = 16;
/// Upper bound on partitions: every replica declares every partition's queues.
pub const MAX_PARTITIONS: u16 = 1024;

/// One replica of the orchestrator fleet: its index and how many replicas there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replica {
    pub index: u16,
    pub count: u16,
}

impl Default for Replica {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("'{0}' is not a replica: expected <index>/<count>, e.g. 0/3 (indexes start at 0)")]
    Syntax(String),
    #[error("replica index {index} is out of range for {count} replicas (0..{count})")]
    OutOfRange { index: u16, count: u16 },
    #[error("the replica count must be at least 1")]
    NoReplicas,
    #[error(
        "{replicas} replicas but the namespace has {partitions} partition(s): replica {index} would own none. Use at most {partitions} replica(s), or a namespace declared with more partitions (journeyman topology declare --partitions N)"
    )]
    TooFewPartitions {
        index: u16,
        replicas: u16,
        partitions: u16,
    },
    #[error(
        "cannot tell this pod's replica index: the host name '{0}' does not end in -<ordinal> (a StatefulSet pod name); pass --replica <index>/<count>"
    )]
    NoOrdinal(String),
}

impl Replica {
    pub fn new(index: u16, count: u16) -> Result<Self, ReplicaError> {
        if count == 0 {
            return Err(ReplicaError::NoReplicas);
        }
        if index >= count {
            return Err(ReplicaError::OutOfRange { index, count });
        }
        Ok(Self { index, count })
    }

    /// The replica a StatefulSet pod is: its ordinal is the number after the last `-` of
    /// its name (`journeyman-orchestrator-2` is replica 2).
    pub fn from_pod_name(name: &str, count: u16) -> Result<Self, ReplicaError> {
        let ordinal = name
            .rsplit_once('-')
            .and_then(|(_, n)| n.parse::<u16>().ok())
            .ok_or_else(|| ReplicaError::NoOrdinal(name.to_string()))?;
        Self::new(ordinal, count)
    }

    /// Whether this replica owns `partition`.
    pub fn owns(self, partition: u16) -> bool {
        owner(partition, self.count) == self.index
    }

    /// The partitions this replica owns out of `total`, ascending.
    pub fn partitions(self, total: u16) -> Vec<u16> {
        (0..total).filter(|p| self.owns(*p)).collect()
    }

    /// Refuses a layout where this replica would own nothing.
    pub fn check(self, total: u16) -> Result<(), ReplicaError> {
        if self.count > total {
            return Err(ReplicaError::TooFewPartitions {
                index: self.index,
                replicas: self.count,
                partitions: total,
            });
        }
        Ok(())
    }
}

/// The replica index owning `partition` when there are `replicas` replicas.
pub fn owner(partition: u16, replicas: u16) -> u16 {
    partition % replicas.max(1)
}

impl fmt::Display for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Replica {
    type Err = ReplicaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (i, n) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| ReplicaError::Syntax(s.to_string()))?;
        let index = i
            .trim()
            .parse()
            .map_err(|_| ReplicaError::Syntax(s.to_string()))?;
        let count = n
            .trim()
            .parse()
            .map_err(|_| ReplicaError::Syntax(s.to_string()))?;
        Self::new(index, count)
    }
}

/// Formats partitions compactly for logs and metrics: `0,3,6`.
pub fn list(partitions: &[u16]) -> String {
    partitions
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_index_and_count() {
        assert_eq!(
            "2/3".parse::<Replica>().unwrap(),
            Replica { index: 2, count: 3 }
        );
        assert_eq!(
            "3/3".parse::<Replica>(),
            Err(ReplicaError::OutOfRange { index: 3, count: 3 })
        );
        assert_eq!("0/0".parse::<Replica>(), Err(ReplicaError::NoReplicas));
        assert!(matches!(
            "two".parse::<Replica>(),
            Err(ReplicaError::Syntax(_))
        ));
    }

    #[test]
    fn every_partition_has_exactly_one_owner() {
        for count in 1..=7u16 {
            let replicas: Vec<Replica> = (0..count)
                .map(|i| Replica::new(i, count).unwrap())
                .collect();
            for p in 0..16 {
                assert_eq!(replicas.iter().filter(|r| r.owns(p)).count(), 1);
            }
            let shares: Vec<usize> = replicas.iter().map(|r| r.partitions(16).len()).collect();
            assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn pod_names_give_the_ordinal() {
        assert_eq!(
            Replica::from_pod_name("journeyman-orchestrator-2", 3).unwrap(),
            Replica { index: 2, count: 3 }
        );
        assert!(matches!(
            Replica::from_pod_name("laptop", 3),
            Err(ReplicaError::NoOrdinal(_))
        ));
        assert!(Replica::new(4, 5).unwrap().check(4).is_err());
    }
}
