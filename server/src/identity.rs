//! Cluster identity (docs/design.md §10): the id a cluster gets once, at its explicit bootstrap,
//! and that every data directory of the cluster stores and every peer message carries.
//!
//! A server that holds no state has no id. It learns its cluster's id from a peer that has
//! one, and until it has rejoined through a state transfer it is *amnesiac*: it has forgotten
//! its Paxos promises and its data, so it neither votes, nor serves, nor acts as a source.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// Metadata header carrying the sender's cluster id on every peer request.
pub const CLUSTER_HEADER: &str = "replikv-cluster";

/// 128 random bits from the operating system, never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(u128);

impl ClusterId {
    /// A new id from the operating system's randomness.
    pub fn generate() -> Result<ClusterId, getrandom::Error> {
        loop {
            let mut raw = [0u8; 16];
            getrandom::fill(&mut raw)?;
            let id = u128::from_le_bytes(raw);
            if id != 0 {
                return Ok(ClusterId(id));
            }
        }
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a cluster id is 32 hexadecimal digits, not {0:?}")]
pub struct BadClusterId(String);

impl FromStr for ClusterId {
    type Err = BadClusterId;

    fn from_str(s: &str) -> Result<ClusterId, BadClusterId> {
        let bad = || BadClusterId(s.chars().take(64).collect());
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        match u128::from_str_radix(s, 16) {
            Ok(0) | Err(_) => Err(bad()),
            Ok(v) => Ok(ClusterId(v)),
        }
    }
}

impl Serialize for ClusterId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ClusterId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ClusterId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a data directory stores about its cluster (`m/cluster`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub cluster: ClusterId,
    /// `Some(e)` while this server is amnesiac: it joined the cluster with its state lost,
    /// when the highest epoch or ballot it heard of was `e`. It votes again only once it has
    /// been installed, through a state transfer, as a member of a view newer than `e`: every
    /// Paxos instance it may have taken part in before it lost its state was then decided.
    pub amnesiac_until: Option<u64>,
}

/// This server's cluster id, once known: set at most once (at bootstrap, from the data
/// directory, or when an empty server learns it), read by the network on every call.
#[derive(Debug, Default)]
pub struct Identity(OnceLock<ClusterId>);

impl Identity {
    pub fn get(&self) -> Option<ClusterId> {
        self.0.get().copied()
    }

    /// Sets the id; false if another id was set already (the first one stays).
    pub fn set(&self, id: ClusterId) -> bool {
        *self.0.get_or_init(|| id) == id
    }

    /// Whether a peer's header value `theirs` names this server's cluster. A server without
    /// an id (or a request without one) matches nothing.
    pub fn matches(&self, theirs: Option<&str>) -> bool {
        match (self.get(), theirs.map(str::parse::<ClusterId>)) {
            (Some(ours), Some(Ok(theirs))) => ours == theirs,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_differ() {
        let a = ClusterId::generate().unwrap();
        let b = ClusterId::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(a.to_string().parse::<ClusterId>(), Ok(a));
        let m = Membership {
            cluster: a,
            amnesiac_until: Some(7),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Membership>(&json).unwrap(), m);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in ["", "xyz", &"0".repeat(32), &"f".repeat(31), &"g".repeat(32)] {
            assert!(bad.parse::<ClusterId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_is_set_once_and_matches_only_itself() {
        let i = Identity::default();
        assert!(!i.matches(Some("0000000000000000000000000000000a")));
        let a: ClusterId = "0000000000000000000000000000000a".parse().unwrap();
        let b: ClusterId = "0000000000000000000000000000000b".parse().unwrap();
        assert!(i.set(a));
        assert!(!i.set(b));
        assert_eq!(i.get(), Some(a));
        assert!(i.matches(Some("0000000000000000000000000000000a")));
        assert!(!i.matches(Some("0000000000000000000000000000000b")));
        assert!(!i.matches(None));
        assert!(!i.matches(Some("garbage")));
    }
}
