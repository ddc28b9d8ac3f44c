//! Playbooks: the declarative description of what each journey stage does. A [`Playbook`]
//! maps the stages "sandbox", "pilot" and "production" to a [`StageWork`]: the unit of work
//! (a DAG of [`TaskSpec`]s, each an intent served by an agent) and the [`RollbackWork`]
//! that undoes it, plus the stage's exit criteria and rollback triggers ([`Criterion`]s,
//! judged by [`crate::domain::gate`]) and each task's mapping of its output to evidence. This module
//! owns parsing, validation, the content hash that versions a playbook, the input templates
//! of tasks and the pure DAG queries a scheduler needs.
//!
//! It must not touch I/O, the clock, journeys' state or the broker: it says what the work
//! is, never whether it ran. The caller embeds, reads or stores playbook text and passes
//! recorded outputs in through [`InputContext`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::domain::backoff::BackoffPolicy;
use crate::domain::evidence;
use crate::domain::gate::{self, Criterion};

/// The stage keys a playbook may use, in journey order. Kept as strings here so this module
/// does not depend on the journey state machine; the journey module maps its stages to these.
pub const STAGE_NAMES: [&str; 3] = ["sandbox", "pilot", "production"];

/// The playbook shipped with the binary, so a fresh install can run journeys without
/// configuration. `default_playbook_loads_and_validates` proves it parses.
pub const DEFAULT_PLAYBOOK_YAML: &str = include_str!("../../playbooks/default.yaml");

/// A validated set of stage definitions. Construct it with [`Playbook::from_yaml`] (or call
/// [`Playbook::validate`] after deserialising a stored copy): the DAG helpers assume the
/// invariants validation establishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Playbook {
    /// Human-chosen identifier, shown next to the content hash so people can tell versions
    /// of "default" apart.
    pub name: String,
    /// Free text for operators; not used by the engine.
    #[serde(default)]
    pub description: String,
    /// Work per stage key (see [`STAGE_NAMES`]). A stage that is absent has no work; whether
    /// that is acceptable is the orchestrator's decision.
    pub stages: BTreeMap<String, StageWork>,
}

/// What one stage runs: the unit of work (DES-002 §3), a DAG of tasks, plus the rollback
/// work that undoes it. Declaration order is kept and breaks ties, so every DAG query is
/// deterministic; [`RollbackWork`] offers the same queries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageWork {
    /// The tasks that carry a journey through this stage, in declaration order.
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
    /// The tasks that undo this stage; empty when the playbook gives none. Absent and empty
    /// serialise alike, so they hash alike.
    #[serde(default, skip_serializing_if = "RollbackWork::is_empty")]
    pub rollback: RollbackWork,
    /// What must hold before a journey may leave this stage (DES-002 §1 exit criteria),
    /// judged by [`gate::evaluate`]. Empty passes. Skipped when empty, like `rollback`, so
    /// playbooks written before gates existed keep their content hash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exit_criteria: Vec<Criterion>,
    /// Conditions that roll a journey back out of this stage (DES-002 §1, §5), judged by
    /// [`gate::triggered`] whenever evidence arrives. Skipped when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollback_triggers: Vec<Criterion>,
}

/// The unit of work that undoes a stage. A separate DAG with its own task-id namespace: its
/// templates cannot read the forward tasks' outputs, because a rollback may run after a crash
/// or failure that never produced them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackWork {
    /// The rollback tasks, in declaration order.
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
}

/// One task: an intent to send to an agent, when, with what input and how persistently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Unique within its unit of work; used in `depends_on`, in templates and in storage keys,
    /// hence the restricted alphabet `[a-z0-9_-]`.
    pub task_id: String,
    /// For people reading dashboards.
    pub name: String,
    /// Which agent is expected to serve the intent. Informative only: routing is by intent,
    /// so agents can be replaced without editing playbooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// What to ask for; doubles as a routing key, hence `[a-z0-9_.-]`.
    pub intent: String,
    /// Tasks of the same unit that must complete before this one starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// A JSON mapping whose strings may hold `{{path}}` placeholders; see [`resolve_input`].
    #[serde(default = "empty_mapping")]
    pub input: Value,
    /// Retries after the first attempt, so the task is tried at most `max_retries + 1` times.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// How long one attempt may take before it counts as failed.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Delay between attempts.
    #[serde(default)]
    pub backoff: BackoffPolicy,
    /// Evidence this task's output provides: evidence name → dotted path in the output
    /// (`security.critical_count: scan_result.critical`). A number becomes a metric, a
    /// boolean a flag; see [`evidence::extract`]. Skipped when empty, for the content hash.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub evidence: BTreeMap<String, String>,
}

fn empty_mapping() -> Value {
    Value::Object(Map::new())
}

fn default_max_retries() -> u32 {
    3
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Why a playbook was rejected. `unit` names the unit of work: the stage key, or
/// `<stage>.rollback` for rollback work.
#[derive(Debug, Error)]
pub enum PlaybookError {
    #[error("invalid playbook YAML: {0}")]
    Parse(#[from] serde_norway::Error),
    #[error("unknown stage `{stage}` (expected one of: sandbox, pilot, production)")]
    UnknownStage { stage: String },
    #[error("{unit}: duplicate task id `{task_id}`")]
    DuplicateTask { unit: String, task_id: String },
    #[error("{unit}: task `{task_id}` depends on unknown task `{dependency}`")]
    UnknownDependency {
        unit: String,
        task_id: String,
        dependency: String,
    },
    /// `cycle` starts and ends with the same task; each arrow reads "depends on".
    #[error("{unit}: cycle: {}", cycle.join(" -> "))]
    Cycle { unit: String, cycle: Vec<String> },
    #[error(
        "{unit}: task `{task_id}` input references `{path}`, but `{referenced}` is not one of its (transitive) dependencies"
    )]
    UndeclaredReference {
        unit: String,
        task_id: String,
        referenced: String,
        path: String,
    },
    #[error("{unit}: task `{task_id}`: {reason}")]
    InvalidBackoff {
        unit: String,
        task_id: String,
        reason: String,
    },
    #[error("{unit}: task `{task_id}`: timeout must be greater than zero")]
    ZeroTimeout { unit: String, task_id: String },
    #[error("{unit}: task `{task_id}` has an empty intent")]
    EmptyIntent { unit: String, task_id: String },
    #[error("{unit}: invalid task id `{task_id}` (allowed: lowercase letters, digits, `_`, `-`)")]
    InvalidTaskId { unit: String, task_id: String },
    #[error(
        "{unit}: task `{task_id}` has invalid intent `{intent}` (allowed: lowercase letters, digits, `_`, `.`, `-`)"
    )]
    InvalidIntent {
        unit: String,
        task_id: String,
        intent: String,
    },
    #[error("{unit}: task `{task_id}`: input must be a mapping, got {found}")]
    InputNotMapping {
        unit: String,
        task_id: String,
        found: &'static str,
    },
    #[error("{unit}: task `{task_id}` input: {source}")]
    InvalidInput {
        unit: String,
        task_id: String,
        source: MappingError,
    },
    #[error("{unit}: task `{task_id}` evidence `{name}`: {reason}")]
    InvalidEvidenceMapping {
        unit: String,
        task_id: String,
        name: String,
        reason: String,
    },
    /// `list` is "exit criterion" or "rollback trigger"; `position` counts from 1.
    #[error("{stage}: {list} #{position} has an empty name")]
    UnnamedCriterion {
        stage: String,
        list: &'static str,
        position: usize,
    },
    #[error("{stage}: duplicate {list} `{criterion}`")]
    DuplicateCriterion {
        stage: String,
        list: &'static str,
        criterion: String,
    },
    #[error("{stage}: {list} `{criterion}`: {reason}")]
    InvalidCriterion {
        stage: String,
        list: &'static str,
        criterion: String,
        reason: String,
    },
}

impl Playbook {
    /// Parses and validates playbook text. Validation happens here, once, so everything
    /// downstream can trust ids, dependencies and templates.
    pub fn from_yaml(text: &str) -> Result<Self, PlaybookError> {
        let playbook: Self = serde_norway::from_str(text)?;
        playbook.validate()?;
        Ok(playbook)
    }

    /// The embedded [`DEFAULT_PLAYBOOK_YAML`].
    pub fn default_playbook() -> Self {
        Self::from_yaml(DEFAULT_PLAYBOOK_YAML).expect(
            "the embedded default playbook is valid (see default_playbook_loads_and_validates)",
        )
    }

    /// Checks every invariant [`Playbook::from_yaml`] promises; public for copies that were
    /// deserialised from storage rather than parsed from YAML. Reports the first problem,
    /// scanning stages in journey order.
    pub fn validate(&self) -> Result<(), PlaybookError> {
        if let Some(stage) = self
            .stages
            .keys()
            .find(|key| !STAGE_NAMES.contains(&key.as_str()))
        {
            return Err(PlaybookError::UnknownStage {
                stage: stage.clone(),
            });
        }
        for stage in STAGE_NAMES {
            if let Some(work) = self.stages.get(stage) {
                validate_tasks(&work.tasks, stage)?;
                validate_tasks(&work.rollback.tasks, &format!("{stage}.rollback"))?;
                validate_criteria(&work.exit_criteria, stage, "exit criterion")?;
                validate_criteria(&work.rollback_triggers, stage, "rollback trigger")?;
            }
        }
        Ok(())
    }

    /// The work for a stage key such as `"pilot"`; `None` for unknown or absent stages.
    pub fn stage(&self, name: &str) -> Option<&StageWork> {
        self.stages.get(name)
    }

    /// Every intent any stage may send, rollback included: exactly what agents must serve.
    pub fn intents(&self) -> BTreeSet<String> {
        self.stages
            .values()
            .flat_map(|stage| stage.tasks.iter().chain(&stage.rollback.tasks))
            .map(|task| task.intent.clone())
            .collect()
    }

    /// Every intent a namespace running this playbook has a queue for: the journey
    /// commands the orchestrator serves, then the playbook's task intents.
    pub fn namespace_intents(&self) -> Vec<String> {
        super::command::JOURNEY_INTENTS
            .iter()
            .map(|s| s.to_string())
            .chain(self.intents())
            .collect()
    }

    /// JSON of the parsed playbook with every object's keys sorted: the form that is hashed
    /// and a convenient form to store. Sorting explicitly keeps the hash stable even if some
    /// crate turns on serde_json's `preserve_order`.
    pub fn canonical_json(&self) -> String {
        let mut value = serde_json::to_value(self)
            .expect("a playbook has only string map keys, so it always converts to JSON");
        value.sort_all_objects();
        value.to_string()
    }

    /// The longest event window any stage's criteria or triggers count over: events older
    /// than `now` minus this can be pruned from a journey's evidence. `None` when no
    /// criterion counts events.
    pub fn longest_event_window(&self) -> Option<Duration> {
        gate::longest_event_window(
            self.stages
                .values()
                .flat_map(|stage| stage.exit_criteria.iter().chain(&stage.rollback_triggers)),
        )
    }

    /// Hex SHA-256 of [`Playbook::canonical_json`]. Identifies a playbook version: edits to
    /// whitespace, comments, key order or duration spelling ("200ms" vs "0.2s") keep the
    /// hash, any change to what the engine would do changes it.
    pub fn content_hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }
}

/// The DAG queries, shared by [`StageWork`] and [`RollbackWork`].
macro_rules! dag_queries {
    ($ty:ty) => {
        impl $ty {
            /// True when there is nothing to run.
            pub fn is_empty(&self) -> bool {
                self.tasks.is_empty()
            }

            /// The task with this id.
            pub fn task(&self, id: &str) -> Option<&TaskSpec> {
                find_task(&self.tasks, id)
            }

            /// All tasks ordered so that each comes after its dependencies, ties broken by
            /// declaration order. On a validated playbook this contains every task; on an
            /// invalid one, tasks on a cycle or behind an unknown dependency are left out
            /// rather than looping or panicking.
            pub fn topological_order(&self) -> Vec<&TaskSpec> {
                topological_order(&self.tasks)
            }

            /// Tasks that may start now: not started (nor done) and every dependency done.
            /// Returned in declaration order so scheduling is reproducible.
            pub fn ready_tasks<'a>(
                &'a self,
                done: &BTreeSet<String>,
                started: &BTreeSet<String>,
            ) -> Vec<&'a TaskSpec> {
                ready_tasks(&self.tasks, done, started)
            }
        }
    };
}

dag_queries!(StageWork);
dag_queries!(RollbackWork);

fn find_task<'a>(tasks: &'a [TaskSpec], id: &str) -> Option<&'a TaskSpec> {
    tasks.iter().find(|task| task.task_id == id)
}

fn topological_order(tasks: &[TaskSpec]) -> Vec<&TaskSpec> {
    let mut placed = vec![false; tasks.len()];
    let mut placed_ids: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(tasks.len());
    // Quadratic, but units hold a handful of tasks and this keeps the tie-break simple:
    // always the earliest-declared task whose dependencies are placed.
    while let Some(index) = (0..tasks.len()).find(|&index| {
        !placed[index]
            && tasks[index]
                .depends_on
                .iter()
                .all(|dep| placed_ids.contains(dep.as_str()))
    }) {
        placed[index] = true;
        placed_ids.insert(&tasks[index].task_id);
        order.push(&tasks[index]);
    }
    order
}

fn ready_tasks<'a>(
    tasks: &'a [TaskSpec],
    done: &BTreeSet<String>,
    started: &BTreeSet<String>,
) -> Vec<&'a TaskSpec> {
    tasks
        .iter()
        .filter(|task| !started.contains(&task.task_id) && !done.contains(&task.task_id))
        .filter(|task| task.depends_on.iter().all(|dep| done.contains(dep)))
        .collect()
}

/// Checks one unit of work; `unit` names it in messages.
fn validate_tasks(tasks: &[TaskSpec], unit: &str) -> Result<(), PlaybookError> {
    let unit_name = || unit.to_owned();
    let mut seen = BTreeSet::new();
    for task in tasks {
        let task_id = || task.task_id.clone();
        if !is_valid_id(&task.task_id, b"_-") {
            return Err(PlaybookError::InvalidTaskId {
                unit: unit_name(),
                task_id: task_id(),
            });
        }
        if !seen.insert(task.task_id.as_str()) {
            return Err(PlaybookError::DuplicateTask {
                unit: unit_name(),
                task_id: task_id(),
            });
        }
        if task.intent.is_empty() {
            return Err(PlaybookError::EmptyIntent {
                unit: unit_name(),
                task_id: task_id(),
            });
        }
        if !is_valid_id(&task.intent, b"_.-") {
            return Err(PlaybookError::InvalidIntent {
                unit: unit_name(),
                task_id: task_id(),
                intent: task.intent.clone(),
            });
        }
        if let Err(reason) = task.backoff.validate() {
            return Err(PlaybookError::InvalidBackoff {
                unit: unit_name(),
                task_id: task_id(),
                reason,
            });
        }
        if task.timeout.is_zero() {
            return Err(PlaybookError::ZeroTimeout {
                unit: unit_name(),
                task_id: task_id(),
            });
        }
        if !task.input.is_object() {
            return Err(PlaybookError::InputNotMapping {
                unit: unit_name(),
                task_id: task_id(),
                found: json_type(&task.input),
            });
        }
        for (name, path) in &task.evidence {
            let reason = if !evidence::is_valid_name(name) {
                "invalid evidence name (allowed: lowercase letters, digits, `_`, `.`, `-`)"
                    .to_owned()
            } else if !evidence::is_valid_path(path) {
                format!("invalid output path `{path}` (dot-separated keys, none empty)")
            } else {
                continue;
            };
            return Err(PlaybookError::InvalidEvidenceMapping {
                unit: unit_name(),
                task_id: task_id(),
                name: name.clone(),
                reason,
            });
        }
    }

    for task in tasks {
        if let Some(dependency) = task
            .depends_on
            .iter()
            .find(|dep| !seen.contains(dep.as_str()))
        {
            return Err(PlaybookError::UnknownDependency {
                unit: unit_name(),
                task_id: task.task_id.clone(),
                dependency: dependency.clone(),
            });
        }
    }

    if let Some(cycle) = find_cycle(tasks) {
        return Err(PlaybookError::Cycle {
            unit: unit_name(),
            cycle,
        });
    }

    for task in tasks {
        let mut refs = Vec::new();
        collect_refs(&task.input, &mut refs).map_err(|source| PlaybookError::InvalidInput {
            unit: unit_name(),
            task_id: task.task_id.clone(),
            source,
        })?;
        let ancestors = ancestors(tasks, task);
        for (path, reference) in refs {
            if let PathRef::Output {
                task_id: referenced,
                ..
            } = reference
                && !ancestors.contains(referenced)
            {
                return Err(PlaybookError::UndeclaredReference {
                    unit: unit_name(),
                    task_id: task.task_id.clone(),
                    referenced: referenced.to_owned(),
                    path: path.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// Checks one stage's exit criteria or rollback triggers; `list` names which in messages.
fn validate_criteria(
    criteria: &[Criterion],
    stage: &str,
    list: &'static str,
) -> Result<(), PlaybookError> {
    let mut seen = BTreeSet::new();
    for (index, criterion) in criteria.iter().enumerate() {
        if criterion.name.trim().is_empty() {
            return Err(PlaybookError::UnnamedCriterion {
                stage: stage.to_owned(),
                list,
                position: index + 1,
            });
        }
        if !seen.insert(criterion.name.as_str()) {
            return Err(PlaybookError::DuplicateCriterion {
                stage: stage.to_owned(),
                list,
                criterion: criterion.name.clone(),
            });
        }
        if let Err(reason) = criterion.validate() {
            return Err(PlaybookError::InvalidCriterion {
                stage: stage.to_owned(),
                list,
                criterion: criterion.name.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// The first dependency cycle found by depth-first search in declaration order, as the
/// task ids along it with the first repeated at the end. Assumes dependencies exist.
fn find_cycle(tasks: &[TaskSpec]) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        OnPath,
        Finished,
    }

    fn visit<'a>(
        task: &'a TaskSpec,
        tasks: &'a [TaskSpec],
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        let id = task.task_id.as_str();
        match marks.get(id) {
            Some(Mark::Finished) => return None,
            Some(Mark::OnPath) => {
                let start = path.iter().position(|step| *step == id).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..]
                    .iter()
                    .map(|step| (*step).to_owned())
                    .collect();
                cycle.push(id.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(id, Mark::OnPath);
        path.push(id);
        for dep in task
            .depends_on
            .iter()
            .filter_map(|dep| find_task(tasks, dep))
        {
            if let Some(cycle) = visit(dep, tasks, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(id, Mark::Finished);
        None
    }

    let mut marks = BTreeMap::new();
    let mut path = Vec::new();
    tasks
        .iter()
        .find_map(|task| visit(task, tasks, &mut marks, &mut path))
}

/// Ids of everything `task` transitively depends on; terminates even on cycles.
fn ancestors<'a>(tasks: &'a [TaskSpec], task: &'a TaskSpec) -> BTreeSet<&'a str> {
    let mut found = BTreeSet::new();
    let mut pending: Vec<&str> = task.depends_on.iter().map(String::as_str).collect();
    while let Some(id) = pending.pop() {
        if found.insert(id)
            && let Some(dep) = find_task(tasks, id)
        {
            pending.extend(dep.depends_on.iter().map(String::as_str));
        }
    }
    found
}

/// `[a-z0-9]` plus the given punctuation, non-empty.
fn is_valid_id(id: &str, punctuation: &[u8]) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || punctuation.contains(&b))
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a mapping",
    }
}

/// What a template may read when a task's input is resolved.
#[derive(Debug, Clone, Copy)]
pub struct InputContext<'a> {
    /// Value of `journey.client_id`.
    pub client_id: &'a str,
    /// Value of `journey.stage`: the stage key the task runs in.
    pub stage: &'a str,
    /// The journey's start context, read by `journey.context.*`; usually a JSON object.
    pub context: &'a Value,
    /// Recorded outputs of completed tasks by task id, read by `tasks.<id>.output.*`.
    pub outputs: &'a BTreeMap<String, Value>,
}

/// Why a task's input template could not be read or resolved.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MappingError {
    #[error("unterminated placeholder in `{text}`: `{{{{` without a closing `}}}}`")]
    Unterminated { text: String },
    #[error(
        "unknown template path `{path}` (expected journey.client_id, journey.stage, journey.context.<key>... or tasks.<task_id>.output.<key>...)"
    )]
    UnknownPath { path: String },
    #[error("task `{task_id}` has no recorded output, needed for `{path}`")]
    MissingTaskOutput { task_id: String, path: String },
    #[error("the output of task `{task_id}` has no value at `{path}`")]
    MissingOutputValue { task_id: String, path: String },
}

/// Fills a task's input template in.
///
/// Any JSON value is a template; only strings change. A string that is exactly one
/// `{{path}}` becomes the value at `path` with its JSON type (an array stays an array). A
/// string with a placeholder among other text gets the value as text: strings unquoted,
/// null as nothing, anything else as compact JSON. Whitespace inside the braces is ignored;
/// mapping keys are never templates; there is no escape for a literal `{{`.
///
/// A missing `journey.context.*` value is null, because the start context is optional. A
/// missing task output is an error: validation guaranteed the task is a dependency, so the
/// output ought to be there and silently sending null would hide an agent's contract breach.
pub fn resolve_input(template: &Value, ctx: &InputContext) -> Result<Value, MappingError> {
    match template {
        Value::String(text) => resolve_string(text, ctx),
        Value::Array(items) => items
            .iter()
            .map(|item| resolve_input(item, ctx))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| Ok((key.clone(), resolve_input(value, ctx)?)))
            .collect::<Result<_, _>>()
            .map(Value::Object),
        scalar => Ok(scalar.clone()),
    }
}

/// A parsed placeholder path.
#[derive(Debug, Clone, PartialEq)]
enum PathRef<'t> {
    ClientId,
    Stage,
    Context(Vec<&'t str>),
    Output {
        task_id: &'t str,
        keys: Vec<&'t str>,
    },
}

/// A piece of a template string.
enum Piece<'t> {
    Text(&'t str),
    /// The path as written (trimmed), for error messages, and parsed.
    Placeholder(&'t str, PathRef<'t>),
}

fn parse_path(path: &str) -> Result<PathRef<'_>, MappingError> {
    let segments: Vec<&str> = path.split('.').collect();
    let well_formed = segments.iter().all(|segment| {
        !segment.is_empty()
            && !segment
                .chars()
                .any(|c| c.is_whitespace() || c == '{' || c == '}')
    });
    let parsed = match segments.as_slice() {
        _ if !well_formed => None,
        ["journey", "client_id"] => Some(PathRef::ClientId),
        ["journey", "stage"] => Some(PathRef::Stage),
        ["journey", "context", keys @ ..] => Some(PathRef::Context(keys.to_vec())),
        ["tasks", task_id, "output", keys @ ..] => Some(PathRef::Output {
            task_id,
            keys: keys.to_vec(),
        }),
        _ => None,
    };
    parsed.ok_or_else(|| MappingError::UnknownPath {
        path: path.to_owned(),
    })
}

fn split_template(text: &str) -> Result<Vec<Piece<'_>>, MappingError> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            pieces.push(Piece::Text(&rest[..open]));
        }
        let inside = &rest[open + 2..];
        let close = inside
            .find("}}")
            .ok_or_else(|| MappingError::Unterminated {
                text: text.to_owned(),
            })?;
        let path = inside[..close].trim();
        pieces.push(Piece::Placeholder(path, parse_path(path)?));
        rest = &inside[close + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// Every placeholder in a template, with the path as written; fails on malformed ones.
fn collect_refs<'t>(
    template: &'t Value,
    refs: &mut Vec<(&'t str, PathRef<'t>)>,
) -> Result<(), MappingError> {
    match template {
        Value::String(text) => {
            for piece in split_template(text)? {
                if let Piece::Placeholder(path, reference) = piece {
                    refs.push((path, reference));
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_refs(item, refs)?;
            }
        }
        Value::Object(map) => {
            for value in map.values() {
                collect_refs(value, refs)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn resolve_string(text: &str, ctx: &InputContext) -> Result<Value, MappingError> {
    let pieces = split_template(text)?;
    if let [Piece::Placeholder(path, reference)] = pieces.as_slice() {
        return lookup(path, reference, ctx);
    }
    let mut out = String::with_capacity(text.len());
    for piece in &pieces {
        match piece {
            Piece::Text(literal) => out.push_str(literal),
            Piece::Placeholder(path, reference) => match lookup(path, reference, ctx)? {
                Value::Null => {}
                Value::String(s) => out.push_str(&s),
                other => out.push_str(&other.to_string()),
            },
        }
    }
    Ok(Value::String(out))
}

fn lookup(path: &str, reference: &PathRef, ctx: &InputContext) -> Result<Value, MappingError> {
    match reference {
        PathRef::ClientId => Ok(Value::String(ctx.client_id.to_owned())),
        PathRef::Stage => Ok(Value::String(ctx.stage.to_owned())),
        PathRef::Context(keys) => Ok(descend(ctx.context, keys).cloned().unwrap_or(Value::Null)),
        PathRef::Output { task_id, keys } => {
            let output =
                ctx.outputs
                    .get(*task_id)
                    .ok_or_else(|| MappingError::MissingTaskOutput {
                        task_id: (*task_id).to_owned(),
                        path: path.to_owned(),
                    })?;
            descend(output, keys)
                .cloned()
                .ok_or_else(|| MappingError::MissingOutputValue {
                    task_id: (*task_id).to_owned(),
                    path: path.to_owned(),
                })
        }
    }
}

/// Follows object keys, or array indices written as numbers.
fn descend<'v>(mut value: &'v Value, keys: &[&str]) -> Option<&'v Value> {
    for key in keys {
        value = match value {
            Value::Object(map) => map.get(*key)?,
            Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::gate::{Check, Op};
    use serde_json::json;

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    fn ids(tasks: &[&TaskSpec]) -> Vec<String> {
        tasks.iter().map(|task| task.task_id.clone()).collect()
    }

    /// A playbook whose sandbox stage has the given tasks, each a YAML flow mapping.
    fn sandbox(tasks: &[&str]) -> String {
        let mut yaml = String::from("name: t\nstages:\n  sandbox:\n    tasks:\n");
        for task in tasks {
            yaml.push_str(&format!("      - {task}\n"));
        }
        yaml
    }

    fn rejection(yaml: &str) -> String {
        match Playbook::from_yaml(yaml) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn default_playbook_loads_and_validates() {
        let playbook = Playbook::from_yaml(DEFAULT_PLAYBOOK_YAML).expect("default playbook");
        assert_eq!(playbook, Playbook::default_playbook());
        assert_eq!(playbook.name, "default");
        assert_eq!(
            playbook.stages.keys().collect::<Vec<_>>(),
            ["pilot", "production", "sandbox"]
        );
        for stage in STAGE_NAMES {
            let work = playbook.stage(stage).expect(stage);
            assert!(!work.is_empty(), "{stage} has work");
            assert!(!work.rollback.is_empty(), "{stage} has rollback work");
            let none = BTreeSet::new();
            assert_eq!(
                work.rollback.ready_tasks(&none, &none).len(),
                work.rollback.tasks.len(),
                "{stage} rollback tasks are independent"
            );
            assert_eq!(
                work.rollback.topological_order().len(),
                work.rollback.tasks.len()
            );
            for task in work.tasks.iter().chain(&work.rollback.tasks) {
                assert_eq!(task.timeout, Duration::from_secs(30), "{}", task.task_id);
                assert_eq!(task.backoff.max, Duration::from_secs(5), "{}", task.task_id);
            }
        }
        assert!(playbook.stage("rollback").is_none());
    }

    #[test]
    fn default_sandbox_is_the_des_002_chain() {
        let playbook = Playbook::default_playbook();
        let sandbox = &playbook.stage("sandbox").unwrap();
        let intents: Vec<&str> = sandbox
            .topological_order()
            .iter()
            .map(|task| task.intent.as_str())
            .collect();
        assert_eq!(
            intents,
            [
                "provision_sandbox_environment",
                "install_connectors",
                "provision_test_dataset",
                "run_security_scan"
            ]
        );
        // Strictly chained: exactly one task ready at each step.
        let mut done = BTreeSet::new();
        for task in sandbox.topological_order() {
            assert_eq!(
                ids(&sandbox.ready_tasks(&done, &BTreeSet::new())),
                [task.task_id.as_str()]
            );
            done.insert(task.task_id.clone());
        }
        let connectors = sandbox.task("install-connectors").unwrap();
        assert_eq!(
            connectors.input,
            json!({
                "environment_id": "{{tasks.provision-infra.output.environment_id}}",
                "connectors": "{{journey.context.connectors}}"
            })
        );
    }

    #[test]
    fn default_pilot_and_production_have_parallelism() {
        let playbook = Playbook::default_playbook();
        let none = BTreeSet::new();

        let pilot = &playbook.stage("pilot").unwrap();
        assert_eq!(ids(&pilot.ready_tasks(&none, &none)), ["deploy-pilot"]);
        assert_eq!(
            ids(&pilot.ready_tasks(&set(&["deploy-pilot"]), &set(&["deploy-pilot"]))),
            [
                "monitor-search-quality",
                "collect-user-feedback",
                "run-performance-test"
            ]
        );

        let production = &playbook.stage("production").unwrap();
        assert_eq!(
            ids(&production.ready_tasks(&none, &none)),
            ["rollout-10", "configure-monitoring"]
        );
        let percentages: Vec<&Value> = production
            .topological_order()
            .iter()
            .filter(|task| task.intent == "rollout_users")
            .map(|task| &task.input["percentage"])
            .collect();
        assert_eq!(percentages, [&json!(10), &json!(50), &json!(100)]);
    }

    #[test]
    fn intents_cover_every_stage_and_rollback() {
        let want: BTreeSet<String> = [
            "provision_sandbox_environment",
            "install_connectors",
            "provision_test_dataset",
            "run_security_scan",
            "teardown_sandbox_environment",
            "deploy_pilot",
            "monitor_search_quality",
            "collect_user_feedback",
            "run_performance_test",
            "revoke_pilot_access",
            "rollout_users",
            "configure_monitoring",
            "rollback_production_deployment",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(Playbook::default_playbook().intents(), want);
    }

    #[test]
    fn defaults_fill_optional_task_fields() {
        let playbook =
            Playbook::from_yaml(&sandbox(&["{task_id: a, name: A, intent: do_a}"])).unwrap();
        let task = playbook.stage("sandbox").unwrap().task("a").unwrap();
        assert_eq!(task.agent_id, None);
        assert!(task.depends_on.is_empty());
        assert_eq!(task.input, json!({}));
        assert_eq!(task.max_retries, 3);
        assert_eq!(task.timeout, Duration::from_secs(30));
        assert_eq!(task.backoff, BackoffPolicy::default());
        assert!(playbook.stage("sandbox").unwrap().rollback.is_empty());
        assert!(playbook.stage("pilot").is_none());
    }

    #[test]
    fn rejections_name_the_offending_ids() {
        let cases: &[(String, &str)] = &[
            (
                "name: t\nstages:\n  staging:\n    tasks: []\n".to_owned(),
                "unknown stage `staging`",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x}", "{task_id: a, name: B, intent: y}"]),
                "sandbox: duplicate task id `a`",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, depends_on: [ghost]}"]),
                "sandbox: task `a` depends on unknown task `ghost`",
            ),
            (
                sandbox(&[
                    "{task_id: a, name: A, intent: x, depends_on: [b]}",
                    "{task_id: b, name: B, intent: x, depends_on: [c]}",
                    "{task_id: c, name: C, intent: x, depends_on: [a]}",
                ]),
                "sandbox: cycle: a -> b -> c -> a",
            ),
            (
                sandbox(&[
                    "{task_id: root, name: R, intent: x}",
                    "{task_id: a, name: A, intent: x, depends_on: [root, b]}",
                    "{task_id: b, name: B, intent: x, depends_on: [a]}",
                ]),
                "sandbox: cycle: a -> b -> a",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, depends_on: [a]}"]),
                "sandbox: cycle: a -> a",
            ),
            (
                sandbox(&[
                    "{task_id: a, name: A, intent: x}",
                    "{task_id: b, name: B, intent: x}",
                    "{task_id: c, name: C, intent: x, depends_on: [a], input: {v: '{{tasks.b.output.id}}'}}",
                ]),
                "sandbox: task `c` input references `tasks.b.output.id`, but `b` is not one of its (transitive) dependencies",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, input: {v: 'x-{{tasks.a.output}}'}}"]),
                "task `a` input references `tasks.a.output`, but `a` is not",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, backoff: {initial: 2s, max: 1s}}"]),
                "sandbox: task `a`: backoff max (1s) must be at least initial (2s)",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, backoff: {multiplier: 0.5}}"]),
                "sandbox: task `a`: backoff multiplier must be a finite number >= 1, got 0.5",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, backoff: {jitter: 2}}"]),
                "sandbox: task `a`: backoff jitter must be between 0 and 1, got 2",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: ''}"]),
                "sandbox: task `a` has an empty intent",
            ),
            (
                sandbox(&["{task_id: Bad_Id, name: A, intent: x}"]),
                "sandbox: invalid task id `Bad_Id`",
            ),
            (
                sandbox(&["{task_id: 'a b', name: A, intent: x}"]),
                "sandbox: invalid task id `a b`",
            ),
            (
                sandbox(&["{task_id: '', name: A, intent: x}"]),
                "sandbox: invalid task id ``",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: Do-This}"]),
                "sandbox: task `a` has invalid intent `Do-This`",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: 'do this'}"]),
                "sandbox: task `a` has invalid intent `do this`",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, timeout: 0s}"]),
                "sandbox: task `a`: timeout must be greater than zero",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, input: [1, 2]}"]),
                "sandbox: task `a`: input must be a mapping, got an array",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, input: {v: '{{journey.nope}}'}}"]),
                "sandbox: task `a` input: unknown template path `journey.nope`",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, input: {v: ['{{journey.client_id']}}"]),
                "sandbox: task `a` input: unterminated placeholder in `{{journey.client_id`",
            ),
            (
                "name: t\nstages:\n  pilot:\n    tasks: []\n    rollback:\n      tasks:\n        - {task_id: a, name: A, intent: x}\n        - {task_id: a, name: A, intent: x}\n".to_owned(),
                "pilot.rollback: duplicate task id `a`",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, retries: 3}"]),
                "unknown field `retries`",
            ),
            (
                "name: t\nstages:\n  sandbox:\n    tasks: []\n    rolback: {tasks: []}\n".to_owned(),
                "unknown field `rolback`",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, timeout: soon}"]),
                "invalid playbook YAML",
            ),
        ];
        for (yaml, want) in cases {
            let message = rejection(yaml);
            assert!(message.contains(want), "got {message:?}, want {want:?}");
        }
    }

    #[test]
    fn references_to_transitive_dependencies_are_allowed() {
        let yaml = sandbox(&[
            "{task_id: a, name: A, intent: x}",
            "{task_id: b, name: B, intent: x, depends_on: [a]}",
            "{task_id: c, name: C, intent: x, depends_on: [b], input: {v: '{{ tasks.a.output.id }}', w: ['{{tasks.b.output}}']}}",
        ]);
        Playbook::from_yaml(&yaml).expect("c may read a through b");
    }

    fn context() -> (Value, BTreeMap<String, Value>) {
        let context = json!({
            "connectors": ["slack", "jira"],
            "owner": {"name": "Ada", "tier": 2},
        });
        let outputs = BTreeMap::from([(
            "provision-infra".to_owned(),
            json!({"environment_id": "env-7", "size": 3, "nodes": [{"ip": "10.0.0.1"}], "gone": null}),
        )]);
        (context, outputs)
    }

    #[test]
    fn exact_placeholders_keep_their_type() {
        let (context, outputs) = context();
        let ctx = InputContext {
            client_id: "client-123",
            stage: "sandbox",
            context: &context,
            outputs: &outputs,
        };
        let template = json!({
            "client": "{{journey.client_id}}",
            "stage": "{{ journey.stage }}",
            "connectors": "{{journey.context.connectors}}",
            "tier": "{{journey.context.owner.tier}}",
            "owner": "{{journey.context.owner}}",
            "context": "{{journey.context}}",
            "env": "{{tasks.provision-infra.output.environment_id}}",
            "size": "{{tasks.provision-infra.output.size}}",
            "ip": "{{tasks.provision-infra.output.nodes.0.ip}}",
            "gone": "{{tasks.provision-infra.output.gone}}",
            "nested": [{"deep": "{{journey.context.connectors.1}}"}],
            "literal": 42,
            "plain": "no placeholders",
        });
        assert_eq!(
            resolve_input(&template, &ctx).unwrap(),
            json!({
                "client": "client-123",
                "stage": "sandbox",
                "connectors": ["slack", "jira"],
                "tier": 2,
                "owner": {"name": "Ada", "tier": 2},
                "context": context,
                "env": "env-7",
                "size": 3,
                "ip": "10.0.0.1",
                "gone": null,
                "nested": [{"deep": "jira"}],
                "literal": 42,
                "plain": "no placeholders",
            })
        );
    }

    #[test]
    fn placeholders_among_text_are_interpolated() {
        let (context, outputs) = context();
        let ctx = InputContext {
            client_id: "client-123",
            stage: "pilot",
            context: &context,
            outputs: &outputs,
        };
        let cases = [
            ("sandbox-{{journey.client_id}}", "sandbox-client-123"),
            (
                "{{journey.stage}}/{{tasks.provision-infra.output.environment_id}}",
                "pilot/env-7",
            ),
            ("n={{tasks.provision-infra.output.size}}", "n=3"),
            ("c={{journey.context.connectors}}", r#"c=["slack","jira"]"#),
            ("missing=[{{journey.context.nope}}]", "missing=[]"),
            (" {{journey.client_id}}", " client-123"),
            ("closing }} alone", "closing }} alone"),
        ];
        for (template, want) in cases {
            assert_eq!(
                resolve_input(&json!(template), &ctx).unwrap(),
                json!(want),
                "{template}"
            );
        }
    }

    #[test]
    fn missing_values() {
        let (context, outputs) = context();
        let ctx = InputContext {
            client_id: "c",
            stage: "sandbox",
            context: &context,
            outputs: &outputs,
        };
        assert_eq!(
            resolve_input(&json!({"a": "{{journey.context.absent.deeper}}"}), &ctx).unwrap(),
            json!({"a": null})
        );
        let no_context = InputContext {
            context: &Value::Null,
            ..ctx
        };
        assert_eq!(
            resolve_input(&json!("{{journey.context.connectors}}"), &no_context).unwrap(),
            Value::Null
        );

        let err = resolve_input(
            &json!({"x": "{{tasks.install-connectors.output.ids}}"}),
            &ctx,
        )
        .unwrap_err();
        assert_eq!(
            err,
            MappingError::MissingTaskOutput {
                task_id: "install-connectors".to_owned(),
                path: "tasks.install-connectors.output.ids".to_owned()
            }
        );
        assert_eq!(
            err.to_string(),
            "task `install-connectors` has no recorded output, needed for `tasks.install-connectors.output.ids`"
        );

        let err =
            resolve_input(&json!("id={{tasks.provision-infra.output.region}}"), &ctx).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the output of task `provision-infra` has no value at `tasks.provision-infra.output.region`"
        );

        for bad in [
            "{{journey.client_id",
            "{{tasks.a}}",
            "{{journey..x}}",
            "{{}}",
        ] {
            assert!(resolve_input(&json!(bad), &ctx).is_err(), "{bad}");
        }
    }

    /// a -> {b, c} -> d, declared out of order to show ties follow declaration order.
    fn diamond() -> StageWork {
        let yaml = sandbox(&[
            "{task_id: d, name: D, intent: x, depends_on: [b, c]}",
            "{task_id: c, name: C, intent: x, depends_on: [a]}",
            "{task_id: a, name: A, intent: x}",
            "{task_id: b, name: B, intent: x, depends_on: [a]}",
        ]);
        Playbook::from_yaml(&yaml).unwrap().stages["sandbox"].clone()
    }

    #[test]
    fn ready_tasks_over_a_diamond() {
        let dag = diamond();
        let cases: &[(&[&str], &[&str], &[&str])] = &[
            // (done, started, ready)
            (&[], &[], &["a"]),
            (&[], &["a"], &[]),
            (&["a"], &["a"], &["c", "b"]),
            (&["a"], &["a", "c"], &["b"]),
            (&["a", "c"], &["a", "c"], &["b"]),
            (&["a", "c"], &["a", "b", "c"], &[]),
            (&["a", "b", "c"], &["a", "b", "c"], &["d"]),
            (&["a", "b", "c", "d"], &["a", "b", "c", "d"], &[]),
            // `done` alone also counts as started.
            (&["a", "b", "c", "d"], &[], &[]),
        ];
        for (done, started, want) in cases {
            let got = ids(&dag.ready_tasks(&set(done), &set(started)));
            assert_eq!(got, *want, "done {done:?} started {started:?}");
        }
    }

    #[test]
    fn topological_order_is_deterministic_and_complete() {
        let dag = diamond();
        assert_eq!(ids(&dag.topological_order()), ["a", "c", "b", "d"]);
        assert_eq!(dag.task("c").map(|t| t.name.as_str()), Some("C"));
        assert!(dag.task("z").is_none());

        // An unvalidated cyclic unit does not hang or panic; the cycle is left out.
        let mut cyclic = dag.clone();
        cyclic.tasks[2].depends_on.push("d".to_owned());
        assert!(cyclic.topological_order().is_empty());
    }

    #[test]
    fn content_hash_ignores_formatting_but_not_meaning() {
        let original = Playbook::default_playbook();
        let hash = original.content_hash();
        assert_eq!(hash.len(), 64);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));

        // No comments, extra blank lines between tasks, wider padding after colons and
        // trailing blanks (both outside the folded description), other duration and
        // number spellings.
        let reformatted = DEFAULT_PLAYBOOK_YAML
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .map(|line| {
                let line = line
                    .replace("initial: 200ms", "initial: 0.2s")
                    .replace("max: 5s", "max: 5000ms")
                    .replace("multiplier: 2.0", "multiplier: 2");
                if line.trim_start().starts_with("- task_id") {
                    format!("\n{}   ", line.replace(": ", ":    "))
                } else if line.trim_end().ends_with('}') {
                    format!("{line}    ")
                } else {
                    line
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_ne!(reformatted, DEFAULT_PLAYBOOK_YAML);
        let reformatted = Playbook::from_yaml(&reformatted).unwrap();
        assert_eq!(reformatted, original);
        assert_eq!(reformatted.content_hash(), hash);

        // Key order does not matter either.
        let reordered = sandbox(&["{intent: x, name: A, task_id: a, input: {b: 1, a: 2}}"]);
        let plain = sandbox(&["{task_id: a, name: A, intent: x, input: {a: 2, b: 1}}"]);
        assert_eq!(
            Playbook::from_yaml(&reordered).unwrap().content_hash(),
            Playbook::from_yaml(&plain).unwrap().content_hash()
        );

        let changed = DEFAULT_PLAYBOOK_YAML.replace("percentage: 50", "percentage: 40");
        assert_ne!(Playbook::from_yaml(&changed).unwrap().content_hash(), hash);
        let retimed = DEFAULT_PLAYBOOK_YAML.replacen("timeout: 30s", "timeout: 31s", 1);
        assert_ne!(Playbook::from_yaml(&retimed).unwrap().content_hash(), hash);
    }

    fn metric(name: &str, metric: &str, op: Op, value: f64) -> Criterion {
        Criterion {
            name: name.to_owned(),
            check: Check::Metric {
                metric: metric.to_owned(),
                op,
                value,
            },
            since: Default::default(),
        }
    }

    fn events(name: &str, event: &str, within: Duration) -> Criterion {
        Criterion {
            name: name.to_owned(),
            check: Check::Events {
                event: event.to_owned(),
                within,
                max: 0,
                severity: None,
            },
            since: Default::default(),
        }
    }

    const DAYS_7: Duration = Duration::from_secs(7 * 24 * 3600);
    const HOUR_1: Duration = Duration::from_secs(3600);

    #[test]
    fn default_gates_are_des_002_section_1() {
        let playbook = Playbook::default_playbook();
        let sandbox = playbook.stage("sandbox").unwrap();
        assert_eq!(
            sandbox.exit_criteria,
            [
                Criterion {
                    name: "connectors_syncing".to_owned(),
                    check: Check::AllFlags {
                        prefix: "connector.".to_owned()
                    },
                    since: Default::default(),
                },
                metric("search_quality", "search.precision", Op::Gt, 0.80),
                metric("security_scan", "security.critical_count", Op::Eq, 0.0),
                Criterion {
                    name: "demo_approved".to_owned(),
                    check: Check::Flag {
                        flag: "demo.approved".to_owned(),
                        equals: true
                    },
                    since: Default::default(),
                },
            ]
        );
        assert_eq!(
            sandbox.rollback_triggers,
            [
                metric(
                    "security_vulnerability",
                    "security.critical_count",
                    Op::Gt,
                    0.0
                ),
                metric("low_data_quality", "data.quality", Op::Lt, 0.8),
            ]
        );

        let pilot = playbook.stage("pilot").unwrap();
        assert_eq!(
            pilot.exit_criteria,
            [
                metric("search_quality", "search.precision", Op::Gt, 0.85),
                metric("user_satisfaction", "user.satisfaction", Op::Gt, 4.0),
                events("no_critical_bugs", "bug.critical", DAYS_7),
                metric("performance_sla", "latency.p95_ms", Op::Lt, 500.0),
            ]
        );
        assert_eq!(
            pilot.rollback_triggers,
            [
                metric("low_satisfaction", "user.satisfaction", Op::Lt, 3.5),
                events("critical_bug", "bug.critical", DAYS_7),
                metric(
                    "performance_degradation",
                    "performance.degradation_pct",
                    Op::Gt,
                    20.0
                ),
            ]
        );

        let production = playbook.stage("production").unwrap();
        assert_eq!(
            production.exit_criteria,
            [
                metric("user_adoption", "users.adoption", Op::Gt, 0.70),
                metric("search_satisfaction", "search.satisfaction", Op::Gt, 4.5),
                metric("query_growth", "query.growth_mom", Op::Gt, 0.20),
            ]
        );
        assert_eq!(
            production.rollback_triggers,
            [
                events("p0_incident", "incident.p0", HOUR_1),
                events("p1_incident", "incident.p1", HOUR_1),
                metric("low_satisfaction", "user.satisfaction", Op::Lt, 4.0),
                metric(
                    "security_vulnerability",
                    "security.critical_count",
                    Op::Gt,
                    0.0
                ),
                metric(
                    "performance_degradation",
                    "performance.degradation_pct",
                    Op::Gt,
                    50.0
                ),
                events("data_loss", "data.loss", HOUR_1),
                metric("outage", "outage.minutes", Op::Gt, 60.0),
            ]
        );
        assert_eq!(playbook.longest_event_window(), Some(DAYS_7));
    }

    #[test]
    fn default_evidence_mappings_read_task_outputs() {
        let playbook = Playbook::default_playbook();
        let mut mapped: Vec<(&str, &str, &str)> = playbook
            .stages
            .values()
            .flat_map(|stage| stage.tasks.iter().chain(&stage.rollback.tasks))
            .flat_map(|task| {
                task.evidence
                    .iter()
                    .map(|(name, path)| (task.task_id.as_str(), name.as_str(), path.as_str()))
            })
            .collect();
        mapped.sort();
        assert_eq!(
            mapped,
            [
                ("collect-user-feedback", "user.satisfaction", "satisfaction"),
                ("install-connectors", "connector.all.syncing", "all_syncing"),
                ("monitor-search-quality", "search.precision", "precision"),
                ("run-performance-test", "latency.p95_ms", "latency_p95_ms"),
                (
                    "run-security-scan",
                    "security.critical_count",
                    "scan_result.critical"
                ),
            ]
        );
    }

    /// Hashes recorded before gates existed (commit 2328f4c): adding the optional fields must
    /// not re-version playbooks that do not use them.
    const FIXTURE_HASH_BEFORE_GATES: &str =
        "c399a9ab4b0152a56773ed3528aa117bba33a63cdbd07abc082520f51a91b739";
    const FIXTURE: &str = "name: fixture\ndescription: no gates\nstages:\n  sandbox:\n    tasks:\n      - {task_id: a, name: A, intent: do_a, input: {client: '{{journey.client_id}}'}, timeout: 5s, backoff: {initial: 100ms, max: 2s, multiplier: 2.0, jitter: 0.1}}\n      - {task_id: b, name: B, agent_id: agent-b, intent: do.b, depends_on: [a], input: {env: '{{tasks.a.output.env}}'}, max_retries: 1}\n    rollback:\n      tasks:\n        - {task_id: undo, name: Undo, intent: undo_a}\n  pilot:\n    tasks: []\n";

    #[test]
    fn content_hash_unchanged_for_playbooks_without_gates() {
        let fixture = Playbook::from_yaml(FIXTURE).unwrap();
        assert_eq!(fixture.content_hash(), FIXTURE_HASH_BEFORE_GATES);
        let canonical = fixture.canonical_json();
        for key in ["exit_criteria", "rollback_triggers", "evidence"] {
            assert!(!canonical.contains(key), "{key} in {canonical}");
        }
        // Written out empty, they are the same playbook.
        let explicit = FIXTURE.replace(
            "  pilot:\n    tasks: []\n",
            "  pilot:\n    tasks: []\n    exit_criteria: []\n    rollback_triggers: []\n",
        );
        assert_eq!(
            Playbook::from_yaml(&explicit).unwrap().content_hash(),
            FIXTURE_HASH_BEFORE_GATES
        );

        // Any change to a gate re-versions the playbook.
        let hash = Playbook::default_playbook().content_hash();
        for (from, to) in [
            ("op: \">\", value: 0.85", "op: \">=\", value: 0.85"),
            ("value: 0.80 }", "value: 0.81 }"),
            ("within: 7d, max: 0 }", "within: 6d, max: 0 }"),
            ("scan_result.critical", "scan_result.high"),
        ] {
            let changed = DEFAULT_PLAYBOOK_YAML.replacen(from, to, 1);
            assert_ne!(changed, DEFAULT_PLAYBOOK_YAML, "{from}");
            assert_ne!(
                Playbook::from_yaml(&changed).unwrap().content_hash(),
                hash,
                "{from}"
            );
        }
    }

    #[test]
    fn gate_declarations_are_validated() {
        let stage = |body: &str| {
            format!(
                "name: t\nstages:\n  pilot:\n    tasks: [{{task_id: a, name: A, intent: x}}]\n{body}"
            )
        };
        let cases: &[(String, &str)] = &[
            (
                stage("    exit_criteria:\n      - {name: q, metric: m, op: '>', value: 1}\n      - {name: q, flag: f}\n"),
                "pilot: duplicate exit criterion `q`",
            ),
            (
                stage("    rollback_triggers:\n      - {name: q, flag: f}\n      - {name: q, flag: g}\n"),
                "pilot: duplicate rollback trigger `q`",
            ),
            (
                stage("    exit_criteria:\n      - {name: a, flag: f}\n      - {name: '', flag: f}\n"),
                "pilot: exit criterion #2 has an empty name",
            ),
            (
                stage("    rollback_triggers:\n      - {name: '  ', flag: f}\n"),
                "pilot: rollback trigger #1 has an empty name",
            ),
            (
                stage("    exit_criteria:\n      - {name: q, metric: Search.Precision, op: '>', value: 1}\n"),
                "pilot: exit criterion `q`: invalid metric name `Search.Precision`",
            ),
            (
                stage("    exit_criteria:\n      - {name: q, flag: 'demo approved'}\n"),
                "pilot: exit criterion `q`: invalid flag name `demo approved`",
            ),
            (
                stage("    rollback_triggers:\n      - {name: bugs, event: bug.critical, within: 0s}\n"),
                "pilot: rollback trigger `bugs`: `within` must be greater than zero",
            ),
            (
                stage("    exit_criteria:\n      - {name: bugs, event: 'Bug', within: 1h}\n"),
                "pilot: exit criterion `bugs`: invalid event name `Bug`",
            ),
            (
                stage("    exit_criteria:\n      - {name: q, all_flags: 'Connector.'}\n"),
                "pilot: exit criterion `q`: invalid flag prefix `Connector.`",
            ),
            (
                stage("    exit_criteria:\n      - {name: soak, min_time_in_stage: 0s}\n"),
                "pilot: exit criterion `soak`: `min_time_in_stage` must be greater than zero",
            ),
            (
                stage("    exit_criteria:\n      - {name: q, metric: m, op: '>', value: .inf}\n"),
                "pilot: exit criterion `q`: value must be a finite number, got inf",
            ),
            (
                stage("    exit_criteria:\n      - {name: q, metric: m, value: 1}\n"),
                "criterion `q`: a `metric` check needs `op` and `value`",
            ),
            (
                stage("    exit_criteria:\n      - {name: q, flag: f, extra: 1}\n"),
                "unknown field `extra`",
            ),
            (
                stage("    exit_criterion: []\n"),
                "unknown field `exit_criterion`",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, evidence: {Bad: x}}"]),
                "sandbox: task `a` evidence `Bad`: invalid evidence name",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, evidence: {ok: 'a..b'}}"]),
                "sandbox: task `a` evidence `ok`: invalid output path `a..b`",
            ),
            (
                sandbox(&["{task_id: a, name: A, intent: x, evidence: {ok: ''}}"]),
                "sandbox: task `a` evidence `ok`: invalid output path ``",
            ),
            (
                "name: t\nstages:\n  sandbox:\n    tasks: []\n    rollback:\n      tasks:\n        - {task_id: u, name: U, intent: x, evidence: {'a b': x}}\n".to_owned(),
                "sandbox.rollback: task `u` evidence `a b`: invalid evidence name",
            ),
        ];
        for (yaml, want) in cases {
            let message = rejection(yaml);
            assert!(message.contains(want), "got {message:?}, want {want:?}");
        }

        // The same names in the two lists are fine: they are separate namespaces.
        Playbook::from_yaml(&stage(
            "    exit_criteria:\n      - {name: q, flag: f}\n    rollback_triggers:\n      - {name: q, flag: f, equals: false}\n",
        ))
        .unwrap();
    }

    #[test]
    fn stored_json_round_trips() {
        let original = Playbook::default_playbook();
        let stored = original.canonical_json();
        let restored: Playbook = serde_json::from_str(&stored).unwrap();
        restored.validate().unwrap();
        assert_eq!(restored, original);
        assert_eq!(restored.content_hash(), original.content_hash());
    }
}
