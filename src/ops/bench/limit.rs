//! The broker limit: our message pattern with nothing else. Requests are published with
//! confirms through the intents exchange to durable work queues (one per step of a chain
//! of four), an echo consumer replies with confirms to a durable reply queue and acks each
//! request once its reply is confirmed (as the agent runtime does), and the requester acks
//! its replies with one multiple-ack per batch (as the orchestrator does) and sends the
//! chain's next request. Requester and echo each have a consuming and a publishing
//! connection. No orchestration, no store.

use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicAckOptions;
use serde_json::json;

use super::probe::{cpu_seconds, peak_rss_kib};
use super::{
    AbortOnDrop, BenchConfig, BenchError, PREFETCH, Progress, Row, TASKS_PER_JOURNEY, amqp,
    check_confirm, failed, fresh_names, new_histogram, per_1k, record, say,
};
use crate::broker::{self, Names, Outgoing, Publisher};
use crate::orchestrator::stats::RoundTripSummary;
use crate::wire::auth::{Key, Signer};
use crate::wire::protocol::{AgentRef, Envelope, MessageType};

/// What the echo replies with and the requester sends: bodies the size of a real task
/// request and reply (signed when auth is on), built once; the loop itself neither signs
/// nor parses.
fn sample_bodies(auth: bool) -> Result<(Vec<u8>, Vec<u8>), BenchError> {
    let now = Utc::now();
    let client = "bench-000001";
    let request = Envelope::new(
        AgentRef::orchestrator(),
        AgentRef::new("infrastructure-provisioning-agent", "journeyman"),
        MessageType::Request,
        "provision_sandbox_environment",
        json!({"client_id": client, "environment_name": format!("sandbox-{client}"),
            "data_sources": ["drive", "confluence", "jira"]}),
        now,
    )
    .with_correlation(uuid::Uuid::new_v4().to_string());
    let reply = Envelope::new(
        AgentRef::new("bench-agent", "journeyman"),
        AgentRef::orchestrator(),
        MessageType::Response,
        "provision_sandbox_environment",
        json!({"status": "completed", "output": crate::agent::sim::simulated_output(
            "provision_sandbox_environment", client, &json!({}))}),
        now,
    )
    .with_correlation(uuid::Uuid::new_v4().to_string());
    if auth {
        let orch_id = AgentRef::orchestrator().agent_id;
        let orch = Signer::new(Key::generate("bench-orch", orch_id.clone())?, orch_id)?;
        let agent = Signer::new(Key::generate("bench-agent", "bench-agent")?, "bench-agent")?;
        return Ok((
            orch.sign(request, now).to_bytes(),
            agent.sign(reply, now).to_bytes(),
        ));
    }
    Ok((request.to_bytes(), reply.to_bytes()))
}

fn step_key(step: usize) -> String {
    format!("bench.step.{step}")
}

pub(super) async fn broker_limit(
    cfg: &BenchConfig,
    journeys: usize,
    concurrency: usize,
) -> Result<Row, BenchError> {
    let names = fresh_names(cfg);
    say(
        cfg,
        format!(
            "broker limit: {journeys} chains of {TASKS_PER_JOURNEY} round trips, {concurrency} in flight, namespace {}",
            names.namespace
        ),
    );
    let admin = broker::connect(&cfg.amqp_url, "journeyman-bench-admin").await?;
    let mut queues = vec![names.dead_letter(), names.replies("bench")];
    queues.extend((0..TASKS_PER_JOURNEY).map(|i| names.intent_queue(&step_key(i))));
    let result = cfg
        .interruptible(broker_limit_on(cfg, &admin, &names, journeys, concurrency))
        .await;
    if !cfg.keep {
        broker::delete_namespace(&admin, &names, &queues).await;
    }
    let _ = admin.close(200, "bench done".into()).await;
    result
}

async fn broker_limit_on(
    cfg: &BenchConfig,
    admin: &lapin::Connection,
    names: &Names,
    journeys: usize,
    concurrency: usize,
) -> Result<Row, BenchError> {
    const PART: &str = "broker limit";
    let ch = admin
        .create_channel()
        .await
        .map_err(amqp("create channel"))?;
    broker::declare_exchanges(&ch, names).await?;
    let reply_queue = names.replies("bench");
    broker::declare_queue(&ch, names, &reply_queue, None).await?;
    for i in 0..TASKS_PER_JOURNEY {
        let key = step_key(i);
        broker::declare_queue(&ch, names, &names.intent_queue(&key), Some(&key)).await?;
    }
    let (request_body, reply_body) = sample_bodies(cfg.auth)?;

    // The echo: its own consuming and publishing connections, like an agent.
    let echo_consume = broker::connect(&cfg.amqp_url, "journeyman-bench-echo-consume").await?;
    let echo_publish = broker::connect(&cfg.amqp_url, "journeyman-bench-echo-publish").await?;
    let echo_publisher = Publisher::start(&echo_publish).await?;
    let (echo_err_tx, mut echo_err) = tokio::sync::mpsc::channel::<String>(8);
    let mut echo_tasks = Vec::new();
    for i in 0..TASKS_PER_JOURNEY {
        let q = names.intent_queue(&step_key(i));
        let (chan, consumer) = broker::consume(&echo_consume, &q, "bench-echo", PREFETCH).await?;
        let task = echo(
            chan,
            consumer,
            echo_publisher.clone(),
            reply_body.clone(),
            echo_err_tx.clone(),
        );
        echo_tasks.push(AbortOnDrop(tokio::spawn(task)));
    }
    drop(echo_publisher);

    // The requester: its own connections too, like the orchestrator.
    let req_consume = broker::connect(&cfg.amqp_url, "journeyman-bench-requester-consume").await?;
    let req_publish = broker::connect(&cfg.amqp_url, "journeyman-bench-requester-publish").await?;
    let publisher = Publisher::start(&req_publish).await?;
    let (_reply_chan, mut replies) =
        broker::consume(&req_consume, &reply_queue, "bench-requester", PREFETCH).await?;

    let mut hist = new_histogram();
    let mut slots: Vec<(usize, usize, Instant)> = Vec::with_capacity(concurrency);
    let mut confirms = FuturesUnordered::new();
    let send = |slot: usize, step: usize| Outgoing {
        exchange: names.intents(),
        routing_key: step_key(step),
        mandatory: true,
        message_id: uuid::Uuid::new_v4().to_string(),
        correlation_id: Some(format!("{slot}.{step}")),
        reply_to: Some(reply_queue.clone()),
        message_type: "request".into(),
        headers: Vec::new(),
        body: request_body.clone(),
    };
    let cpu0 = cpu_seconds("self");
    let start = Instant::now();
    let mut started = 0;
    for slot in 0..concurrency.min(journeys) {
        slots.push((slot, 0, Instant::now()));
        confirms.push(publisher.enqueue(send(slot, 0)).await?);
        started += 1;
    }
    let mut finished = 0;
    let mut round_trips = 0u64;
    let mut progress = Progress::new(PART, journeys);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while finished < journeys {
        tokio::select! {
            next = replies.next() => {
                let mut batch = vec![next];
                while batch.len() < 512 {
                    match replies.next().now_or_never() {
                        Some(n) => batch.push(n),
                        None => break,
                    }
                }
                let mut last = None;
                let mut next_sends = Vec::new();
                for d in batch {
                    let d = match d {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => return Err(amqp("consume replies")(e)),
                        None => return Err(failed(PART, "the reply consumer ended (queue deleted?)")),
                    };
                    let corr = d.properties.correlation_id().as_ref().map(|c| c.as_str().to_string());
                    let parsed = corr.as_deref().and_then(|c| c.split_once('.')).and_then(|(s, t)| Some((s.parse::<usize>().ok()?, t.parse::<usize>().ok()?)));
                    if let Some((slot, step)) = parsed
                        && let Some(state) = slots.get_mut(slot)
                        && state.1 == step
                    {
                        record(&mut hist, state.2.elapsed());
                        round_trips += 1;
                        if step + 1 < TASKS_PER_JOURNEY {
                            *state = (slot, step + 1, Instant::now());
                            next_sends.push((slot, step + 1));
                        } else {
                            finished += 1;
                            if started < journeys {
                                started += 1;
                                *state = (slot, 0, Instant::now());
                                next_sends.push((slot, 0));
                            } else {
                                *state = (slot, usize::MAX, Instant::now());
                            }
                        }
                    }
                    last = Some(d);
                }
                // One multiple-ack for the batch, then the next requests, as the
                // orchestrator does after its flush.
                if let Some(d) = last {
                    d.acker.ack(BasicAckOptions { multiple: true }).await.map_err(amqp("ack replies"))?;
                }
                for (slot, step) in next_sends {
                    slots[slot].2 = Instant::now();
                    confirms.push(publisher.enqueue(send(slot, step)).await?);
                }
            }
            Some(c) = confirms.next(), if !confirms.is_empty() => check_confirm(PART, c)?,
            Some(e) = echo_err.recv() => return Err(failed(PART, format!("the echo consumer failed: {e}"))),
            _ = tick.tick() => progress.tick(cfg, finished, "(none: the broker limit runs in this process)")?,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds("self")
        .zip(cpu0)
        .map(|(b, a)| b - a)
        .unwrap_or(0.0);
    drop(echo_tasks);
    for c in [&echo_consume, &echo_publish, &req_consume, &req_publish] {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), c.close(200, "bench done".into())).await;
    }
    let tasks = round_trips;
    Ok(Row {
        part: PART.into(),
        namespace: names.namespace.clone(),
        journeys,
        concurrency,
        tasks,
        elapsed_s: elapsed,
        tasks_per_s: tasks as f64 / elapsed,
        journeys_per_s: finished as f64 / elapsed,
        round_trip: RoundTripSummary::of_micros(&hist),
        cpu_s: cpu,
        cpu_s_per_1k_tasks: per_1k(cpu, tasks),
        cpu_of: "bench process (requester and echo)".into(),
        bench_process_cpu_s: cpu,
        peak_rss_mib: peak_rss_kib("self").unwrap_or(0) as f64 / 1024.0,
        store_bytes: None,
        store_bytes_per_journey: None,
        store_flushed: None,
        live_bytes_per_journey: None,
        kept_dir: None,
        soak: Vec::new(),
        soak_live_bytes: None,
    })
}

/// Replies to every request with confirms and acks it once the reply is confirmed, as
/// the agent runtime does.
async fn echo(
    _chan: lapin::Channel,
    mut consumer: lapin::Consumer,
    publisher: Publisher,
    body: Vec<u8>,
    err: tokio::sync::mpsc::Sender<String>,
) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = consumer.next() => {
                let d = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => { let _ = err.send(e.to_string()).await; return; }
                    None => return,
                };
                let Some(reply_to) = d.properties.reply_to().as_ref().map(|r| r.as_str().to_string()) else {
                    let _ = err.send("a request without reply_to".into()).await;
                    return;
                };
                let out = Outgoing {
                    exchange: String::new(),
                    routing_key: reply_to,
                    mandatory: false,
                    message_id: uuid::Uuid::new_v4().to_string(),
                    correlation_id: d.properties.correlation_id().as_ref().map(|c| c.as_str().to_string()),
                    reply_to: None,
                    message_type: "response".into(),
                    headers: Vec::new(),
                    body: body.clone(),
                };
                match publisher.enqueue(out).await {
                    Ok(rx) => pending.push(async move { (d, rx.await) }),
                    Err(e) => { let _ = err.send(e.to_string()).await; return; }
                }
            }
            Some((d, res)) = pending.next(), if !pending.is_empty() => {
                match res {
                    Ok(Ok(_)) => {
                        if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                            let _ = err.send(e.to_string()).await;
                            return;
                        }
                    }
                    Ok(Err(e)) => { let _ = err.send(e.to_string()).await; return; }
                    Err(_) => { let _ = err.send("the publisher stopped".into()).await; return; }
                }
            }
        }
    }
}
