//! Simulated agents for every intent of the default playbook: plausible outputs, a
//! configurable latency and failure rate. They serve the demo and the tests; real agents
//! replace them one intent at a time.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::agent::{Agent, TaskError};
use crate::wire::protocol::Envelope;

/// An agent that answers every intent after a random latency, failing a fraction of
/// attempts with a retryable error.
#[derive(Debug, Clone)]
pub struct SimAgent {
    pub min_latency: Duration,
    pub max_latency: Duration,
    /// Probability in [0, 1] that an attempt fails (retryably).
    pub failure_rate: f64,
    /// Probability in [0, 1] that a reply is published twice (chaos runs).
    pub duplicate_rate: f64,
}

impl Default for SimAgent {
    fn default() -> Self {
        Self {
            min_latency: Duration::from_millis(5),
            max_latency: Duration::from_millis(30),
            failure_rate: 0.0,
            duplicate_rate: 0.0,
        }
    }
}

impl Agent for SimAgent {
    fn duplicate_reply(&self) -> bool {
        self.duplicate_rate > 0.0 && rand::random::<f64>() < self.duplicate_rate
    }

    async fn handle(
        &self,
        request: &Envelope,
        input: Map<String, Value>,
    ) -> Result<Map<String, Value>, TaskError> {
        let (lo, hi) = (
            self.min_latency.as_millis() as u64,
            self.max_latency.as_millis() as u64,
        );
        let ms = if hi > lo {
            lo + rand::random_range(0..=hi - lo)
        } else {
            lo
        };
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            return Err(TaskError::retryable(
                "simulated_failure",
                format!("simulated transient failure in {}", request.intent),
            ));
        }
        let client = input
            .get("client_id")
            .and_then(Value::as_str)
            .unwrap_or("client")
            .to_string();
        match simulated_output(&request.intent, &client, &Value::Object(input)) {
            Value::Object(m) => Ok(m),
            _ => Ok(Map::new()),
        }
    }
}

/// The output a simulated agent returns for an intent: the fields later tasks and
/// (later) the gates read.
pub fn simulated_output(intent: &str, client_id: &str, input: &Value) -> Value {
    match intent {
        "provision_sandbox_environment" => {
            json!({"environment_id": format!("env-{client_id}"), "status": "ready"})
        }
        "install_connectors" => {
            let connectors = input
                .get("connectors")
                .filter(|c| c.is_array())
                .cloned()
                .unwrap_or_else(|| json!(["drive", "confluence", "slack"]));
            json!({"installed_connectors": connectors, "all_syncing": true})
        }
        "provision_test_dataset" => {
            json!({"dataset_id": format!("ds-{client_id}"), "record_count": 10_000})
        }
        "run_security_scan" => {
            json!({"scan_result": {"critical": 0, "high": 0, "medium": 2}, "vulnerabilities": []})
        }
        "teardown_sandbox_environment" => json!({"status": "torn_down"}),
        "deploy_pilot" => json!({"deployment_id": format!("pilot-{client_id}"), "pilot_users": 25}),
        "monitor_search_quality" => json!({"precision": 0.91}),
        "collect_user_feedback" => json!({"satisfaction": 4.4, "responses": 22}),
        "run_performance_test" => json!({"latency_p95_ms": 310}),
        "revoke_pilot_access" => json!({"status": "revoked"}),
        "rollout_users" => {
            json!({"status": "rolled_out", "percentage": input.get("percentage").cloned().unwrap_or(Value::Null)})
        }
        "configure_monitoring" => json!({"dashboards": 3, "alerts": 12}),
        "rollback_production_deployment" => json!({"status": "rolled_back"}),
        _ => json!({"status": "done"}),
    }
}
