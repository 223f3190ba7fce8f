//! `replikv shell`: commands on stdin, one per line; one answer line per command, in order.
//!
//! ```text
//! PUT k v      ->  PUT k found | PUT k not_found      (whether k had a value)
//! SWAP k v     ->  SWAP k <old value> | SWAP k null
//! GET k        ->  GET k <value> | GET k null
//! DELETE k     ->  DELETE k found | DELETE k not_found
//! SCAN a b     ->  SCAN a b BEGIN, then `  k v` for each key from a to b (both
//!                  inclusive) in key order, then SCAN END
//! STOP         ->  STOP, then the shell exits
//! ```
//!
//! Command names are case-insensitive; empty lines are skipped and runs of blanks count as
//! one. A malformed line, or a command the cluster could not serve, gets one line
//! `ERROR <the line>: <why>` and the shell goes on (a SCAN that fails answers only that
//! line, never part of its keys). Commands run one at a time, so answers
//! come in the order of the commands. The end of the input ends the shell as STOP does.

use std::io::Write;

use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::{Client, Error};

/// One parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Put { key: String, value: String },
    Swap { key: String, value: String },
    Get { key: String },
    Delete { key: String },
    Scan { from: String, to: String },
    Stop,
}

/// Parses one line: `Ok(None)` for a blank line, `Err(why)` for a malformed one.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((name, args)) = words.split_first() else {
        return Ok(None);
    };
    let name = name.to_ascii_uppercase();
    let want = |n: usize, usage: &str| {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!(
                "{name} takes {n} argument{} ({usage}), got {}",
                if n == 1 { "" } else { "s" },
                args.len()
            ))
        }
    };
    let command = match name.as_str() {
        "PUT" => {
            want(2, "PUT key value")?;
            Command::Put {
                key: args[0].into(),
                value: args[1].into(),
            }
        }
        "SWAP" => {
            want(2, "SWAP key value")?;
            Command::Swap {
                key: args[0].into(),
                value: args[1].into(),
            }
        }
        "GET" => {
            want(1, "GET key")?;
            Command::Get {
                key: args[0].into(),
            }
        }
        "DELETE" => {
            want(1, "DELETE key")?;
            Command::Delete {
                key: args[0].into(),
            }
        }
        "SCAN" => {
            want(2, "SCAN from to")?;
            Command::Scan {
                from: args[0].into(),
                to: args[1].into(),
            }
        }
        "STOP" => {
            want(0, "STOP")?;
            Command::Stop
        }
        _ => {
            return Err(format!(
                "unknown command {name} (PUT, SWAP, GET, DELETE, SCAN or STOP)"
            ))
        }
    };
    Ok(Some(command))
}

/// Runs commands from `input` against `client` until STOP or the end of the input,
/// writing one answer line per command to `out` (flushed after each, for programs that
/// wait for an answer before they send the next command). Fails only if `input` cannot
/// be read or `out` written.
pub async fn run(
    client: &Client,
    input: impl AsyncBufRead + Unpin,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut lines = input.lines();
    while let Some(line) = lines.next_line().await? {
        let answer = match parse(&line) {
            Ok(None) => continue,
            Ok(Some(Command::Stop)) => {
                writeln!(out, "STOP")?;
                out.flush()?;
                return Ok(());
            }
            Ok(Some(command)) => execute(client, &command)
                .await
                .unwrap_or_else(|e| format!("ERROR {}: {e}", line.trim())),
            Err(why) => format!("ERROR {}: {why}", line.trim()),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// Keys per page of a SCAN.
const SCAN_PAGE: u32 = 1000;

/// One command's answer line (a SCAN's answer spans several).
async fn execute(client: &Client, command: &Command) -> Result<String, Error> {
    let bytes = |s: &str| Bytes::copy_from_slice(s.as_bytes());
    let text = |v: Option<Bytes>| match v {
        Some(v) => String::from_utf8_lossy(&v).into_owned(),
        None => "null".to_string(),
    };
    let found = |v: &Option<Bytes>| if v.is_some() { "found" } else { "not_found" };
    Ok(match command {
        Command::Put { key, value } => {
            let old = client.put(bytes(key), bytes(value)).await?;
            format!("PUT {key} {}", found(&old))
        }
        Command::Swap { key, value } => {
            let old = client.put(bytes(key), bytes(value)).await?;
            format!("SWAP {key} {}", text(old))
        }
        Command::Get { key } => format!("GET {key} {}", text(client.get(bytes(key)).await?)),
        Command::Delete { key } => {
            let old = client.delete(bytes(key)).await?;
            format!("DELETE {key} {}", found(&old))
        }
        Command::Scan { from, to } => {
            let range = crate::Range::keys(bytes(from), bytes(to));
            let mut answer = format!("SCAN {from} {to} BEGIN\n");
            let mut pages = std::pin::pin!(client.scan_pages(range, SCAN_PAGE));
            while let Some(page) = futures::StreamExt::next(&mut pages).await {
                for (k, v) in page?.items {
                    answer.push_str(&format!(
                        "  {} {}\n",
                        String::from_utf8_lossy(&k),
                        String::from_utf8_lossy(&v)
                    ));
                }
            }
            answer.push_str("SCAN END");
            answer
        }
        Command::Stop => "STOP".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_with_any_blanks_and_case() {
        assert_eq!(parse("   "), Ok(None));
        assert_eq!(
            parse("  put   k1 \t v1 "),
            Ok(Some(Command::Put {
                key: "k1".into(),
                value: "v1".into()
            }))
        );
        assert_eq!(
            parse("SWAP a b"),
            Ok(Some(Command::Swap {
                key: "a".into(),
                value: "b".into()
            }))
        );
        assert_eq!(parse("GET a"), Ok(Some(Command::Get { key: "a".into() })));
        assert_eq!(
            parse("delete a"),
            Ok(Some(Command::Delete { key: "a".into() }))
        );
        assert_eq!(
            parse("scan a  b"),
            Ok(Some(Command::Scan {
                from: "a".into(),
                to: "b".into()
            }))
        );
        assert_eq!(parse("STOP"), Ok(Some(Command::Stop)));
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        let err = parse("PUT k").unwrap_err();
        assert!(err.contains("PUT takes 2 arguments"), "{err}");
        let err = parse("GET").unwrap_err();
        assert!(err.contains("GET takes 1 argument"), "{err}");
        let err = parse("STOP now").unwrap_err();
        assert!(err.contains("STOP takes 0 arguments"), "{err}");
        let err = parse("SCAN a").unwrap_err();
        assert!(err.contains("SCAN takes 2 arguments"), "{err}");
        let err = parse("FROB x").unwrap_err();
        assert!(err.contains("unknown command FROB"), "{err}");
    }
}
