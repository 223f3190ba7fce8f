//! The key layout of the sled tree (docs/design.md §3) and how values are encoded:
//!
//! - `d/<item>` -> `lsn (be64) | flag | value`: the current entry of a user or session item
//!   (flag 1 = value, 0 = tombstone).
//! - `m/...`: view, promise, accepted proposal, log position (applied / committed / last
//!   record epoch), cluster membership and collection horizon, as JSON.
//!
//! The `l/` lsn index of docs/design.md §3 is not stored: see [`super::index`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::types::Entry;

pub(super) const DATA: &[u8] = b"d/";
pub(super) const VIEW: &[u8] = b"m/view";
pub(super) const PROMISE: &[u8] = b"m/promise";
pub(super) const ACCEPTED: &[u8] = b"m/accepted";
pub(super) const POSITION: &[u8] = b"m/position";
pub(super) const CLUSTER: &[u8] = b"m/cluster";
pub(super) const GC_HORIZON: &[u8] = b"m/gc";

pub(super) fn data_key(item: &[u8]) -> Vec<u8> {
    [DATA, item].concat()
}

pub(super) fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + e.value.as_ref().map_or(0, |v| v.len()));
    v.extend_from_slice(&e.lsn.to_be_bytes());
    match &e.value {
        Some(val) => {
            v.push(1);
            v.extend_from_slice(val);
        }
        None => v.push(0),
    }
    v
}

pub(super) fn decode_entry(raw: &[u8]) -> Result<Entry, StorageError> {
    if raw.len() < 9 {
        return Err(StorageError::Corrupt("short entry".into()));
    }
    let lsn = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
    let value = match raw[8] {
        1 => Some(Bytes::copy_from_slice(&raw[9..])),
        0 => None,
        f => return Err(StorageError::Corrupt(format!("entry flag {f}"))),
    };
    Ok(Entry { lsn, value })
}

pub(super) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("meta types always serialize")
}

pub(super) fn unjson<T: for<'a> Deserialize<'a>>(
    raw: &[u8],
    what: &str,
) -> Result<T, StorageError> {
    serde_json::from_slice(raw).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_bad_ones_are_refused() {
        for e in [
            Entry {
                lsn: 7,
                value: Some(Bytes::from_static(b"v")),
            },
            Entry {
                lsn: u64::MAX >> 1,
                value: Some(Bytes::new()),
            },
            Entry {
                lsn: 3,
                value: None,
            },
        ] {
            assert_eq!(decode_entry(&encode_entry(&e)).unwrap(), e);
        }
        assert!(decode_entry(&[0; 8]).is_err(), "short");
        assert!(
            decode_entry(&[0, 0, 0, 0, 0, 0, 0, 1, 2]).is_err(),
            "bad flag"
        );
        assert_eq!(data_key(b"k"), b"d/k".to_vec());
    }
}
