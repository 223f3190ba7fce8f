//! Membership at run time (docs/design.md §11), with real processes: a server added under
//! writes catches up, joins and serves reads; a removed backup is refused by its peers, stops
//! serving and never leads; the take-over after an add follows rank order and loses no
//! acknowledged write; a replaced node's configuration survives a whole-cluster restart;
//! bad changes are refused and change nothing.

mod common;

use std::time::{Duration, Instant};

use common::Writer;
use replikv_client::{Client, Error};
use replikv_proto::kv::member_remove_request::Target;
use replikv_proto::kv::MemberListResponse;
use replikv_testkit::LocalCluster;

/// Bound for a joiner to catch up and become a serving member, or a view change to settle.
const SETTLE: Duration = Duration::from_secs(30);

/// The configuration's ranks and the view's members, as `rank` reports them.
fn ranks_and_members(list: &MemberListResponse) -> (Vec<u32>, Vec<u32>) {
    let view = list.view.clone().expect("a view");
    let config = view.config.expect("a configuration");
    (
        config.servers.iter().map(|s| s.rank).collect(),
        view.members,
    )
}

/// Polls `rank` until `want` holds for its status, or fails after `timeout`.
async fn wait_status(
    cluster: &LocalCluster,
    rank: usize,
    timeout: Duration,
    what: &str,
    want: impl Fn(&replikv_proto::kv::StatusResponse) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = cluster.status(rank).await;
        if status.as_ref().is_some_and(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server {rank} is not {what} within {timeout:?}; last status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Adds a slot, asks the cluster to add it and starts it with `--join` through `via`;
/// returns its rank once it serves as a member.
async fn add_and_join(cluster: &mut LocalCluster, client: &Client, via: usize) -> usize {
    let rank = cluster.add_slot().expect("room for a server");
    let added = client
        .member_add(&cluster.member_arg(rank))
        .await
        .expect("member add");
    assert_eq!(added.rank as usize, rank, "the next unused rank");
    cluster.start_joining(rank, via).expect("start the joiner");
    wait_status(cluster, rank, SETTLE, "a serving member", |s| {
        s.serving
            && s.view
                .as_ref()
                .is_some_and(|v| v.members.contains(&(rank as u32)))
    })
    .await;
    rank
}

#[test]
fn a_server_added_under_writes_catches_up_joins_and_serves_reads() {
    common::run(async {
        let (mut cluster, primary) = common::start_healthy(3, &[]).await;
        let client = common::primary_routed_client(&cluster).await;
        let mut before = common::Expected::new();
        common::put_fresh(&client, "before", 200, &mut before).await;
        let writer = Writer::start(client.clone(), "during");
        let rank = add_and_join(&mut cluster, &client, primary).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = writer.stop().await;
        eprintln!("writer: {}", log.summary());
        log.assert_no_anomalies();
        assert!(!log.acked.is_empty(), "writes went on during the join");

        let list = client.members().await.expect("member list");
        assert_eq!(
            ranks_and_members(&list),
            (vec![0, 1, 2, 3], vec![0, 1, 2, 3])
        );
        cluster.wait_converged(SETTLE).await.expect("converged");
        let mut expected = before;
        expected.extend(log.all_acked());
        common::assert_every_server_reads(&cluster, [rank], &expected).await;
    });
}

#[test]
fn a_removed_backup_is_refused_stops_serving_and_never_leads() {
    common::run(async {
        let (mut cluster, primary) = common::start_healthy(4, &[]).await;
        assert_eq!(primary, 0, "rank 0 forms the cluster");
        let client = common::primary_routed_client(&cluster).await;
        let writer = Writer::start(client.clone(), "w");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Rank 1 would take over first: removed, it must not.
        let removed = client
            .member_remove(Target::Rank(1))
            .await
            .expect("member remove");
        assert_eq!(removed.rank, 1);
        wait_status(&cluster, 1, SETTLE, "removed", |s| {
            s.role == "removed" && !s.serving
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Its peer calls are refused: a prepare from rank 1's certificate to the primary.
        let list = client.members().await.expect("member list");
        assert_eq!(ranks_and_members(&list), (vec![0, 2, 3], vec![0, 2, 3]));
        let refused = prepare_as(&cluster, 1, 0, &list.cluster).await;
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("configuration"), "{refused:?}");

        // Its clients are sent elsewhere (a raw call: the client library would learn the
        // other servers from it and go there).
        let mut kv = cluster.stub(1, Duration::from_secs(5));
        let read = kv
            .get(replikv_proto::kv::GetRequest {
                key: "w-000000".into(),
            })
            .await
            .expect_err("a removed server answers no read");
        assert_eq!(read.code(), tonic::Code::Unavailable, "{read:?}");
        assert!(read.message().contains("removed"), "{read:?}");

        // The primary dies: rank 2, not the removed rank 1, takes over.
        let killed_at = Instant::now();
        cluster.kill(0).unwrap();
        let (next, _) = cluster.wait_for_primary(SETTLE).await.expect("a take-over");
        assert_eq!(next, 2, "the next configured rank takes over");
        eprintln!("take-over after {:?}", killed_at.elapsed());
        for _ in 0..20 {
            let s = common::status(&cluster, 1).await;
            assert_ne!(s.role, "primary", "the removed server leads");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = writer.stop().await;
        eprintln!("writer: {}", log.summary());
        log.assert_no_anomalies();
        let reader = Client::connect(
            cluster
                .client_config_for(vec![cluster.addr(2), cluster.addr(3)])
                .with_request_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
        common::assert_reads(&reader, &log.all_acked(), "after the take-over").await;
    });
}

/// A Prepare sent to `to`'s peer port with rank `from`'s node certificate, naming
/// `cluster`: the status it is refused with.
async fn prepare_as(cluster: &LocalCluster, from: usize, to: usize, id: &str) -> tonic::Status {
    use replikv_proto::peer::peer_client::PeerClient;
    use replikv_proto::peer::PrepareRequest;
    let channel = cluster
        .peer_channel(to, &format!("node-{from}"))
        .await
        .expect("peer connection");
    let mut req = tonic::Request::new(PrepareRequest {
        ballot: 1000,
        proposer: from as u32,
        view: None,
    });
    req.metadata_mut()
        .insert("replikv-from", from.to_string().parse().unwrap());
    req.metadata_mut()
        .insert("replikv-cluster", id.parse().unwrap());
    match PeerClient::new(channel).prepare(req).await {
        Ok(r) => panic!("a removed server's prepare was answered: {r:?}"),
        Err(s) => s,
    }
}

#[test]
fn the_take_over_after_an_add_follows_rank_order_and_keeps_every_acked_write() {
    common::run(async {
        let (mut cluster, primary) = common::start_healthy(3, &[]).await;
        let client = common::primary_routed_client(&cluster).await;
        let rank = add_and_join(&mut cluster, &client, primary).await;
        let writer = Writer::start(client.clone(), "w");
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.kill(primary).unwrap();
        let (next, _) = cluster.wait_for_primary(SETTLE).await.expect("a take-over");
        assert_eq!(next, 1, "rank order: rank 1 follows rank 0");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let log = writer.stop().await;
        eprintln!("writer: {}", log.summary());
        log.assert_no_anomalies();
        cluster.wait_converged(SETTLE).await.expect("converged");
        common::assert_every_server_reads(&cluster, [1, 2, rank], &log.all_acked()).await;
    });
}

#[test]
fn a_replaced_node_and_the_configuration_survive_a_whole_cluster_restart() {
    common::run(async {
        let (mut cluster, primary) = common::start_healthy(3, &[]).await;
        let client = common::primary_routed_client(&cluster).await;
        let mut expected = common::Expected::new();
        common::put_fresh(&client, "a", 50, &mut expected).await;
        client
            .member_remove(Target::Address(cluster.member_arg(1)))
            .await
            .expect("remove rank 1 by its address");
        cluster.kill(1).unwrap();
        let rank = add_and_join(&mut cluster, &client, primary).await;
        common::put_fresh(&client, "b", 50, &mut expected).await;

        cluster.kill_all();
        for r in [rank, 2, 0] {
            cluster.restart(r).unwrap();
        }
        cluster
            .wait_converged(SETTLE)
            .await
            .expect("the cluster serves again");
        let client = common::client(&cluster).await;
        let list = client.members().await.expect("member list");
        let (ranks, _) = ranks_and_members(&list);
        assert_eq!(ranks, vec![0, 2, 3], "the configuration persisted");
        common::assert_every_server_reads(&cluster, [0, 2, rank], &expected).await;
    });
}

#[test]
fn bad_membership_changes_are_refused_and_change_nothing() {
    common::run(async {
        let (mut cluster, _) = common::start_healthy(3, &[]).await;
        let client = common::primary_routed_client(&cluster).await;
        let before = client.members().await.expect("member list");

        let dup = client.member_add(&cluster.member_arg(2)).await;
        assert!(
            matches!(&dup, Err(Error::InvalidArgument(m)) if m.contains("already")),
            "{dup:?}"
        );
        let bad = client.member_add("no-port").await;
        assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
        let unknown = client.member_remove(Target::Rank(9)).await;
        assert!(
            matches!(&unknown, Err(Error::InvalidArgument(m)) if m.contains("rank 9")),
            "{unknown:?}"
        );
        let own = client.member_remove(Target::Rank(0)).await;
        assert!(
            matches!(&own, Err(Error::Refused(m)) if m.contains("primary")),
            "{own:?}"
        );
        let after = client.members().await.expect("member list");
        assert_eq!(after.view, before.view, "nothing changed");

        // An added server that has not joined is the change in progress.
        let rank = cluster.add_slot().unwrap();
        let added = client.member_add(&cluster.member_arg(rank)).await.unwrap();
        assert_eq!(added.rank, 3);
        let other = cluster.add_slot().unwrap();
        let second = client.member_add(&cluster.member_arg(other)).await;
        assert!(
            matches!(&second, Err(Error::Refused(m)) if m.contains("in progress")),
            "{second:?}"
        );
        let remove = client.member_remove(Target::Rank(1)).await;
        assert!(matches!(remove, Err(Error::Refused(_))), "{remove:?}");
        let pending = client.members().await.unwrap();
        assert_eq!(
            ranks_and_members(&pending),
            (vec![0, 1, 2, 3], vec![0, 1, 2])
        );
        // Removing the added server cancels the change; its rank is not used again.
        client.member_remove(Target::Rank(3)).await.unwrap();
        let next = client.member_add(&cluster.member_arg(other)).await.unwrap();
        assert_eq!(next.rank, 4, "rank 3 is retired");
    });
}
