//! Normal operation of a healthy three-server cluster: every server answers
//! every key, and writes report what they replaced.

mod common;

use common::{bytes, pinned, Expected};

#[test]
fn put_through_one_server_reads_back_from_every_server() {
    common::run(async {
        let (cluster, primary) = common::start_healthy(3, &[]).await;
        // Write through a backup: it must forward to the primary (docs/design.md §4).
        let via = (primary + 1) % cluster.len();
        let writer = pinned(&cluster, via).await;

        assert_eq!(writer.get(bytes("fruit")).await.unwrap(), None);
        assert_eq!(
            writer.put(bytes("fruit"), bytes("apple")).await.unwrap(),
            None,
            "a first put replaces nothing"
        );
        assert_eq!(
            writer.put(bytes("fruit"), bytes("banana")).await.unwrap(),
            Some(bytes("apple")),
            "a second put returns the value it replaced"
        );
        for rank in 0..cluster.len() {
            let reader = pinned(&cluster, rank).await;
            assert_eq!(
                reader.get(bytes("fruit")).await.unwrap(),
                Some(bytes("banana")),
                "server {rank} reads the latest value"
            );
            assert_eq!(
                reader.get(bytes("never-written")).await.unwrap(),
                None,
                "server {rank} has no value for a key nobody wrote"
            );
        }

        assert_eq!(
            writer.delete(bytes("fruit")).await.unwrap(),
            Some(bytes("banana")),
            "delete returns the value it removed"
        );
        assert_eq!(
            writer.delete(bytes("fruit")).await.unwrap(),
            None,
            "deleting an absent key removes nothing"
        );
        for rank in 0..cluster.len() {
            let reader = pinned(&cluster, rank).await;
            assert_eq!(
                reader.get(bytes("fruit")).await.unwrap(),
                None,
                "server {rank} no longer has the deleted key"
            );
        }
        assert_eq!(
            writer.put(bytes("fruit"), bytes("cherry")).await.unwrap(),
            None,
            "a put after a delete replaces nothing"
        );
    });
}

#[test]
fn a_forwarded_write_names_the_primary_and_one_on_the_primary_does_not() {
    use replikv_proto::kv::PutRequest;
    common::run(async {
        let (cluster, primary) = common::start_healthy(3, &[]).await;
        let put = |rank: usize, key: &'static str| {
            let mut stub = cluster.stub(rank, std::time::Duration::from_secs(10));
            async move {
                stub.put(PutRequest {
                    key: bytes(key),
                    value: bytes("v"),
                    id: None,
                })
                .await
                .unwrap()
            }
        };
        let named = |r: &tonic::Response<_>| {
            r.metadata()
                .get(replikv_proto::PRIMARY_ADDR_HEADER)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let backup = (primary + 1) % cluster.len();
        let forwarded = put(backup, "via-backup").await;
        assert_eq!(
            named(&forwarded),
            Some(cluster.addr(primary)),
            "a backup's answer names the primary it forwarded to"
        );
        let direct = put(primary, "on-primary").await;
        assert_eq!(named(&direct), None, "the primary names nobody");
    });
}

#[test]
fn empty_and_binary_values_round_trip_on_every_server() {
    common::run(async {
        let (cluster, _) = common::start_healthy(3, &[]).await;
        let client = common::client(&cluster).await;
        let binary: Vec<u8> = (0..=255u8).collect();
        client.put(bytes("empty"), bytes("")).await.unwrap();
        client
            .put(binary.clone(), binary.clone())
            .await
            .expect("keys and values are arbitrary bytes");
        for rank in 0..cluster.len() {
            let reader = pinned(&cluster, rank).await;
            assert_eq!(
                reader.get(bytes("empty")).await.unwrap(),
                Some(bytes("")),
                "server {rank}: an empty value is a value, not an absent key"
            );
            assert_eq!(
                reader.get(binary.clone()).await.unwrap().as_deref(),
                Some(&binary[..]),
                "server {rank}: binary key and value come back byte for byte"
            );
        }
    });
}

#[test]
fn many_keys_written_at_random_servers_are_on_every_server() {
    common::run(async {
        let (cluster, _) = common::start_healthy(3, &[]).await;
        let client = common::client(&cluster).await;
        let mut expected = Expected::new();
        common::put_fresh(&client, "many", 200, &mut expected).await;
        // Overwrite and delete some, so the check covers the latest value and
        // tombstones, not just first writes.
        for i in (0..200).step_by(10) {
            let key = format!("many-{i:04}");
            let old = client.put(bytes(&key), bytes("rewritten")).await.unwrap();
            assert_eq!(old.as_deref(), expected[&key].as_deref().map(str::as_bytes));
            expected.insert(key, Some("rewritten".into()));
        }
        for i in (5..200).step_by(10) {
            let key = format!("many-{i:04}");
            assert!(client.delete(bytes(&key)).await.unwrap().is_some());
            expected.insert(key, None);
        }
        common::assert_every_server_reads(&cluster, 0..cluster.len(), &expected).await;
    });
}
