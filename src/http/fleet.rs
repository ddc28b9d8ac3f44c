//! One view of a fleet of orchestrator replicas: each owns a share of the journeys in its
//! own store and serves only those; this module asks every replica and merges the answers.
//!
//! It owns three things: naming the replicas (a list of `host:port`, where a name that
//! resolves to several addresses, such as a Kubernetes headless Service, means every
//! address), asking them all at once with a bound on each, and telling an answer from a
//! replica that did not give one. It never fails as a whole because one replica is away:
//! the caller gets what the others said and the list of those that did not answer, and
//! decides what that means (the CLI warns, the dashboard marks them).
//!
//! Replicas do not recurse into each other: a replica gathers its peers' *local*
//! endpoints (`/api/journeys`, `/api/report`), never their fleet endpoints. Each answer
//! carries [`INSTANCE_HEADER`], so a replica that finds itself among its peers (its own
//! pod IP in the Service's addresses) recognises the answer as its own and skips it.

use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::client::{Client, ClientError};

/// A random id per running HTTP server, on every answer: how a replica recognises itself
/// behind an address it cannot know it has (a Service's pod IP, a NAT, `0.0.0.0`).
pub const INSTANCE_HEADER: &str = "x-journeyman-instance";
/// The answering replica's `--orchestrator-id`, so a view can name it the way its logs do.
pub const ORCHESTRATOR_HEADER: &str = "x-journeyman-orchestrator";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error(
        "'{0}' is not host:port (expected e.g. 10.0.0.5:8080, orchestrator:8080 or [::1]:8080; several are separated by commas)"
    )]
    Syntax(String),
    #[error("no address given (expected host:port[,host:port...])")]
    Empty,
}

/// One replica to ask: the name it is shown by and the address asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// What the operator wrote when it names one address (`orch-0.orch:8080`), else the
    /// address itself (one of a Service's several).
    pub name: String,
    pub addr: SocketAddr,
}

/// A replica that did not answer, and why: shown to people, so a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreachable {
    pub replica: String,
    pub error: String,
}

/// Splits `a:1,b:2` into its entries, checking each is `host:port` (a bare host is a
/// mistake: there is no port every deployment agrees on).
pub fn parse_list(s: &str) -> Result<Vec<String>, FleetError> {
    let specs: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if specs.is_empty() {
        return Err(FleetError::Empty);
    }
    for spec in &specs {
        check_spec(spec)?;
    }
    Ok(specs)
}

/// One `host:port`.
pub fn check_spec(spec: &str) -> Result<(), FleetError> {
    let ok = spec
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(FleetError::Syntax(spec.to_string()))
    }
}

/// The replicas behind one entry's resolved addresses. One family only: IPv4 when there is
/// any, so `localhost` (127.0.0.1 and ::1, the same server) is one replica, not two, and a
/// dual-stack Service is not asked twice per pod.
pub fn expand(spec: &str, addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<Peer> {
    let mut all: Vec<SocketAddr> = addrs.into_iter().collect();
    if all.iter().any(SocketAddr::is_ipv4) {
        all.retain(SocketAddr::is_ipv4);
    }
    all.sort();
    all.dedup();
    let one = all.len() == 1;
    all.into_iter()
        .map(|addr| Peer {
            name: if one {
                spec.to_string()
            } else {
                addr.to_string()
            },
            addr,
        })
        .collect()
}

/// The replicas behind `specs`, resolved now (a Service's addresses change as pods come
/// and go, so a long-running replica resolves on every gathering). An entry that does not
/// resolve is a replica that did not answer.
pub async fn resolve(specs: &[String]) -> (Vec<Peer>, Vec<Unreachable>) {
    let mut peers = Vec::new();
    let mut unresolved = Vec::new();
    for spec in specs {
        match tokio::net::lookup_host(spec.as_str()).await {
            Ok(addrs) => {
                let found = expand(spec, addrs);
                if found.is_empty() {
                    unresolved.push(no_address(spec));
                }
                peers.extend(found);
            }
            Err(e) => unresolved.push(Unreachable {
                replica: spec.clone(),
                error: format!("cannot resolve '{spec}': {e}"),
            }),
        }
    }
    dedup(&mut peers);
    (peers, unresolved)
}

/// [`resolve`] without a runtime, for the command line's parser.
pub fn resolve_blocking(specs: &[String]) -> (Vec<Peer>, Vec<Unreachable>) {
    use std::net::ToSocketAddrs;
    let mut peers = Vec::new();
    let mut unresolved = Vec::new();
    for spec in specs {
        match spec.to_socket_addrs() {
            Ok(addrs) => {
                let found = expand(spec, addrs);
                if found.is_empty() {
                    unresolved.push(no_address(spec));
                }
                peers.extend(found);
            }
            Err(e) => unresolved.push(Unreachable {
                replica: spec.clone(),
                error: format!("cannot resolve '{spec}': {e}"),
            }),
        }
    }
    dedup(&mut peers);
    (peers, unresolved)
}

fn no_address(spec: &str) -> Unreachable {
    Unreachable {
        replica: spec.to_string(),
        error: format!("'{spec}' resolves to no address"),
    }
}

/// The same address written twice (`a:1,a:1`, or a name and its IP) is one replica.
fn dedup(peers: &mut Vec<Peer>) {
    let mut seen = std::collections::HashSet::new();
    peers.retain(|p| seen.insert(p.addr));
}

/// One replica's answer and who gave it.
pub struct Fetched<T> {
    pub peer: Peer,
    pub result: Result<T, ClientError>,
    /// The answering server's [`INSTANCE_HEADER`].
    pub instance: Option<String>,
    /// The answering server's [`ORCHESTRATOR_HEADER`].
    pub orchestrator_id: Option<String>,
}

/// GETs `path` from every peer at once, each bounded by `timeout`; in the peers' order.
pub async fn fetch_all<T: DeserializeOwned>(
    peers: &[Peer],
    path: &str,
    timeout: Duration,
) -> Vec<Fetched<T>> {
    let asks = peers.iter().map(|peer| async move {
        let header = |h: &hyper::HeaderMap, name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        match Client::new(peer.addr, timeout)
            .get_with_headers::<T>(path)
            .await
        {
            Ok((value, h)) => Fetched {
                peer: peer.clone(),
                result: Ok(value),
                instance: header(&h, INSTANCE_HEADER),
                orchestrator_id: header(&h, ORCHESTRATOR_HEADER),
            },
            Err(e) => Fetched {
                peer: peer.clone(),
                result: Err(e),
                instance: None,
                orchestrator_id: None,
            },
        }
    });
    futures_util::future::join_all(asks).await
}

/// Where a fleet list says each journey lives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetJourney {
    /// The replica that holds the journey (its name among the replicas asked).
    pub replica: String,
    #[serde(flatten)]
    pub summary: super::JourneySummary,
}

/// One replica as a fleet view saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaView {
    pub name: String,
    /// Its `--orchestrator-id`, when it said.
    pub orchestrator_id: Option<String>,
    /// The replica that answered this view itself.
    #[serde(default)]
    pub this: bool,
    pub answered: bool,
    /// Journeys it holds (that match the filter), when it answered.
    pub journeys: Option<usize>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// `GET /api/fleet/journeys` and `journeyman journey list --json` over several replicas.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetList {
    /// Sorted by client id, as one replica's list is.
    pub journeys: Vec<FleetJourney>,
    pub replicas: Vec<ReplicaView>,
    /// Some replica did not answer: its journeys are missing.
    pub partial: bool,
    pub unreachable: Vec<Unreachable>,
}

/// `GET /api/fleet/report` and `journeyman report --json` over several replicas: the sum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetReport {
    #[serde(flatten)]
    pub report: crate::domain::report::Report,
    pub replicas_answered: usize,
    pub replicas_asked: usize,
    pub partial: bool,
    pub unreachable: Vec<Unreachable>,
}

/// Merges lists that each replica sorted: by client id, then replica, so the same client
/// on two replicas (a migration gone wrong) shows as two adjacent lines.
pub fn merge_lists(mut journeys: Vec<FleetJourney>) -> Vec<FleetJourney> {
    journeys.sort_by(|a, b| {
        (a.summary.client_id.as_str(), a.replica.as_str())
            .cmp(&(b.summary.client_id.as_str(), b.replica.as_str()))
    });
    journeys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_on_commas_and_every_entry_needs_a_port() {
        assert_eq!(
            parse_list(" a:1, b:2 ,").unwrap(),
            vec!["a:1".to_string(), "b:2".to_string()]
        );
        assert_eq!(parse_list("[::1]:8080").unwrap(), vec!["[::1]:8080"]);
        assert_eq!(parse_list("a:1,b"), Err(FleetError::Syntax("b".into())));
        assert_eq!(parse_list(" , "), Err(FleetError::Empty));
        assert!(parse_list("a:99999").is_err());
    }

    #[test]
    fn a_name_with_several_addresses_is_every_address_of_one_family() {
        let v4 = |a: u8| SocketAddr::from(([10, 0, 0, a], 8080));
        let v6: SocketAddr = "[::1]:8080".parse().unwrap();
        let one = expand(
            "localhost:8080",
            [v6, SocketAddr::from(([127, 0, 0, 1], 8080))],
        );
        assert_eq!(one.len(), 1, "localhost is one replica");
        assert_eq!(one[0].name, "localhost:8080", "named as written");
        let many = expand("orch:8080", [v4(2), v4(1), v4(2)]);
        assert_eq!(
            many.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
        assert_eq!(expand("v6:8080", [v6]).len(), 1);
    }

    #[test]
    fn names_resolve_and_those_that_do_not_are_unreachable() {
        let (peers, bad) = resolve_blocking(&[
            "127.0.0.1:1".into(),
            "localhost:1".into(),
            "no-such-host.invalid:1".into(),
        ]);
        assert_eq!(peers.len(), 1, "the same address twice is one replica");
        assert_eq!(bad.len(), 1);
        assert!(bad[0].error.contains("cannot resolve"), "{:?}", bad[0]);
    }
}
