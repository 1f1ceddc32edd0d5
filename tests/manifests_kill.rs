//! `lazyload serve --manifests-dir` killed (SIGKILL) at random points while it learns: after
//! every kill each file is whole, and after every restart nothing that was on disk before the
//! kill is missing (the directory is read back at start; files are replaced atomically).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries,
};
use lazyload::demo::mesh::Mesh;
use support::manifests::edges_on_disk;
use support::serve::Serve;

/// Rounds of start, learn, kill. Rounds `2p` and `2p + 1` send the calls of part `p`; a caller's
/// calls are in different parts, so a restart that forgot the files would rewrite them with
/// fewer edges.
const ROUNDS: usize = 8;

/// The calls of round `round` (part `round / 2`: every `ROUNDS / 2`-th call) as one message.
fn round_message(all: &[StreamAccessLogsMessage], round: usize) -> StreamAccessLogsMessage {
    let entries: Vec<HttpAccessLogEntry> = all
        .iter()
        .flat_map(|m| match &m.log_entries {
            Some(LogEntries::HttpLogs(h)) => h.log_entry.clone(),
            _ => Vec::new(),
        })
        .collect();
    // Three entries per call (Mesh::access_logs).
    let chosen = entries
        .chunks(3)
        .enumerate()
        .filter(|(n, _)| n % (ROUNDS / 2) == round / 2)
        .flat_map(|(_, call)| call.to_vec())
        .collect();
    StreamAccessLogsMessage {
        identifier: all[0].identifier.clone(),
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries { log_entry: chosen })),
    }
}

#[tokio::test]
async fn a_kill_at_any_point_loses_no_written_edge_and_leaves_no_partial_file() {
    let dir = support::TempDir::new("manifests-kill");
    let mesh = Mesh::sample(120);
    let snapshot = dir.path("cluster.yaml");
    std::fs::write(&snapshot, mesh.cluster_yaml(true)).unwrap();
    let manifests = dir.path("manifests");
    let logs = mesh.access_logs();
    // Random kill points, reproducible from the printed seed.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };

    let mut before = BTreeSet::new();
    let mut kills_after_a_write = 0;
    for round in 0..ROUNDS {
        let (mut serve, als) = Serve::learning(&snapshot, &manifests).await;
        let message = round_message(&logs, round);
        let sender = tokio::spawn(async move {
            for _ in 0..100 {
                if let Ok(mut client) = AccessLogServiceClient::connect(format!("http://{als}")).await {
                    let _ = client.stream_access_logs(tokio_stream::iter([message])).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        // Even rounds anywhere up to the first batch (batches flush within a second), odd ones
        // after it, so some kills hit a write and some rounds surely wrote.
        let wait = if round % 2 == 0 {
            next() % 1_000
        } else {
            1_500 + next() % 1_500
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        serve.child.kill().unwrap();
        serve.child.wait().unwrap();
        sender.abort();

        let after = edges_on_disk(&manifests);
        let lost: Vec<_> = before.difference(&after).collect();
        assert!(
            lost.is_empty(),
            "round {round}: lost {} edges, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(3)]
        );
        if after.len() > before.len() {
            kills_after_a_write += 1;
        }
        before = after;
    }
    // The test means something only if learning reached the disk in some rounds.
    assert!(
        kills_after_a_write >= ROUNDS / 2,
        "only {kills_after_a_write} rounds wrote anything"
    );
    println!("{} edges on disk after {ROUNDS} kills", before.len());
}
