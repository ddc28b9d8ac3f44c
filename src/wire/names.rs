//! Every exchange and queue name of a namespace, and the type its queues are declared as:
//! derived from one prefix so tenants and tests never collide.

/// The kind of queue every worker declares. Orchestrator, agents and tools sharing a
/// namespace must agree (`--queue-type` / `JOURNEYMAN_QUEUE_TYPE`): a queue redeclared as
/// another type is a 406.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, always on disk, with a delivery limit and at-least-once dead-lettering:
    /// what production runs.
    #[default]
    Quorum,
    /// Durable classic queues with the dead-letter exchange but none of the quorum-only
    /// arguments (no delivery limit, at-most-once dead-lettering): for brokers without
    /// quorum queues, and for comparing in `journeyman bench`.
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!(
                "unknown queue type '{other}' (expected quorum or classic)"
            )),
        }
    }
}

/// The queues of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PartitionQueue {
    Start,
    Commands,
    /// Task replies: per partition, not per orchestrator, so in-flight tasks' replies
    /// follow their journeys when partitions move to another replica.
    Replies,
}

impl PartitionQueue {
    pub const ALL: [PartitionQueue; 3] = [
        PartitionQueue::Start,
        PartitionQueue::Commands,
        PartitionQueue::Replies,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionQueue::Start => "start",
            PartitionQueue::Commands => "commands",
            PartitionQueue::Replies => "replies",
        }
    }
}

/// Every exchange and queue name, derived from one namespace so tenants and tests never
/// collide; and the type of queue they are declared as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub namespace: String,
    pub queue_type: QueueType,
}

impl Names {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            queue_type: QueueType::default(),
        }
    }
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }
    pub fn intents(&self) -> String {
        format!("{}.intents", self.namespace)
    }
    pub fn events(&self) -> String {
        format!("{}.events", self.namespace)
    }
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.namespace)
    }
    pub fn dead_letter(&self) -> String {
        format!("{}.dead-letter", self.namespace)
    }
    pub fn intent_queue(&self, intent: &str) -> String {
        format!("{}.intent.{}", self.namespace, intent)
    }
    /// The exchange routing `journey.start` to its partition (by the client id header).
    pub fn journey_starts(&self) -> String {
        format!("{}.journeys.start", self.namespace)
    }
    /// The exchange routing every other journey command to its partition.
    pub fn journey_commands(&self) -> String {
        format!("{}.journeys", self.namespace)
    }
    /// A partition's queue of one kind. Starts have their own queue so admission can hold
    /// them back while the partition's other commands and replies flow.
    pub fn partition_queue(&self, partition: u16, kind: PartitionQueue) -> String {
        format!(
            "{}.journeys.p{partition:02}.{}",
            self.namespace,
            kind.as_str()
        )
    }
    /// Before partitions: one reply queue per orchestrator, still drained after an upgrade.
    pub fn replies(&self, orchestrator_id: &str) -> String {
        format!(
            "{}.orchestrator.{}.replies",
            self.namespace, orchestrator_id
        )
    }
}
