//! replikv-sim: N replicas running the server's own protocol engine inside a deterministic
//! simulation of the network, the disks and the clocks (docs/simulator.md). Every fault is
//! drawn from one seeded generator and every event goes through one ordered queue, so a seed
//! replays exactly; the invariants of docs/design.md §8 are checked as the run goes and at
//! its end.
//!
//! - [`disk`]: a server's disk: synced and unsynced writes, crash, torn tail, wipe.
//! - [`node`]: the simulated replica, an event-driven mirror of `replikv_server::replica`
//!   that takes every decision through `replikv_server::engine`.
//! - [`rng`]: the seeded generator.
//! - this module: the world (event queue, network, clocks, faults, clients) and the checks.

pub mod disk;
pub mod node;
pub mod rng;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use replikv_lincheck::{self as lincheck, Call as LCall, Operation, Outcome as LOutcome};
use replikv_server::config::Timing;
use replikv_server::engine::{Now, Time};
use replikv_server::message::RequestId;
use replikv_server::types::{user_item, Rank};

use disk::Disk;
use node::{Answer, ClientReq, Ctx, Msg, Node, Obs, Out, ReplyTo, TimerKind};
use rng::Rng;

/// What one run simulates.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub servers: usize,
    pub clients: usize,
    /// How long faults and client load last; a quiet healing period follows.
    pub duration: Duration,
    /// Keep a readable trace of events (for a failing seed).
    pub trace: bool,
    /// Stop adding to the trace after this simulated time (the culprit of a
    /// linearizability violation found at the end), so the trace shows what led to it.
    pub trace_until: Option<Duration>,
    /// A retrying proxy on the append stream: a message whose receiver is paused past
    /// [`PROXY_RETRY_AFTER`] after it arrived is sent again, and the copy waits behind the
    /// original until the receiver resumes (docs/simulator.md, "Retried appends"). Off by
    /// default, so every seed of the default fault model replays as before.
    pub proxy_retries: bool,
}

impl Config {
    pub fn new(seed: u64) -> Config {
        Config {
            seed,
            servers: 5,
            clients: 8,
            duration: Duration::from_secs(60),
            trace: false,
            trace_until: None,
            proxy_retries: false,
        }
    }
}

/// How long the retrying proxy ([`Config::proxy_retries`]) waits for an answer before it
/// sends an append again: under the primary's ack timeout (250 ms), as a per-try timeout is.
pub const PROXY_RETRY_AFTER: Duration = Duration::from_millis(200);

/// How long the cluster is left without faults at the end before convergence is checked.
pub const HEAL: Duration = Duration::from_secs(15);
const KEYS: u64 = 8;

/// What one run found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub trace_hash: u64,
    pub violations: Vec<String>,
    /// Simulated time when the first violation was seen.
    pub violation_at: Option<Duration>,
    pub simulated: Duration,
    pub ops: usize,
    pub acked_writes: usize,
    pub events: u64,
    /// The cluster had not settled at the end (liveness, not safety): convergence unchecked.
    pub unsettled: bool,
    /// The last events before the first violation (with `trace`).
    pub trace: Vec<String>,
    /// When the culprit of a linearizability violation completed.
    pub culprit_at: Option<Duration>,
    /// Appends the retrying proxy sent again ([`Config::proxy_retries`]).
    pub proxy_retries: u64,
}

enum Ev {
    Deliver(Rank, Rank, Msg),
    /// The retrying proxy's copy of an append (never retried itself).
    Retried(Rank, Rank, Msg),
    Timer(Rank, u64, TimerKind),
    ClientNext(usize),
    ClientAnswer(usize, u64, Answer),
    ClientTimeout(usize, u64),
    ClientRetry(usize, u64),
    Fault,
    Restart(Rank),
    Heal(u64),
    End,
}

#[derive(Clone, Debug)]
enum OpKind {
    Get,
    Put(String),
    Delete,
}

struct ClientOp {
    key: u64,
    kind: OpKind,
    invoke: u64,
    deadline: u64,
    seq: u64,
    /// A write attempt may have taken effect.
    maybe_applied: bool,
}

struct Client {
    seq: u64,
    attempt: u64,
    op: Option<ClientOp>,
}

struct Server {
    node: Option<Node>,
    /// The disk of a server that is down.
    disk: Option<Disk>,
    rate: f64,
    paused_until: u64,
    incarnation: u64,
    last_epoch: u64,
    wiped: bool,
}

/// The simulated world.
pub struct Sim {
    cfg: Config,
    timing: Timing,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    servers: Vec<Server>,
    /// `cut[a][b]`: messages from a to b are lost.
    cut: Vec<Vec<bool>>,
    cut_id: u64,
    stream_at: Vec<Vec<u64>>,
    drop_p: f64,
    fsync_fail: f64,
    clients: Vec<Client>,
    history: Vec<Operation>,
    acked: Vec<(u64, String, u64)>,
    epoch_primary: BTreeMap<u64, Rank>,
    hash: u64,
    report: Report,
    trace: VecDeque<String>,
    faults_until: u64,
    /// How many trace lines are kept (`REPLIKV_SIM_TRACE_LINES`, default 150).
    trace_lines: usize,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

impl Sim {
    pub fn new(cfg: Config) -> Sim {
        let mut rng = Rng::new(cfg.seed);
        let n = cfg.servers;
        let timing = Timing {
            lease: Duration::from_millis(500),
            heartbeat: Duration::from_millis(100),
            ack_timeout: Duration::from_millis(250),
        };
        let servers = (0..n)
            .map(|_| Server {
                node: None,
                disk: Some(Disk::default()),
                // Clock rates drift within eps (10 %) of each other: ±4 % each.
                rate: 0.96 + 0.08 * rng.unit(),
                paused_until: 0,
                incarnation: 0,
                last_epoch: 0,
                wiped: false,
            })
            .collect();
        let clients = (0..cfg.clients)
            .map(|_| Client {
                seq: 0,
                attempt: 0,
                op: None,
            })
            .collect();
        let faults_until = ns(cfg.duration);
        Sim {
            timing,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            servers,
            cut: vec![vec![false; n]; n],
            cut_id: 0,
            stream_at: vec![vec![0; n]; n],
            drop_p: 0.0,
            fsync_fail: 0.0,
            clients,
            history: Vec::new(),
            acked: Vec::new(),
            epoch_primary: BTreeMap::new(),
            hash: 0xcbf2_9ce4_8422_2325,
            report: Report {
                seed: cfg.seed,
                ..Default::default()
            },
            trace: VecDeque::new(),
            faults_until,
            trace_lines: std::env::var("REPLIKV_SIM_TRACE_LINES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(150),
            cfg,
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn mix(&mut self, x: u64) {
        self.hash = (self.hash ^ x).wrapping_mul(0x0100_0000_01b3);
    }

    fn note(&mut self, f: impl FnOnce() -> String) {
        let frozen = self.cfg.trace_until.is_some_and(|u| self.now > ns(u));
        if self.cfg.trace && !frozen {
            let line = format!("{:>10.4}s {}", self.now as f64 / 1e9, f());
            self.trace.push_back(line);
            if self.trace.len() > self.trace_lines {
                self.trace.pop_front();
            }
        }
    }

    fn violation(&mut self, what: String) {
        self.note(|| format!("VIOLATION: {what}"));
        if self.report.violation_at.is_none() {
            self.report.violation_at = Some(Duration::from_nanos(self.now));
            self.report.trace = self.trace.iter().cloned().collect();
        }
        self.report.violations.push(what);
    }

    fn local_now(&self, r: Rank) -> Now {
        let t = (self.now as f64 * self.servers[r as usize].rate) as u64;
        Now::at(Time::from_nanos(t + 1_000_000_000))
    }

    /// Runs one server step with its context, then carries out what it asked for.
    fn step(&mut self, r: Rank, f: impl FnOnce(&mut Node, &mut Ctx) -> Result<(), node::Stop>) {
        let now = self.local_now(r);
        let fsync_fail = self.fsync_fail;
        let mut cx = Ctx {
            now,
            rng: &mut self.rng,
            fsync_fail,
            out: Vec::new(),
            obs: Vec::new(),
        };
        let s = &mut self.servers[r as usize];
        let Some(node) = s.node.as_mut() else { return };
        let _ = f(node, &mut cx);
        let epoch = node.st.view.epoch;
        let (out, obs) = (cx.out, cx.obs);
        if out.iter().any(|o| matches!(o, Out::FailStop)) {
            self.note(|| format!("n{r} fsync failed: fail-stop"));
            self.crash(r, false);
            let t = self.now + ns(Duration::from_millis(self.rng.range(500, 3000)));
            self.at(t, Ev::Restart(r));
            return;
        }
        if epoch < self.servers[r as usize].last_epoch {
            let last = self.servers[r as usize].last_epoch;
            self.violation(format!("n{r}: epoch went back from {last} to {epoch}"));
        }
        self.servers[r as usize].last_epoch = epoch;
        for o in obs {
            match o {
                Obs::Commit { epoch, committed } => {
                    self.note(|| format!("n{r} commits up to {committed} in epoch {epoch}"));
                    match self.epoch_primary.get(&epoch) {
                        Some(&p) if p != r => self.violation(format!(
                            "two primaries committed in epoch {epoch}: n{p} and n{r}"
                        )),
                        _ => {
                            self.epoch_primary.insert(epoch, r);
                        }
                    }
                }
                Obs::Sequenced { epoch, lsn } => {
                    self.note(|| format!("n{r} sequenced lsn {lsn} in epoch {epoch}"))
                }
            }
        }
        let rate = self.servers[r as usize].rate;
        let inc = self.servers[r as usize].incarnation;
        for o in out {
            match o {
                Out::Send(to, m) => self.send(r, to, m),
                Out::Timer(d, k) => {
                    let t = self.now + (ns(d) as f64 / rate) as u64 + 1;
                    self.at(t, Ev::Timer(r, inc, k));
                }
                Out::Answer(ReplyTo::Client { client, attempt }, a) => {
                    let t = self.now + self.rng.range(50_000, 500_000);
                    self.at(t, Ev::ClientAnswer(client, attempt, a));
                }
                Out::Answer(ReplyTo::Forward { to, call }, a) => {
                    self.send(r, to, Msg::ForwardReply(call, a))
                }
                Out::FailStop => {}
            }
        }
    }

    fn send(&mut self, from: Rank, to: Rank, m: Msg) {
        if self.cut[from as usize][to as usize] || self.rng.chance(self.drop_p) {
            self.note(|| format!("n{from}->n{to} {} lost", m.kind()));
            return;
        }
        let mut delay = self.rng.range(100_000, 1_000_000);
        if self.rng.chance(0.02) {
            delay += self.rng.range(5_000_000, 60_000_000);
        }
        let mut t = self.now + delay;
        if m.is_stream() {
            // One ordered stream: later messages never overtake earlier ones...
            let last = &mut self.stream_at[from as usize][to as usize];
            t = t.max(*last + 1);
            *last = t;
            // ...except a rare stray copy of an old one, late by up to three seconds (a
            // misbehaving network or proxy), which must change nothing.
            if self.rng.chance(0.01) {
                let t2 = t + self.rng.range(1_000_000, 3_000_000_000);
                self.at(t2, Ev::Deliver(from, to, m.clone()));
            }
        } else if self.rng.chance(0.01) {
            let t2 = t + self.rng.range(0, 5_000_000);
            self.at(t2, Ev::Deliver(from, to, m.clone()));
        }
        self.at(t, Ev::Deliver(from, to, m));
    }

    fn crash(&mut self, r: Rank, wipe: bool) {
        let s = &mut self.servers[r as usize];
        let Some(node) = s.node.take() else { return };
        let mut disk = node.disk;
        let kept = self.rng.range(0, disk.unsynced_len() as u64 + 1) as usize;
        disk.crash(kept);
        if wipe {
            disk.wipe();
            s.wiped = true;
            s.last_epoch = 0;
        }
        s.disk = Some(disk);
        s.incarnation += 1;
        s.paused_until = 0;
        for c in 0..self.cfg.servers {
            self.stream_at[r as usize][c] = 0;
            self.stream_at[c][r as usize] = 0;
        }
    }

    fn boot(&mut self, r: Rank) {
        let now = self.local_now(r);
        let timing = self.timing;
        let n = self.cfg.servers;
        let s = &mut self.servers[r as usize];
        let Some(disk) = s.disk.take() else { return };
        let incarnation = s.incarnation;
        let mut cx = Ctx {
            now,
            rng: &mut self.rng,
            fsync_fail: 0.0,
            out: Vec::new(),
            obs: Vec::new(),
        };
        let node = Node::boot(r, n, timing, disk, incarnation, &mut cx);
        s.last_epoch = node.st.view.epoch;
        s.node = Some(node);
        let out = cx.out;
        let rate = s.rate;
        let inc = s.incarnation;
        for o in out {
            if let Out::Timer(d, k) = o {
                let t = self.now + (ns(d) as f64 / rate) as u64 + 1;
                self.at(t, Ev::Timer(r, inc, k));
            }
        }
    }

    /// Runs the whole seed.
    pub fn run(mut self) -> Report {
        for r in 0..self.cfg.servers as Rank {
            self.boot(r);
        }
        self.step(0, |n, cx| n.form_cluster(cx));
        for c in 0..self.cfg.clients {
            let t = self.rng.range(1_000_000_000, 2_000_000_000);
            self.at(t, Ev::ClientNext(c));
        }
        let t = ns(Duration::from_secs(3));
        self.at(t, Ev::Fault);
        let end = self.faults_until + ns(HEAL);
        self.at(end, Ev::End);
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            self.now = t;
            self.report.events += 1;
            self.mix(t);
            if matches!(ev, Ev::End) {
                break;
            }
            self.handle(ev);
            if self.report.violation_at.is_some() && !self.cfg.trace {
                break;
            }
            if self.report.violation_at.is_some()
                && self.now > self.report.violation_at.unwrap().as_nanos() as u64 + 1
            {
                break;
            }
        }
        if self.report.violations.is_empty() {
            self.finish();
        }
        self.report.simulated = Duration::from_nanos(self.now);
        self.report.trace_hash = self.hash;
        self.report.ops = self.history.len();
        self.report.acked_writes = self.acked.len();
        self.report
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver(from, to, m) => self.deliver(from, to, m, false),
            Ev::Retried(from, to, m) => self.deliver(from, to, m, true),
            Ev::Timer(r, inc, k) => {
                self.mix(r as u64 | 0x100);
                let s = &self.servers[r as usize];
                if s.incarnation != inc || s.node.is_none() {
                    return;
                }
                if s.paused_until > self.now {
                    let t = s.paused_until;
                    self.at(t, Ev::Timer(r, inc, k));
                    return;
                }
                if !matches!(k, TimerKind::Monitor | TimerKind::Heartbeat(..)) {
                    self.note(|| format!("n{r} timer {k:?}"));
                }
                self.step(r, |n, cx| n.on_timer(cx, k));
            }
            Ev::ClientNext(c) => self.client_next(c),
            Ev::ClientAnswer(c, attempt, a) => self.client_answer(c, attempt, a),
            Ev::ClientTimeout(c, attempt) => {
                self.client_answer(c, attempt, Answer::Unknown);
            }
            Ev::ClientRetry(c, a) => {
                if self.clients[c].attempt == a && self.clients[c].op.is_some() {
                    self.client_attempt(c);
                }
            }
            Ev::Fault => self.fault(),
            Ev::Restart(r) => {
                if self.servers[r as usize].node.is_none() {
                    self.note(|| format!("n{r} restarts"));
                    self.boot(r);
                }
            }
            Ev::Heal(id) => {
                if id == self.cut_id {
                    self.note(|| "network healed".into());
                    for row in &mut self.cut {
                        row.iter_mut().for_each(|c| *c = false);
                    }
                    self.drop_p = 0.0;
                }
            }
            Ev::End => {}
        }
    }

    /// A message reaches `to`. A paused receiver handles it when it resumes, after whatever
    /// reached it before. With [`Config::proxy_retries`], an append whose receiver stays
    /// paused past the proxy's per-try timeout is sent again (unless it is the copy): the
    /// copy reaches the receiver while the original still waits, so the receiver handles
    /// both when it resumes, the copy right after the original.
    fn deliver(&mut self, from: Rank, to: Rank, m: Msg, retried: bool) {
        self.mix(((from as u64) << 8 | to as u64) << 8 | m.kind().len() as u64);
        let s = &self.servers[to as usize];
        if s.node.is_none() {
            return;
        }
        if s.paused_until > self.now {
            let t = s.paused_until;
            let retry_at = self.now + ns(PROXY_RETRY_AFTER);
            if self.cfg.proxy_retries && !retried && matches!(m, Msg::Append(..)) && t > retry_at {
                self.report.proxy_retries += 1;
                self.note(|| format!("n{from}->n{to} append unanswered: the proxy sends it again"));
                self.at(retry_at, Ev::Retried(from, to, m.clone()));
            }
            let again = if retried {
                Ev::Retried(from, to, m)
            } else {
                Ev::Deliver(from, to, m)
            };
            self.at(t, again);
            return;
        }
        self.note(|| format!("n{from}->n{to} {m:?}").chars().take(240).collect());
        self.step(to, |n, cx| n.on_msg(cx, from, m));
    }

    // ----------------------------------------------------------------- faults

    fn fault(&mut self) {
        if self.now >= self.faults_until {
            // Heal: the network, the disks, every server back.
            self.note(|| "faults end: healing".into());
            for row in &mut self.cut {
                row.iter_mut().for_each(|c| *c = false);
            }
            self.cut_id += 1;
            self.drop_p = 0.0;
            self.fsync_fail = 0.0;
            for r in 0..self.cfg.servers {
                self.servers[r].paused_until = self.servers[r].paused_until.min(self.now);
                if self.servers[r].node.is_none() {
                    self.boot(r as Rank);
                }
            }
            return;
        }
        let n = self.cfg.servers;
        let r = self.rng.pick(n) as Rank;
        let roll = self.rng.range(0, 100);
        let up = self.servers[r as usize].node.is_some();
        let ms = |rng: &mut Rng, lo: u64, hi: u64| ns(Duration::from_millis(rng.range(lo, hi)));
        match roll {
            0..=19 if up => {
                self.note(|| format!("FAULT n{r} crashes"));
                self.crash(r, false);
                let t = self.now + ms(&mut self.rng, 200, 5000);
                self.at(t, Ev::Restart(r));
            }
            20..=24 if up && self.wipe_allowed(r) => {
                self.note(|| format!("FAULT n{r} loses its disk"));
                self.crash(r, true);
                let t = self.now + ms(&mut self.rng, 200, 3000);
                self.at(t, Ev::Restart(r));
            }
            25..=39 if up => {
                let d = ms(&mut self.rng, 50, 2000);
                self.note(|| format!("FAULT n{r} paused for {} ms", d / 1_000_000));
                self.servers[r as usize].paused_until = self.now + d;
            }
            40..=69 => {
                self.cut_id += 1;
                for row in &mut self.cut {
                    row.iter_mut().for_each(|c| *c = false);
                }
                let kind = self.rng.range(0, 3);
                let side: Vec<bool> = (0..n).map(|_| self.rng.chance(0.5)).collect();
                for a in 0..n {
                    for b in 0..n {
                        self.cut[a][b] = match kind {
                            0 => (a == r as usize) != (b == r as usize),
                            1 => side[a] != side[b],
                            _ => side[a] && !side[b],
                        };
                    }
                }
                let desc = ["isolated", "split", "one-way split"][kind as usize];
                self.note(|| format!("FAULT partition {desc} around n{r} {side:?}"));
                let t = self.now + ms(&mut self.rng, 300, 5000);
                let id = self.cut_id;
                self.at(t, Ev::Heal(id));
            }
            70..=79 => {
                self.cut_id += 1;
                self.drop_p = 0.02 + 0.2 * self.rng.unit();
                let p = self.drop_p;
                self.note(|| format!("FAULT message loss {p:.2}"));
                let t = self.now + ms(&mut self.rng, 300, 3000);
                let id = self.cut_id;
                self.at(t, Ev::Heal(id));
            }
            80..=84 => {
                self.fsync_fail = 0.01;
                self.note(|| "FAULT fsyncs may fail".into());
            }
            _ => {
                self.fsync_fail = 0.0;
            }
        }
        let t = self.now + ms(&mut self.rng, 300, 2500);
        self.at(t, Ev::Fault);
    }

    /// docs/design.md §10 promises safety with one lost disk at a time: a disk is wiped only when
    /// every other server holds its state (no other wiped server is still rejoining).
    fn wipe_allowed(&self, r: Rank) -> bool {
        self.servers.iter().enumerate().all(|(i, s)| {
            i == r as usize
                || (!s.wiped
                    || s.node
                        .as_ref()
                        .is_some_and(|n| n.st.amnesiac_until.is_none() && n.st.member))
        })
    }

    // ----------------------------------------------------------------- clients

    fn client_next(&mut self, c: usize) {
        if self.now >= self.faults_until {
            return;
        }
        let key = self.rng.range(0, KEYS);
        let roll = self.rng.range(0, 10);
        let cl = &mut self.clients[c];
        cl.seq += 1;
        let kind = match roll {
            0..=4 => OpKind::Get,
            5..=8 => OpKind::Put(format!("c{c}-{}", cl.seq)),
            _ => OpKind::Delete,
        };
        cl.op = Some(ClientOp {
            key,
            kind,
            invoke: self.now,
            deadline: self.now + ns(Duration::from_secs(3)),
            seq: cl.seq,
            maybe_applied: false,
        });
        self.client_attempt(c);
    }

    fn client_attempt(&mut self, c: usize) {
        let n = self.cfg.servers;
        let r = self.rng.pick(n) as Rank;
        let cl = &mut self.clients[c];
        cl.attempt += 1;
        let attempt = cl.attempt;
        let op = cl.op.as_ref().expect("in flight");
        let key = Bytes::from(format!("k{}", op.key));
        let req = match &op.kind {
            OpKind::Get => ClientReq::Get(key),
            k => {
                let value = match k {
                    OpKind::Put(v) => Some(Bytes::from(v.clone())),
                    _ => None,
                };
                if !matches!(op.kind, OpKind::Get) {
                    cl.op.as_mut().expect("in flight").maybe_applied = true;
                }
                let op = cl.op.as_ref().expect("in flight");
                ClientReq::Write(
                    key,
                    value,
                    RequestId {
                        client_id_hi: c as u64 + 1,
                        client_id: self.cfg.seed,
                        seq: op.seq,
                        first_unfinished: op.seq,
                    },
                )
            }
        };
        let t = self.now + ns(Duration::from_secs(1));
        self.at(t, Ev::ClientTimeout(c, attempt));
        let s = &self.servers[r as usize];
        if s.node.is_none() || s.paused_until > self.now {
            return;
        }
        self.note(|| format!("client {c} -> n{r} {req:?}"));
        let to = ReplyTo::Client { client: c, attempt };
        self.step(r, |n, cx| n.on_client(cx, to, req));
    }

    fn client_answer(&mut self, c: usize, attempt: u64, a: Answer) {
        let cl = &mut self.clients[c];
        if cl.attempt != attempt || cl.op.is_none() {
            return;
        }
        cl.attempt += 1;
        let op = cl.op.as_ref().expect("checked");
        let now = self.now;
        let done = match a {
            Answer::Ok(v) => Some(LOutcome::Ok(
                v.map(|b| String::from_utf8_lossy(&b).into_owned()),
            )),
            Answer::SessionUnknown => Some(LOutcome::Unknown),
            Answer::Unavailable | Answer::Unknown if now >= op.deadline => Some(LOutcome::Unknown),
            _ => None,
        };
        let Some(outcome) = done else {
            // Retry on another server (same session seq: applied at most once).
            let t = self.now + self.rng.range(5_000_000, 50_000_000);
            let a = self.clients[c].attempt;
            self.at(t, Ev::ClientRetry(c, a));
            return;
        };
        let cl = &mut self.clients[c];
        let op = cl.op.take().expect("checked");
        let call = match &op.kind {
            OpKind::Get => LCall::Get,
            OpKind::Put(v) => LCall::Put(v.clone()),
            OpKind::Delete => LCall::Delete,
        };
        if matches!(call, LCall::Get) && outcome == LOutcome::Unknown {
            // An unknown get constrains nothing.
        } else {
            if let (LOutcome::Ok(_), LCall::Put(v)) = (&outcome, &call) {
                self.acked.push((op.key, v.clone(), op.invoke));
            }
            let _ = op.maybe_applied;
            self.history.push(Operation {
                process: c as u64,
                key: format!("k{}", op.key),
                call,
                outcome,
                invoke: op.invoke,
                complete: now,
            });
        }
        let t = self.now + self.rng.range(10_000_000, 100_000_000);
        self.at(t, Ev::ClientNext(c));
    }

    // ----------------------------------------------------------------- end of run

    fn finish(&mut self) {
        // The newest primary, if the cluster settled.
        let primary = self
            .servers
            .iter()
            .filter_map(|s| s.node.as_ref())
            .filter(|n| n.st.primary.is_some())
            .max_by_key(|n| n.st.view.epoch);
        let settled = primary.filter(|p| {
            p.st.pos.committed == p.st.pos.applied
                && p.st.view.members.iter().all(|&m| {
                    self.servers[m as usize]
                        .node
                        .as_ref()
                        .is_some_and(|n| n.st.member && n.st.view.epoch == p.st.view.epoch)
                })
        });
        let end = self.now;
        if let Some(p) = settled {
            let items = p.user_items();
            let view = p.st.view.clone();
            let prank = p.me;
            for &m in &view.members {
                let other = self.servers[m as usize].node.as_ref().expect("member up");
                let theirs = other.user_items();
                if theirs != items {
                    self.violation(format!(
                        "replicas diverged after healing: n{m} and primary n{prank} of epoch {} hold different items",
                        view.epoch
                    ));
                    return;
                }
            }
            // A final read of every key at the primary: an acknowledged write that was
            // lost shows here.
            let finals: Vec<(u64, Option<String>)> = (0..KEYS)
                .map(|k| {
                    let v = p
                        .disk
                        .get(&user_item(format!("k{k}").as_bytes()))
                        .and_then(|e| e.value.clone());
                    (k, v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                })
                .collect();
            for (k, v) in &finals {
                self.history.push(Operation {
                    process: u64::MAX,
                    key: format!("k{k}"),
                    call: LCall::Get,
                    outcome: LOutcome::Ok(v.clone()),
                    invoke: end,
                    complete: end + 1,
                });
            }
            // Explicitly: an acknowledged put that every other write of its key precedes
            // (each completed before it was invoked) must be the key's final value.
            let acked = self.acked.clone();
            for (k, v, invoked) in acked {
                let later = self.history.iter().any(|o| {
                    o.key == format!("k{k}")
                        && !matches!(o.call, LCall::Get)
                        && o.call != LCall::Put(v.clone())
                        && (o.is_unknown() || o.complete > invoked)
                });
                let fin = &finals[k as usize].1;
                if !later && fin.as_deref() != Some(v.as_str()) {
                    self.violation(format!(
                        "acknowledged write lost: k{k}={v} acknowledged, final value {fin:?}"
                    ));
                    return;
                }
            }
        } else {
            self.report.unsettled = true;
        }
        let opts = lincheck::CheckOptions {
            max_steps_per_key: 2_000_000,
        };
        let report = lincheck::check(&self.history, &opts);
        for k in &report.keys {
            if k.verdict == lincheck::Verdict::NotLinearizable {
                let mut s = format!("key {} is not linearizable", k.key);
                if let Some(v) = &k.violation {
                    let _ = write!(s, ": culprit {:?}", v.culprit.op);
                    let at = Duration::from_nanos(v.culprit.op.complete);
                    let first = self.report.culprit_at.get_or_insert(at);
                    *first = (*first).min(at);
                    if let Some(note) = &v.note {
                        let _ = write!(s, " ({note})");
                    }
                }
                self.violation(s);
            }
        }
    }
}

/// The rule a `--rule-off` name stands for.
#[cfg(feature = "rule-switches")]
pub fn rule_by_name(name: &str) -> Option<replikv_server::engine::rules::Rule> {
    use replikv_server::engine::rules::Rule;
    Some(match name {
        "quorum" => Rule::Quorum,
        "consecutive-lease" => Rule::ConsecutiveLease,
        "pending-read" => Rule::PendingRead,
        "install-wait" => Rule::InstallWait,
        "history-check" => Rule::HistoryCheck,
        "amnesia" => Rule::Amnesia,
        "session-dedup" => Rule::SessionDedup,
        "commit-all-members" => Rule::CommitAllMembers,
        _ => return None,
    })
}

/// Runs one seed.
pub fn run(cfg: Config) -> Report {
    Sim::new(cfg).run()
}
