//! `journeyman playbook show|validate`: what a playbook asks of the people and programs
//! around it, so an integrator need not read its YAML. Per stage: the intents agents must
//! serve, the output fields they must return (those later tasks' inputs and the evidence
//! mappings read), and the evidence upstream must report with `journey.evidence` (what
//! the gates read and no task produces).

use std::collections::{BTreeMap, BTreeSet};

use clap::Subcommand;
use serde_json::{Value, json};

use crate::domain::gate::{Check, Criterion};
use crate::domain::playbook::{Playbook, STAGE_NAMES, StageWork, TaskSpec};

#[derive(Debug, Subcommand)]
pub enum PlaybookCmd {
    /// Intents, outputs agents must return, gates and the evidence upstream must report.
    Show {
        #[command(flatten)]
        playbook: crate::ops::cli::PlaybookArg,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a playbook (loads and validates it) and print its name and content hash.
    Validate {
        #[command(flatten)]
        playbook: crate::ops::cli::PlaybookArg,
    },
}

/// `tasks.<id>.output.<path>` references in a task input template.
fn output_refs(v: &Value, out: &mut BTreeSet<(String, String)>) {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find("{{") {
                let after = &rest[i + 2..];
                let Some(j) = after.find("}}") else { break };
                let path = after[..j].trim();
                if let Some(p) = path.strip_prefix("tasks.")
                    && let Some((task, field)) = p.split_once(".output.")
                {
                    out.insert((task.to_string(), field.to_string()));
                }
                rest = &after[j + 2..];
            }
        }
        Value::Array(a) => a.iter().for_each(|x| output_refs(x, out)),
        Value::Object(m) => m.values().for_each(|x| output_refs(x, out)),
        _ => {}
    }
}

/// The evidence names a criterion reads, with their kind.
fn reads(c: &Criterion) -> (String, &'static str) {
    match &c.check {
        Check::Metric { metric, .. } => (metric.clone(), "metric"),
        Check::Flag { flag, .. } => (flag.clone(), "flag"),
        Check::Events { event, .. } => (event.clone(), "event"),
        Check::AllFlags { prefix } => (format!("{prefix}*"), "flags"),
        Check::MinTimeInStage { .. } => (String::new(), "time"),
    }
}

fn criterion_text(c: &Criterion) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.as_str() != "name")
                .map(|(k, v)| {
                    format!(
                        "{k}: {}",
                        v.as_str().map(str::to_string).unwrap_or(v.to_string())
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn tasks_json(tasks: &[TaskSpec]) -> (Vec<Value>, BTreeMap<String, BTreeSet<String>>) {
    let mut needed: BTreeSet<(String, String)> = BTreeSet::new();
    for t in tasks {
        output_refs(&t.input, &mut needed);
    }
    let mut outputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (task, field) in needed {
        outputs.entry(task).or_default().insert(field);
    }
    for t in tasks {
        for path in t.evidence.values() {
            outputs
                .entry(t.task_id.clone())
                .or_default()
                .insert(path.clone());
        }
    }
    let list = tasks
        .iter()
        .map(|t| {
            json!({
                "task_id": t.task_id,
                "intent": t.intent,
                "agent_id": t.agent_id,
                "depends_on": t.depends_on,
                "must_return": outputs.get(&t.task_id).cloned().unwrap_or_default(),
                "evidence": t.evidence,
            })
        })
        .collect();
    (list, outputs)
}

/// The playbook as an integrator needs it: per stage, its tasks, rollback tasks, gates and
/// the evidence upstream must report.
pub fn describe(p: &Playbook) -> Value {
    let mut stages = Vec::new();
    for name in STAGE_NAMES {
        let spec: StageWork = p.stage(name).cloned().unwrap_or_default();
        let (tasks, _) = tasks_json(&spec.tasks);
        let (rollback, _) = tasks_json(&spec.rollback.tasks);
        let produced: BTreeSet<&String> =
            spec.tasks.iter().flat_map(|t| t.evidence.keys()).collect();
        let mut upstream: BTreeMap<String, &'static str> = BTreeMap::new();
        for c in spec.exit_criteria.iter().chain(&spec.rollback_triggers) {
            let (what, kind) = reads(c);
            let by_task = match &c.check {
                Check::AllFlags { prefix } => {
                    produced.iter().any(|e| e.starts_with(prefix.as_str()))
                }
                _ => produced.contains(&what),
            };
            if !what.is_empty() && !by_task {
                upstream.insert(what, kind);
            }
        }
        let crit = |list: &[Criterion]| -> Vec<Value> {
            list.iter()
                .map(|c| json!({"name": c.name, "check": criterion_text(c)}))
                .collect()
        };
        stages.push(json!({
            "stage": name,
            "tasks": tasks,
            "rollback_tasks": rollback,
            "exit_criteria": crit(&spec.exit_criteria),
            "rollback_triggers": crit(&spec.rollback_triggers),
            "upstream_evidence": upstream.into_iter().map(|(n, k)| json!({"name": n, "kind": k})).collect::<Vec<_>>(),
        }));
    }
    json!({
        "name": p.name,
        "hash": p.content_hash(),
        "intents": p.intents(),
        "stages": stages,
    })
}

/// For people: one block per stage.
pub fn print(d: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    println!("playbook {} ({})", s(&d["name"]), s(&d["hash"]));
    for st in d["stages"].as_array().into_iter().flatten() {
        println!("\n{}", s(&st["stage"]));
        for (label, key) in [("tasks", "tasks"), ("rollback tasks", "rollback_tasks")] {
            let tasks = st[key].as_array().cloned().unwrap_or_default();
            if tasks.is_empty() {
                continue;
            }
            println!("  {label}:");
            for t in tasks {
                let deps: Vec<String> = t["depends_on"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                let ret: Vec<String> = t["must_return"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                print!("    {:<24} intent {}", s(&t["task_id"]), s(&t["intent"]));
                if !deps.is_empty() {
                    print!(", after {}", deps.join(", "));
                }
                if !ret.is_empty() {
                    print!("; the agent must return {}", ret.join(", "));
                }
                println!();
            }
        }
        for (label, key) in [
            ("exit criteria", "exit_criteria"),
            ("rollback triggers", "rollback_triggers"),
        ] {
            let list = st[key].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                continue;
            }
            println!("  {label}:");
            for c in list {
                println!("    {:<24} {}", s(&c["name"]), s(&c["check"]));
            }
        }
        let up = st["upstream_evidence"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !up.is_empty() {
            let names: Vec<String> = up
                .iter()
                .map(|e| format!("{} ({})", s(&e["name"]), s(&e["kind"])))
                .collect();
            println!(
                "  upstream must report (journey.evidence): {}",
                names.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_playbook_says_what_agents_return_and_upstream_reports() {
        let d = describe(&Playbook::default_playbook());
        let sandbox = &d["stages"][0];
        assert_eq!(sandbox["stage"], "sandbox");
        let infra = &sandbox["tasks"][0];
        assert_eq!(infra["intent"], "provision_sandbox_environment");
        assert_eq!(infra["must_return"], json!(["environment_id"]));
        let upstream: Vec<&str> = sandbox["upstream_evidence"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert!(upstream.contains(&"search.precision") && upstream.contains(&"demo.approved"));
        assert!(
            !upstream.contains(&"security.critical_count"),
            "a task produces it"
        );
        assert!(
            !upstream.iter().any(|u| u.starts_with("connector.")),
            "a task produces it"
        );
    }
}
