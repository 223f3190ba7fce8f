//! What the nemesis run records: client operations with their fate, and the
//! nemesis' own actions, on one monotonic clock; written to and read back from
//! CSV so that a failed run can be re-checked and read after the fact.

use std::fmt;
use std::path::Path;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use replikv_lincheck::{Call, Nanos, Operation, Outcome};

/// The run's clock: nanoseconds since the run started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    /// Wall-clock time at the origin, to line the history up with the
    /// servers' logs (which are stamped in UTC).
    wall_origin: SystemTime,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            origin: Instant::now(),
            wall_origin: SystemTime::now(),
        }
    }

    pub fn wall_origin(&self) -> SystemTime {
        self.wall_origin
    }

    pub fn now(&self) -> Nanos {
        // u64 nanoseconds last 584 years; saturate rather than wrap anyway.
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// How a client operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Completed with this result (the value read, or the value replaced).
    Ok(Option<String>),
    /// May or may not have taken effect.
    Unknown(String),
    /// Definitely did not take effect (or, for a get, told nothing).
    Failed(String),
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub process: u64,
    pub key: String,
    pub call: Call,
    pub fate: Fate,
    pub invoke: Nanos,
    pub complete: Nanos,
}

impl Entry {
    /// The operation as the checker sees it; `None` when it constrains
    /// nothing (a definite failure).
    pub fn to_operation(&self) -> Option<Operation> {
        let outcome = match &self.fate {
            Fate::Ok(result) => Outcome::Ok(result.clone()),
            Fate::Unknown(_) => Outcome::Unknown,
            Fate::Failed(_) => return None,
        };
        Some(Operation {
            process: self.process,
            key: self.key.clone(),
            call: self.call.clone(),
            outcome,
            invoke: self.invoke,
            complete: self.complete,
        })
    }
}

/// One action of the nemesis, from when it was applied to when it was healed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NemesisEvent {
    pub start: Nanos,
    pub end: Nanos,
    pub description: String,
}

impl fmt::Display for NemesisEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:.3} s .. {:.3} s] {}",
            self.start as f64 / 1e9,
            self.end as f64 / 1e9,
            self.description
        )
    }
}

/// A whole recorded run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub entries: Vec<Entry>,
    pub nemesis: Vec<NemesisEvent>,
}

/// One CSV line: either a client operation or a nemesis event (`kind` =
/// `nemesis`, described in `error`).
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    invoke_ns: Nanos,
    complete_ns: Nanos,
    /// `get`, `put`, `delete` or `nemesis`.
    kind: String,
    process: Option<u64>,
    key: Option<String>,
    /// The value a put wrote.
    value: Option<String>,
    /// `ok`, `unknown`, `failed`, or empty for nemesis events.
    fate: String,
    /// For `ok`: whether the result is a value (it may be an empty string)
    /// rather than "absent".
    found: Option<bool>,
    result: Option<String>,
    /// Why an operation failed or is unknown; what a nemesis event did.
    detail: Option<String>,
}

impl History {
    pub fn operations(&self) -> Vec<Operation> {
        self.entries
            .iter()
            .filter_map(Entry::to_operation)
            .collect()
    }

    /// Writes the history as CSV, operations and nemesis events interleaved
    /// by start time.
    pub fn write_csv(&self, path: &Path) -> Result<(), csv::Error> {
        let mut rows: Vec<Row> = self
            .entries
            .iter()
            .map(|e| {
                let (kind, value) = match &e.call {
                    Call::Get => ("get", None),
                    Call::Put(v) => ("put", Some(v.clone())),
                    Call::Delete => ("delete", None),
                    // The chaos workload issues no compare-and-swap.
                    Call::Cas { .. } => ("cas", None),
                };
                let (fate, found, result, detail) = match &e.fate {
                    Fate::Ok(r) => ("ok", Some(r.is_some()), r.clone(), None),
                    Fate::Unknown(why) => ("unknown", None, None, Some(why.clone())),
                    Fate::Failed(why) => ("failed", None, None, Some(why.clone())),
                };
                Row {
                    invoke_ns: e.invoke,
                    complete_ns: e.complete,
                    kind: kind.to_owned(),
                    process: Some(e.process),
                    key: Some(e.key.clone()),
                    value,
                    fate: fate.to_owned(),
                    found,
                    result,
                    detail,
                }
            })
            .chain(self.nemesis.iter().map(|n| Row {
                invoke_ns: n.start,
                complete_ns: n.end,
                kind: "nemesis".to_owned(),
                process: None,
                key: None,
                value: None,
                fate: String::new(),
                found: None,
                result: None,
                detail: Some(n.description.clone()),
            }))
            .collect();
        rows.sort_by_key(|r| r.invoke_ns);
        let mut writer = csv::Writer::from_path(path)?;
        for row in rows {
            writer.serialize(row)?;
        }
        writer.flush()?;
        Ok(())
    }

    /// Reads a history written by [`History::write_csv`].
    pub fn read_csv(path: &Path) -> Result<History, Box<dyn std::error::Error + Send + Sync>> {
        let mut history = History::default();
        let mut reader = csv::Reader::from_path(path)?;
        for (line, row) in reader.deserialize::<Row>().enumerate() {
            let row = row?;
            // Line 1 is the header.
            let bad = |what: &str| format!("{}: line {}: {what}", path.display(), line + 2);
            if row.kind == "nemesis" {
                history.nemesis.push(NemesisEvent {
                    start: row.invoke_ns,
                    end: row.complete_ns,
                    description: row.detail.unwrap_or_default(),
                });
                continue;
            }
            let call = match (row.kind.as_str(), row.value) {
                ("get", _) => Call::Get,
                ("put", Some(v)) => Call::Put(v),
                ("delete", _) => Call::Delete,
                _ => {
                    return Err(
                        bad("expected kind get, put (with a value), delete or nemesis").into(),
                    )
                }
            };
            let detail = row.detail.unwrap_or_default();
            let fate = match (row.fate.as_str(), row.found) {
                ("ok", Some(true)) => Fate::Ok(Some(row.result.unwrap_or_default())),
                ("ok", Some(false)) => Fate::Ok(None),
                ("unknown", _) => Fate::Unknown(detail),
                ("failed", _) => Fate::Failed(detail),
                _ => return Err(bad("expected fate ok (with found), unknown or failed").into()),
            };
            history.entries.push(Entry {
                process: row.process.ok_or_else(|| bad("missing process"))?,
                key: row.key.ok_or_else(|| bad("missing key"))?,
                call,
                fate,
                invoke: row.invoke_ns,
                complete: row.complete_ns,
            });
        }
        Ok(history)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip_keeps_every_field() {
        let entry = |call, fate, invoke| Entry {
            process: 3,
            key: "k,1".into(),
            call,
            fate,
            invoke,
            complete: invoke + 10,
        };
        let history = History {
            entries: vec![
                entry(Call::Put("c3-1".into()), Fate::Ok(None), 5),
                entry(Call::Get, Fate::Ok(Some(String::new())), 20),
                entry(Call::Get, Fate::Ok(Some("c3-1".into())), 30),
                entry(Call::Delete, Fate::Unknown("timed out".into()), 40),
                entry(
                    Call::Put("c3-2\n\"x\"".into()),
                    Fate::Failed("unavailable".into()),
                    50,
                ),
            ],
            nemesis: vec![NemesisEvent {
                start: 10,
                end: 35,
                description: "kill -9 server 2".into(),
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.csv");
        history.write_csv(&path).unwrap();
        let back = History::read_csv(&path).unwrap();
        assert_eq!(back, history);
        assert_eq!(
            back.operations().len(),
            4,
            "the failed put constrains nothing"
        );
    }
}
