//! Users, their tokens and their namespaces (docs/design.md §13).
//!
//! A user's record is an ordinary replicated item in a domain no client key can reach: a
//! client's key `k` of user `u` is stored as `u \0 k`, and user names never contain `\0`,
//! so the records, kept under the key `\0a/<name>`, are apart from every namespace. They
//! travel with the data through replication, transfers and failovers.
//!
//! Every server keeps the records in memory as a table, loaded again from its store
//! whenever an applied batch touched one (the store counts those batches), so checking a
//! call costs a table lookup and one SHA-256 of its token, never a read of the store.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::storage::Store;
use crate::types::{user_item, ACCOUNT_ITEM_PREFIX};

pub use replikv_proto::ADMIN_USER;

/// Longest user name, in bytes.
pub const MAX_USER_NAME: usize = 64;
/// Shortest and longest token accepted, in characters.
pub const MIN_TOKEN_CHARS: usize = 32;
pub const MAX_TOKEN_CHARS: usize = 256;
/// Bytes a namespace adds in front of a user's key: the name and its `\0`.
pub const MAX_NAMESPACE_BYTES: usize = MAX_USER_NAME + 1;
/// The key (before `user_item`) under which user records are kept: `\0a/<name>`.
const ACCOUNT_KEY_PREFIX: &[u8] = b"\0a/";
/// Where a server that forms a cluster writes the admin token it generated, in its data
/// directory, when no `--admin-token-file` names a place.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Checks a user name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_USER_NAME {
        return Err(format!(
            "a user name has 1 to {MAX_USER_NAME} characters, not {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "a user name holds only A-Z a-z 0-9 . _ -, not {c:?}"
        ));
    }
    Ok(())
}

/// Checks a token: 32 to 256 visible ASCII characters.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_CHARS || token.len() > MAX_TOKEN_CHARS {
        return Err(format!(
            "a token has {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters, not {}",
            token.len()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token holds visible ASCII characters only".into());
    }
    Ok(())
}

/// A fresh token: 256 random bits from the operating system, as 64 hex digits.
pub fn generate_token() -> Result<String, getrandom::Error> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)?;
    Ok(hex(&raw))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn sha256(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The key (as the replica's write path takes it) of user `name`'s record.
pub fn account_key(name: &str) -> Bytes {
    [ACCOUNT_KEY_PREFIX, name.as_bytes()].concat().into()
}

/// A user's record as stored: the SHA-256 of its token, never the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub token_sha256: String,
    pub admin: bool,
}

impl Account {
    pub fn new(token: &str, admin: bool) -> Account {
        Account {
            token_sha256: hex(&sha256(token)),
            admin,
        }
    }

    pub fn encode(&self) -> Bytes {
        serde_json::to_vec(self)
            .expect("an account always serializes")
            .into()
    }

    fn decode(raw: &[u8]) -> Option<Account> {
        serde_json::from_slice(raw).ok()
    }
}

/// Who a call speaks for, once its credentials were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: Arc<str>,
    pub admin: bool,
    /// The SHA-256 the call's token hashed to: a pipelined operation checks that the user
    /// still holds it.
    token_sha256: String,
    /// `name \0`: what every key of this user is stored behind.
    namespace: Bytes,
}

impl Principal {
    fn new(name: &str, account: &Account) -> Principal {
        Principal {
            name: name.into(),
            admin: account.admin,
            token_sha256: account.token_sha256.clone(),
            namespace: [name.as_bytes(), b"\0"].concat().into(),
        }
    }

    /// The stored key of this user's key `key`.
    pub fn key(&self, key: &[u8]) -> Bytes {
        [&self.namespace[..], key].concat().into()
    }

    /// This user's key of a stored key; `None` for another namespace's.
    pub fn own_key<'a>(&self, stored: &'a [u8]) -> Option<&'a [u8]> {
        stored.strip_prefix(&self.namespace[..])
    }

    pub fn namespace(&self) -> &[u8] {
        &self.namespace
    }
}

/// The user table of one server (see the module doc).
pub struct Users {
    /// Off only with `--no-auth`: every call then speaks for the admin user.
    enabled: bool,
    /// `std::sync::RwLock`: read on every call, replaced whole when a record changed, never
    /// held across an await.
    table: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    /// The store's account version this table was loaded at (0: never loaded).
    version: u64,
    accounts: Arc<HashMap<String, Account>>,
}

fn unauthenticated(message: impl Into<String>) -> Status {
    Status::unauthenticated(message.into())
}

impl Users {
    pub fn new(enabled: bool) -> Users {
        Users {
            enabled,
            table: RwLock::new(Table::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Every user, as this server's store holds them now.
    pub fn accounts(&self, store: &Store) -> Result<Arc<HashMap<String, Account>>, Status> {
        let version = store.accounts_version();
        {
            let t = self.table.read().expect("user table lock poisoned");
            if t.version == version {
                return Ok(t.accounts.clone());
            }
        }
        // Read after the version: a change meanwhile leaves a newer version, and the next
        // call loads again.
        let accounts = Arc::new(
            load(store)
                .map_err(|e| Status::unavailable(format!("cannot read the user table: {e}")))?,
        );
        let mut t = self.table.write().expect("user table lock poisoned");
        if t.version < version {
            *t = Table {
                version,
                accounts: accounts.clone(),
            };
        }
        Ok(accounts)
    }

    /// The user a call's metadata names, if its token is that user's.
    pub fn authenticate(&self, store: &Store, md: &MetadataMap) -> Result<Principal, Status> {
        if !self.enabled {
            return Ok(Principal::new(
                ADMIN_USER,
                &Account {
                    token_sha256: String::new(),
                    admin: true,
                },
            ));
        }
        let name = md
            .get(replikv_proto::USER_HEADER)
            .map(|v| v.to_str().unwrap_or(""));
        let token = md
            .get(replikv_proto::AUTHORIZATION_HEADER)
            .map(|v| v.to_str().unwrap_or(""));
        let (name, token) = match (name, token) {
            (Some(n), Some(t)) => (n, t),
            _ => {
                return Err(unauthenticated(
                    "no credentials: this cluster serves known users only; set REPLIKV_USER \
                     and REPLIKV_TOKEN (headers `replikv-user` and `authorization: Bearer \
                     <token>`)",
                ))
            }
        };
        let Some(token) = token.strip_prefix("Bearer ") else {
            return Err(unauthenticated(
                "the `authorization` header must read `Bearer <token>`",
            ));
        };
        let accounts = self.accounts(store)?;
        if accounts.is_empty() {
            // Every formed cluster holds the admin user: this server has not found its
            // cluster's data yet (forming, or catching up after a lost disk). Another server,
            // or this one a little later, can answer.
            return Err(Status::unavailable(
                "this server holds no users yet: its cluster is forming or it is catching up",
            ));
        }
        match accounts.get(name) {
            // A digest of a digest: comparing them leaks nothing usable about the token.
            Some(a) if a.token_sha256 == hex(&sha256(token)) => Ok(Principal::new(name, a)),
            _ => Err(unauthenticated(format!(
                "unknown user {name:?} or wrong token"
            ))),
        }
    }

    /// Whether this server holds no user table yet (no cluster data at all).
    pub fn holds_none(&self, store: &Store) -> bool {
        self.enabled && self.accounts(store).is_ok_and(|a| a.is_empty())
    }

    /// The user a call's metadata names, who must be an admin: `what` names the call in
    /// the refusal.
    pub fn admin(&self, store: &Store, md: &MetadataMap, what: &str) -> Result<Principal, Status> {
        let p = self.authenticate(store, md)?;
        require_admin(&p, what)?;
        Ok(p)
    }

    /// Checks again that the user of an open `Pipeline` call still exists with the token it
    /// opened the call with.
    pub fn still_valid(&self, store: &Store, p: &Principal) -> Result<(), Status> {
        if !self.enabled {
            return Ok(());
        }
        match self.accounts(store)?.get(&*p.name) {
            Some(a) if a.token_sha256 == p.token_sha256 => Ok(()),
            _ => Err(unauthenticated(format!(
                "user {:?} was removed or its token changed",
                p.name
            ))),
        }
    }

    /// Whether a forwarded write's stored key belongs to a user that exists here, or to the
    /// user records themselves: the primary refuses writes of a removed user even when a
    /// backup that has not heard of the removal forwards them.
    pub fn check_stored_key(&self, store: &Store, key: &[u8]) -> Result<(), Status> {
        if !self.enabled || key.starts_with(ACCOUNT_KEY_PREFIX) {
            return Ok(());
        }
        let name = key
            .iter()
            .position(|&b| b == 0)
            .and_then(|i| std::str::from_utf8(&key[..i]).ok());
        match name {
            Some(name) if self.accounts(store)?.contains_key(name) => Ok(()),
            _ => Err(unauthenticated(
                "the user of this write does not exist (any more)",
            )),
        }
    }
}

/// Every user record in `store`.
fn load(store: &Store) -> Result<HashMap<String, Account>, crate::error::StorageError> {
    let start = user_item(ACCOUNT_KEY_PREFIX);
    let mut end = ACCOUNT_ITEM_PREFIX.to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    let end = Bound::Excluded(Bytes::from(end));
    let mut from = Bound::Included(start);
    let mut accounts = HashMap::new();
    loop {
        let page = store.scan(from, end.clone(), 1000)?;
        for (item, value) in page.live() {
            let name = &item[ACCOUNT_ITEM_PREFIX.len()..];
            if let (Ok(name), Some(a)) = (std::str::from_utf8(name), Account::decode(value)) {
                accounts.insert(name.to_string(), a);
            }
        }
        match page.entries.last() {
            Some((last, _)) if !page.exhausted => from = Bound::Excluded(last.clone()),
            _ => return Ok(accounts),
        }
    }
}

/// The admin token a forming cluster's first user gets: read from `file` when it exists,
/// else generated and written there (or to `<data_dir>/admin-token`), readable by its owner
/// only. Returns the token and the file it is in.
pub fn admin_token(file: Option<&Path>, data_dir: &Path) -> Result<(String, PathBuf), String> {
    let path = file.map_or_else(|| data_dir.join(ADMIN_TOKEN_FILE), Path::to_path_buf);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim().to_string();
            check_token(&token).map_err(|e| format!("admin token file {}: {e}", path.display()))?;
            Ok((token, path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = generate_token().map_err(|e| format!("no randomness for a token: {e}"))?;
            write_secret(&path, &token)
                .map_err(|e| format!("cannot write the admin token to {}: {e}", path.display()))?;
            Ok((token, path))
        }
        Err(e) => Err(format!(
            "cannot read admin token file {}: {e}",
            path.display()
        )),
    }
}

/// Writes `secret` (and a newline) to a new file only its owner may read.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    writeln!(f, "{secret}")?;
    f.sync_all()
}

/// Refuses `what` unless `p` is an admin user.
pub fn require_admin(p: &Principal, what: &str) -> Result<(), Status> {
    if p.admin {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "{what} needs the admin user; {:?} is not one",
        p.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tokens_are_checked() {
        assert!(check_name("alice").is_ok());
        assert!(check_name("a.b_c-9").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        assert!(check_name("a\0b").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_token(&"t".repeat(32)).is_ok());
        assert!(check_token(&"t".repeat(31)).is_err());
        assert!(check_token(&format!("{} ", "t".repeat(32))).is_err());
        let t = generate_token().unwrap();
        assert_eq!(t.len(), 64);
        assert!(check_token(&t).is_ok());
    }

    #[test]
    fn namespaces_do_not_overlap_and_records_are_apart() {
        let a = Principal::new("a", &Account::new(&"t".repeat(32), false));
        let ab = Principal::new("ab", &Account::new(&"t".repeat(32), false));
        // "a" + "b..." must not read as user "ab"'s keys, nor the other way round.
        assert_eq!(a.own_key(&ab.key(b"k")), None);
        assert_eq!(ab.own_key(&a.key(b"bk")), None);
        assert_eq!(a.own_key(&a.key(b"k")), Some(&b"k"[..]));
        // No user's stored key is a record's key.
        assert!(!a.key(b"").starts_with(ACCOUNT_KEY_PREFIX));
        assert!(user_item(&account_key("alice")).starts_with(ACCOUNT_ITEM_PREFIX));
    }

    #[test]
    fn records_hold_a_digest_of_the_token() {
        let token = "t".repeat(40);
        let a = Account::new(&token, true);
        assert_eq!(a.token_sha256.len(), 64);
        assert!(!a.token_sha256.contains(&token));
        assert_eq!(Account::decode(&a.encode()), Some(a));
    }
}
