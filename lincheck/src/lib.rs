//! Linearizability checker for histories of a key-value register (docs/design.md §8).
//!
//! The model, per key: `Get -> value | absent`, `Put(v) -> old value | absent`,
//! `Delete -> old value | absent` (a put of "absent"), and `Cas(expected, new) -> value
//! before it`: it writes `new` (a value, or "absent" to delete) only when the state is
//! `expected` (a value, or "absent"). A known CAS result alone says whether it swapped (the
//! value before it equals `expected` exactly when it did). Keys are independent
//! registers, so a history is linearizable iff each key's sub-history is
//! (linearizability is compositional), and each key is checked on its own.
//!
//! The search is Wing & Gong's algorithm with Lowe's memoisation (the same
//! shape as Knossos' `wgl` and Porcupine): walk the invocation/return events in
//! time order, tentatively linearize a pending operation whose result the
//! current state explains, backtrack when a return is reached whose operation
//! has not been linearized yet, and never revisit a (linearized set, state)
//! pair. A step budget turns a pathological search into an `Inconclusive`
//! verdict instead of a hang.
//!
//! Operations with an unknown outcome (timeout, crash) may take effect at any
//! point after their invocation, or never, and their result is unconstrained:
//!
//! - an unknown `Get` constrains nothing and is dropped;
//! - an unknown `Put(v)` whose value nobody ever observed is dropped: once it
//!   took effect the next known operation would have to observe `v`, so the
//!   only places it can take effect are equivalent to never;
//! - an unknown `Put(v)` whose (unique) value was observed must take effect
//!   before the first observer completes, which becomes its deadline; this
//!   keeps the search from trying it at every later point;
//! - an unknown `Delete` (or a put of a value written more than once) stays
//!   pending until the end of the history. Unknown deletes are
//!   interchangeable, so only the earliest-invoked pending one is ever tried,
//!   which collapses the otherwise exponential choice of "which of them".
//! - an unknown `Cas` is treated as the put or delete it would be, guarded: it can take
//!   effect only where the state is its `expected`, and elsewhere it is the same as never.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

/// Nanoseconds on one monotonic clock shared by every client of a history.
pub type Nanos = u64;

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Call {
    Get,
    Put(String),
    Delete,
    /// Compare-and-swap: `new` (`None` deletes) if the state is `expected` (`None`: absent).
    Cas {
        expected: Option<String>,
        new: Option<String>,
    },
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Completed: for a get the value read, for a put or delete the value it
    /// replaced; `None` is "absent".
    Ok(Option<String>),
    /// The client does not know whether the operation took effect.
    Unknown,
}

/// One client operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The client (session) that issued it; used only for reporting.
    pub process: u64,
    pub key: String,
    pub call: Call,
    pub outcome: Outcome,
    /// When the client sent it.
    pub invoke: Nanos,
    /// When the client got the answer or gave up. Ignored by the check when
    /// the outcome is unknown: such an operation may take effect at any time
    /// after its invocation.
    pub complete: Nanos,
}

impl Operation {
    /// Whether the client does not know if the operation took effect.
    pub fn is_unknown(&self) -> bool {
        self.outcome == Outcome::Unknown
    }
}

/// Limits of the search.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Search steps allowed per key before the key is declared inconclusive.
    pub max_steps_per_key: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        // About 10 s of search on one core for a pathological key; a healthy
        // history needs a few steps per operation.
        Self {
            max_steps_per_key: 20_000_000,
        }
    }
}

/// Verdict for one key or for a whole history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Linearizable,
    /// The step budget ran out before the search could decide.
    Inconclusive,
    NotLinearizable,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Linearizable => "linearizable",
            Verdict::Inconclusive => "inconclusive",
            Verdict::NotLinearizable => "NOT linearizable",
        })
    }
}

/// Totals over a whole history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub ops: usize,
    /// Operations with a known result.
    pub ok: usize,
    /// Operations with an unknown outcome.
    pub unknown: usize,
    pub keys: usize,
}

/// An operation of the history, with its index in the checked slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedOp {
    pub index: usize,
    pub op: Operation,
}

/// Where the search for one key got stuck.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The operation no linearization gets past: every order of the
    /// operations before it leaves the register in a state that does not
    /// explain its result (or, for an unknown put, in which its value could
    /// have been written before it was observed).
    pub culprit: IndexedOp,
    /// States the register could be in right before the culprit; `None` is
    /// absent. Capped at a handful.
    pub states: Vec<Option<String>>,
    /// The culprit, the operations concurrent with it, the few that completed
    /// just before them, and the writes of every value they mention, ordered
    /// by invocation.
    pub window: Vec<IndexedOp>,
    /// A plain-words reading of the failure when one is evident.
    pub note: Option<String>,
}

/// The result for one key.
#[derive(Debug, Clone)]
pub struct KeyReport {
    pub key: String,
    pub verdict: Verdict,
    /// Operations of this key that were searched (after dropping unknown
    /// gets and unobserved unknown puts).
    pub searched: usize,
    pub steps: u64,
    pub violation: Option<Violation>,
}

/// The result for a whole history.
#[derive(Debug, Clone)]
pub struct Report {
    pub counts: Counts,
    /// One entry per key, in key order.
    pub keys: Vec<KeyReport>,
    /// Earliest invocation of the history; times are printed relative to it.
    pub origin: Nanos,
}

impl Report {
    /// The worst verdict over all keys.
    pub fn verdict(&self) -> Verdict {
        self.keys
            .iter()
            .map(|k| k.verdict)
            .max()
            .unwrap_or(Verdict::Linearizable)
    }
}

/// Checks a history, one key at a time.
pub fn check(history: &[Operation], options: &CheckOptions) -> Report {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, op) in history.iter().enumerate() {
        by_key.entry(op.key.as_str()).or_default().push(i);
    }
    let unknown = history.iter().filter(|op| op.is_unknown()).count();
    let counts = Counts {
        ops: history.len(),
        ok: history.len() - unknown,
        unknown,
        keys: by_key.len(),
    };
    let keys = by_key
        .into_iter()
        .map(|(key, indices)| check_key(key, history, &indices, options))
        .collect();
    Report {
        counts,
        keys,
        origin: history.iter().map(|op| op.invoke).min().unwrap_or(0),
    }
}

/// Register state: `ABSENT` or 1 + the index of an interned value.
type State = u32;
const ABSENT: State = 0;
const INFINITY: Nanos = Nanos::MAX;

/// One operation as the search sees it.
#[derive(Debug)]
struct SearchOp {
    /// Index into the caller's history.
    index: usize,
    invoke: Nanos,
    /// Latest time it may take effect: its completion, a forced deadline for
    /// an observed unknown put, or `INFINITY` (may take effect any time or
    /// never).
    deadline: Nanos,
    /// `Some(expected)` when the result constrains the state it sees.
    expect: Option<State>,
    /// `Some(new)` for writes.
    write: Option<State>,
    /// `Some(g)`: takes effect only in state `g` (an unknown compare-and-swap).
    guard: Option<State>,
    /// Rank among unknown deletes by invocation (see the module doc).
    unknown_delete: Option<u32>,
}

impl SearchOp {
    fn apply(&self, state: State) -> Option<State> {
        if self.guard.is_some_and(|g| g != state) {
            return None;
        }
        let new = self.write.unwrap_or(state);
        match self.expect {
            Some(expected) if expected != state => None,
            Some(_) => Some(new),
            // An unknown write that would not change the state (a delete of
            // an absent key) is never needed there: dropping it from any
            // linearization keeps it valid, since it may also not take
            // effect at all. Refusing it keeps it available for later.
            None if new == state => None,
            None => Some(new),
        }
    }

    /// True for an operation that must take effect (known result) and leaves
    /// `state` as it is: a read, a delete of an absent key. Wherever it can
    /// take effect the state is `expect`, which it keeps, so placing it at the
    /// first point it fits is as good as any later point: the search never
    /// needs the alternative "not yet". This keeps concurrent reads from
    /// multiplying the search by every subset of them.
    fn is_identity_at(&self, state: State) -> bool {
        self.expect == Some(state) && self.write.is_none_or(|new| new == state)
    }
}

/// Interns the values of one key so the search compares integers.
#[derive(Default)]
struct Values<'a> {
    ids: HashMap<&'a str, State>,
    names: Vec<&'a str>,
}

impl<'a> Values<'a> {
    fn id(&mut self, value: Option<&'a str>) -> State {
        let Some(value) = value else { return ABSENT };
        *self.ids.entry(value).or_insert_with(|| {
            self.names.push(value);
            self.names.len() as State
        })
    }

    fn name(&self, state: State) -> Option<&'a str> {
        (state != ABSENT).then(|| self.names[state as usize - 1])
    }
}

fn check_key(
    key: &str,
    history: &[Operation],
    indices: &[usize],
    options: &CheckOptions,
) -> KeyReport {
    let mut values = Values::default();
    // Values some known operation returned, with the earliest completion
    // among those observers, and how many puts wrote each value.
    let mut first_observed: HashMap<&str, Nanos> = HashMap::new();
    let mut writers: HashMap<&str, usize> = HashMap::new();
    for &i in indices {
        let op = &history[i];
        if let Outcome::Ok(Some(v)) = &op.outcome {
            let t = first_observed.entry(v.as_str()).or_insert(op.complete);
            *t = (*t).min(op.complete);
        }
        if let Call::Put(v) | Call::Cas { new: Some(v), .. } = &op.call {
            *writers.entry(v.as_str()).or_default() += 1;
        }
    }

    let mut ops = Vec::with_capacity(indices.len());
    for &i in indices {
        let op = &history[i];
        let (expect, deadline) = match &op.outcome {
            Outcome::Ok(result) => (Some(values.id(result.as_deref())), op.complete),
            Outcome::Unknown => match &op.call {
                Call::Get => continue,
                Call::Put(v) | Call::Cas { new: Some(v), .. } => {
                    match first_observed.get(v.as_str()) {
                        None => continue,
                        // Clamped to the invocation so that the events stay in
                        // order; an observer that completed even earlier then
                        // fails on its own.
                        Some(&seen) if writers[v.as_str()] == 1 => (None, seen.max(op.invoke)),
                        Some(_) => (None, INFINITY),
                    }
                }
                Call::Delete | Call::Cas { new: None, .. } => (None, INFINITY),
            },
        };
        let (write, guard) = match &op.call {
            Call::Get => (None, None),
            Call::Put(v) => (Some(values.id(Some(v))), None),
            Call::Delete => (Some(ABSENT), None),
            Call::Cas { expected, new } => {
                let expected = values.id(expected.as_deref());
                let new = values.id(new.as_deref());
                match expect {
                    // A known result is the state it saw: it swapped exactly on a match.
                    Some(seen) => ((seen == expected).then_some(new), None),
                    None => (Some(new), Some(expected)),
                }
            }
        };
        ops.push(SearchOp {
            index: i,
            invoke: op.invoke,
            deadline,
            expect,
            write,
            guard,
            unknown_delete: None,
        });
    }
    ops.sort_by_key(|op| (op.invoke, op.index));
    let mut rank = 0;
    for op in &mut ops {
        // A guarded delete is not interchangeable with the others.
        if op.deadline == INFINITY && op.write == Some(ABSENT) && op.guard.is_none() {
            op.unknown_delete = Some(rank);
            rank += 1;
        }
    }

    let outcome = search(&ops, options.max_steps_per_key);
    let (verdict, steps, violation) = match outcome {
        SearchOutcome::Linearizable { steps } => (Verdict::Linearizable, steps, None),
        SearchOutcome::Inconclusive { steps } => (Verdict::Inconclusive, steps, None),
        SearchOutcome::Stuck {
            steps,
            culprit,
            states,
        } => {
            let violation = explain(history, indices, &ops[culprit], &states, &values);
            (Verdict::NotLinearizable, steps, Some(violation))
        }
    };
    KeyReport {
        key: key.to_owned(),
        verdict,
        searched: ops.len(),
        steps,
        violation,
    }
}

enum SearchOutcome {
    Linearizable {
        steps: u64,
    },
    Inconclusive {
        steps: u64,
    },
    /// `culprit` indexes the search ops; `states` are the states seen right
    /// before it at the furthest point the search reached.
    Stuck {
        steps: u64,
        culprit: usize,
        states: BTreeSet<State>,
    },
}

/// The set of linearized operations, with a compact exact memo key: the
/// search linearizes roughly in time order, so the set is a run of full words,
/// a few mixed words, then zeros; only the middle part is stored.
struct Linearized {
    words: Vec<u64>,
}

#[derive(PartialEq, Eq, Hash)]
struct MemoKey {
    first_open_word: u32,
    middle: Box<[u64]>,
    state: State,
}

impl Linearized {
    fn new(n: usize) -> Self {
        Self {
            words: vec![0; n.div_ceil(64)],
        }
    }

    fn set(&mut self, i: usize) {
        self.words[i / 64] |= 1 << (i % 64);
    }

    fn clear(&mut self, i: usize) {
        self.words[i / 64] &= !(1 << (i % 64));
    }

    fn memo_key(&self, state: State) -> MemoKey {
        let start = self
            .words
            .iter()
            .position(|w| *w != u64::MAX)
            .unwrap_or(self.words.len());
        let end = self
            .words
            .iter()
            .rposition(|w| *w != 0)
            .map_or(start, |i| i + 1)
            .max(start);
        MemoKey {
            first_open_word: start as u32,
            middle: self.words[start..end].into(),
            state,
        }
    }
}

/// An invocation or return event.
struct Event {
    op: usize,
    time: Nanos,
    is_call: bool,
}

/// The search over one key's operations (sorted by invocation).
fn search(ops: &[SearchOp], max_steps: u64) -> SearchOutcome {
    const NONE: usize = usize::MAX;

    let mut events: Vec<Event> = ops
        .iter()
        .enumerate()
        .flat_map(|(i, op)| {
            [
                Event {
                    op: i,
                    time: op.invoke,
                    is_call: true,
                },
                Event {
                    op: i,
                    time: op.deadline,
                    is_call: false,
                },
            ]
        })
        .collect();
    // At equal times invocations go first: two operations whose intervals
    // touch are treated as concurrent, which can only accept more histories,
    // never reject a linearizable one.
    events.sort_by_key(|e| (e.time, !e.is_call, e.op));

    // A doubly linked list over the events, with a head sentinel at index
    // `events.len()`. Linearizing an operation unlinks its two events;
    // backtracking relinks them (they keep their own pointers, "dancing
    // links"), in reverse order of unlinking.
    let head = events.len();
    let mut next: Vec<usize> = (1..=events.len()).collect();
    next[events.len().saturating_sub(1)..].fill(NONE);
    next.push(if events.is_empty() { NONE } else { 0 });
    let mut prev: Vec<usize> = (0..events.len())
        .map(|i| if i == 0 { head } else { i - 1 })
        .collect();
    prev.push(NONE);
    let mut call_event = vec![0; ops.len()];
    let mut return_event = vec![0; ops.len()];
    for (i, e) in events.iter().enumerate() {
        if e.is_call {
            call_event[e.op] = i;
        } else {
            return_event[e.op] = i;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        next[prev[e]] = next[e];
        if next[e] != NONE {
            prev[next[e]] = prev[e];
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        next[prev[e]] = e;
        if next[e] != NONE {
            prev[next[e]] = e;
        }
    };

    let mut state = ABSENT;
    let mut linearized = Linearized::new(ops.len());
    let mut unknown_deletes_done = 0u32;
    let mut memo: HashSet<MemoKey> = HashSet::new();
    // (op, state before it)
    let mut stack: Vec<(usize, State)> = Vec::new();
    // The furthest return the search got stuck at, and the states seen there.
    let mut frontier: Option<(Nanos, usize)> = None;
    let mut frontier_states: BTreeSet<State> = BTreeSet::new();

    let mut cursor = next[head];
    let mut steps = 0u64;
    loop {
        steps += 1;
        if steps > max_steps {
            return SearchOutcome::Inconclusive { steps };
        }
        if cursor == NONE {
            return SearchOutcome::Linearizable { steps };
        }
        let event = &events[cursor];
        let op = &ops[event.op];
        if event.is_call {
            let allowed = op
                .unknown_delete
                .is_none_or(|rank| rank == unknown_deletes_done);
            let Some(new_state) = op.apply(state).filter(|_| allowed) else {
                cursor = next[cursor];
                continue;
            };
            linearized.set(event.op);
            if memo.insert(linearized.memo_key(new_state)) {
                stack.push((event.op, state));
                state = new_state;
                if op.unknown_delete.is_some() {
                    unknown_deletes_done += 1;
                }
                unlink(&mut next, &mut prev, call_event[event.op]);
                unlink(&mut next, &mut prev, return_event[event.op]);
                cursor = next[head];
                continue;
            }
            linearized.clear(event.op);
            if !op.is_identity_at(state) {
                cursor = next[cursor];
                continue;
            }
            // Placing this no-op here was already explored and failed, so
            // every continuation of the current configuration fails too (see
            // `is_identity_at`): backtrack.
        } else if event.time == INFINITY {
            // Every operation with a finite deadline is linearized; what is
            // left may take effect after everything else, or never.
            return SearchOutcome::Linearizable { steps };
        } else {
            // This operation's deadline passed and it is not linearized.
            match frontier {
                Some((time, _)) if time > event.time => {}
                Some((time, culprit)) if time == event.time && culprit == event.op => {
                    if frontier_states.len() < MAX_REPORTED_STATES {
                        frontier_states.insert(state);
                    }
                }
                _ => {
                    frontier = Some((event.time, event.op));
                    frontier_states = BTreeSet::from([state]);
                }
            }
        }

        // Backtrack: undo the latest choice; a no-op choice needs no
        // alternative (see `is_identity_at`), so undo past it too.
        loop {
            let Some((undo, before)) = stack.pop() else {
                let (_, culprit) =
                    frontier.expect("a failed search reached the deadline of some operation");
                return SearchOutcome::Stuck {
                    steps,
                    culprit,
                    states: frontier_states,
                };
            };
            linearized.clear(undo);
            state = before;
            if ops[undo].unknown_delete.is_some() {
                unknown_deletes_done -= 1;
            }
            relink(&mut next, &mut prev, return_event[undo]);
            relink(&mut next, &mut prev, call_event[undo]);
            cursor = next[call_event[undo]];
            if !ops[undo].is_identity_at(state) {
                break;
            }
        }
    }
}

const MAX_REPORTED_STATES: usize = 8;
/// Operations completed just before the concurrent window, shown for context.
const CONTEXT_BEFORE: usize = 3;
/// Largest window printed; the operations nearest the culprit are kept.
const MAX_WINDOW: usize = 40;

/// Builds the smallest useful window of operations around a stuck point.
fn explain(
    history: &[Operation],
    indices: &[usize],
    culprit: &SearchOp,
    states: &BTreeSet<State>,
    values: &Values<'_>,
) -> Violation {
    let c = &history[culprit.index];
    let end = culprit.deadline;
    let effective_end = |op: &Operation| {
        if op.is_unknown() {
            INFINITY
        } else {
            op.complete
        }
    };
    let concurrent = |op: &Operation| op.invoke <= end && effective_end(op) >= culprit.invoke;
    // Pending unknown operations overlap everything after them, so they do
    // not widen the window; of them, only those invoked inside it are shown.
    let start = indices
        .iter()
        .map(|&i| &history[i])
        .filter(|op| !op.is_unknown() && concurrent(op))
        .map(|op| op.invoke)
        .min()
        .unwrap_or(culprit.invoke)
        .min(culprit.invoke);
    // Everything that overlaps the span from the earliest of those to the
    // culprit's deadline: an operation that completed inside it (a read of a
    // newer value, say) is often what rules the culprit out.
    let mut chosen: BTreeSet<usize> = indices
        .iter()
        .copied()
        .filter(|&i| {
            let op = &history[i];
            op.invoke <= end
                && effective_end(op) >= start
                && (!op.is_unknown() || op.invoke >= start)
        })
        .collect();
    chosen.insert(culprit.index);

    let mut before: Vec<usize> = indices
        .iter()
        .copied()
        .filter(|&i| !history[i].is_unknown() && history[i].complete < start)
        .collect();
    before.sort_by_key(|&i| std::cmp::Reverse(history[i].complete));
    chosen.extend(before.into_iter().take(CONTEXT_BEFORE));

    // Where did each value mentioned in the window come from?
    let mentioned: HashSet<&str> = chosen
        .iter()
        .filter_map(|&i| match &history[i].outcome {
            Outcome::Ok(Some(v)) => Some(v.as_str()),
            _ => None,
        })
        .chain(states.iter().filter_map(|&s| values.name(s)))
        .collect();
    chosen.extend(
        indices.iter().copied().filter(
            |&i| matches!(&history[i].call, Call::Put(v) if mentioned.contains(v.as_str())),
        ),
    );

    let mut window: Vec<IndexedOp> = chosen
        .into_iter()
        .map(|index| IndexedOp {
            index,
            op: history[index].clone(),
        })
        .collect();
    if window.len() > MAX_WINDOW {
        window.sort_by_key(|o| o.op.invoke.abs_diff(c.invoke));
        window.truncate(MAX_WINDOW);
    }
    window.sort_by_key(|o| (o.op.invoke, o.index));

    Violation {
        culprit: IndexedOp {
            index: culprit.index,
            op: c.clone(),
        },
        states: states
            .iter()
            .map(|&s| values.name(s).map(str::to_owned))
            .collect(),
        window,
        note: note(history, indices, c),
    }
}

/// A plain-words reading of why `culprit` cannot be linearized, when the
/// history makes it evident.
fn note(history: &[Operation], indices: &[usize], culprit: &Operation) -> Option<String> {
    match (&culprit.outcome, &culprit.call) {
        (Outcome::Ok(Some(v)), _) => {
            let writes: Vec<&Operation> = indices
                .iter()
                .map(|&i| &history[i])
                .filter(|op| matches!(&op.call, Call::Put(w) if w == v))
                .collect();
            if writes.is_empty() {
                return Some(format!("{} was never written to this key", quote(Some(v))));
            }
            if writes.iter().all(|w| w.invoke > culprit.complete) {
                return Some(format!(
                    "{} was returned before any put of it was invoked",
                    quote(Some(v))
                ));
            }
            let returned_old = indices
                .iter()
                .map(|&i| &history[i])
                .filter(|op| {
                    !matches!(op.call, Call::Get)
                        && op.outcome == Outcome::Ok(Some(v.clone()))
                })
                .count();
            if returned_old > 1 {
                return Some(format!(
                    "{returned_old} writes returned {} as the value they replaced: it was overwritten more than once (a write applied twice, or a lost update)",
                    quote(Some(v))
                ));
            }
            None
        }
        (Outcome::Unknown, Call::Put(_)) => Some(
            "its value was observed, but no order lets it take effect before the first observer completed"
                .to_owned(),
        ),
        _ => None,
    }
}

fn quote(value: Option<&str>) -> String {
    match value {
        Some(v) => format!("{v:?}"),
        None => "absent".to_owned(),
    }
}

fn describe(op: &Operation) -> String {
    let call = match &op.call {
        Call::Get => "get".to_owned(),
        Call::Put(v) => format!("put {}", quote(Some(v))),
        Call::Delete => "delete".to_owned(),
        Call::Cas { expected, new } => {
            format!(
                "cas {} -> {}",
                quote(expected.as_deref()),
                quote(new.as_deref())
            )
        }
    };
    let result = match (&op.outcome, &op.call) {
        (Outcome::Unknown, _) => "unknown".to_owned(),
        (Outcome::Ok(r), Call::Get) => quote(r.as_deref()),
        (Outcome::Ok(r), Call::Cas { expected, .. }) => format!(
            "{} {}",
            if r == expected {
                "swapped, was"
            } else {
                "mismatch, is"
            },
            quote(r.as_deref())
        ),
        (Outcome::Ok(r), _) => format!("old {}", quote(r.as_deref())),
    };
    format!("{call:<24} -> {result}")
}

fn millis(t: Nanos, origin: Nanos) -> String {
    let d = t.saturating_sub(origin);
    format!("{}.{:03}", d / 1_000_000, (d / 1_000) % 1_000)
}

impl Report {
    /// Formats one violation's window with times relative to the history's
    /// first invocation.
    fn fmt_violation(&self, f: &mut fmt::Formatter<'_>, v: &Violation) -> fmt::Result {
        let culprit = &v.culprit;
        writeln!(
            f,
            "    stuck at #{} (c{} {}): no order of the operations before it explains it",
            culprit.index,
            culprit.op.process,
            describe(&culprit.op)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )?;
        if let Some(note) = &v.note {
            writeln!(f, "    reading: {note}")?;
        }
        let states: Vec<String> = v.states.iter().map(|s| quote(s.as_deref())).collect();
        writeln!(
            f,
            "    possible states just before it: {}",
            states.join(" | ")
        )?;
        writeln!(
            f,
            "    window (ordered by invocation; ms since the first invocation):"
        )?;
        for o in &v.window {
            let marker = if o.index == culprit.index { ">" } else { " " };
            let end = if o.op.is_unknown() {
                format!("{}?", millis(o.op.complete, self.origin))
            } else {
                millis(o.op.complete, self.origin)
            };
            writeln!(
                f,
                "    {marker} #{:<7} c{:<4} {:<48} [{:>10} .. {:>11}]",
                o.index,
                o.op.process,
                describe(&o.op),
                millis(o.op.invoke, self.origin),
                end
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |v: Verdict| self.keys.iter().filter(|k| k.verdict == v).count();
        writeln!(
            f,
            "linearizability: {} ({} ops: {} ok, {} unknown; {} keys: {} linearizable, {} not, {} inconclusive)",
            self.verdict(),
            self.counts.ops,
            self.counts.ok,
            self.counts.unknown,
            self.counts.keys,
            count(Verdict::Linearizable),
            count(Verdict::NotLinearizable),
            count(Verdict::Inconclusive),
        )?;
        for key in &self.keys {
            if key.verdict == Verdict::Linearizable {
                continue;
            }
            writeln!(
                f,
                "  key {:?}: {} ({} ops searched, {} steps)",
                key.key, key.verdict, key.searched, key.steps
            )?;
            if let Some(v) = &key.violation {
                self.fmt_violation(f, v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds histories tersely: times in ms, one process per op unless set.
    struct H(Vec<Operation>);

    impl H {
        fn new() -> Self {
            H(Vec::new())
        }

        fn push(mut self, key: &str, call: Call, outcome: Outcome, at: (u64, u64)) -> Self {
            let process = self.0.len() as u64;
            self.0.push(Operation {
                process,
                key: key.to_owned(),
                call,
                outcome,
                invoke: at.0 * 1_000_000,
                complete: at.1 * 1_000_000,
            });
            self
        }

        fn put(self, v: &str, old: Option<&str>, at: (u64, u64)) -> Self {
            self.push("k", Call::Put(v.into()), ok(old), at)
        }

        fn put_unknown(self, v: &str, at: (u64, u64)) -> Self {
            self.push("k", Call::Put(v.into()), Outcome::Unknown, at)
        }

        fn get(self, r: Option<&str>, at: (u64, u64)) -> Self {
            self.push("k", Call::Get, ok(r), at)
        }

        fn delete(self, old: Option<&str>, at: (u64, u64)) -> Self {
            self.push("k", Call::Delete, ok(old), at)
        }

        fn delete_unknown(self, at: (u64, u64)) -> Self {
            self.push("k", Call::Delete, Outcome::Unknown, at)
        }

        fn cas(
            self,
            expected: Option<&str>,
            new: Option<&str>,
            seen: Outcome,
            at: (u64, u64),
        ) -> Self {
            let call = Call::Cas {
                expected: expected.map(str::to_owned),
                new: new.map(str::to_owned),
            };
            self.push("k", call, seen, at)
        }

        fn check(&self) -> Report {
            check(&self.0, &CheckOptions::default())
        }
    }

    fn ok(v: Option<&str>) -> Outcome {
        Outcome::Ok(v.map(str::to_owned))
    }

    fn assert_linearizable(h: &H) {
        let report = h.check();
        assert_eq!(report.verdict(), Verdict::Linearizable, "{report}");
    }

    fn assert_violation(h: &H) -> Violation {
        let report = h.check();
        assert_eq!(report.verdict(), Verdict::NotLinearizable, "{report}");
        let text = report.to_string();
        assert!(text.contains("stuck at #"), "{text}");
        report
            .keys
            .into_iter()
            .find_map(|k| k.violation)
            .expect("a failing key carries a violation")
    }

    #[test]
    fn empty_history_is_linearizable() {
        let report = H::new().check();
        assert_eq!(report.verdict(), Verdict::Linearizable);
        assert_eq!(report.counts, Counts::default());
    }

    #[test]
    fn sequential_register_is_linearizable() {
        let h = H::new()
            .get(None, (0, 1))
            .put("a", None, (2, 3))
            .get(Some("a"), (4, 5))
            .put("b", Some("a"), (6, 7))
            .delete(Some("b"), (8, 9))
            .get(None, (10, 11))
            .delete(None, (12, 13));
        assert_linearizable(&h);
    }

    #[test]
    fn overlapping_puts_in_either_order_are_linearizable() {
        // b then a
        let h = H::new()
            .put("a", Some("b"), (0, 10))
            .put("b", None, (1, 9))
            .get(Some("a"), (11, 12));
        assert_linearizable(&h);
        // a then b, with a get in the middle seeing a
        let h = H::new()
            .put("a", None, (0, 10))
            .put("b", Some("a"), (1, 9))
            .get(Some("a"), (2, 3))
            .get(Some("b"), (11, 12));
        assert_linearizable(&h);
    }

    #[test]
    fn reads_concurrent_with_a_write_may_see_either_value() {
        let h = H::new()
            .put("a", None, (0, 1))
            .put("b", Some("a"), (2, 20))
            .get(Some("b"), (3, 4))
            .get(Some("a"), (3, 5))
            .get(Some("b"), (21, 22));
        // get(a) at [3,5] and get(b) at [3,4]: a before b is possible
        assert_linearizable(&h);
    }

    #[test]
    fn new_then_old_read_fails() {
        // Once one read returned b (after it completed), a later read cannot
        // return a: the "two backups during one write" anomaly of §4.
        let h = H::new()
            .put("a", None, (0, 1))
            .put("b", Some("a"), (2, 20))
            .get(Some("b"), (3, 4))
            .get(Some("a"), (5, 6));
        let v = assert_violation(&h);
        assert_eq!(v.culprit.index, 3);
        // The newer read is not concurrent with the culprit, but it is what
        // rules it out: the window shows it.
        assert!(v.window.iter().any(|o| o.index == 2), "{:?}", v.window);
    }

    #[test]
    fn unknown_put_that_took_effect_is_linearizable() {
        let h = H::new()
            .put("a", None, (0, 1))
            .put_unknown("b", (2, 3))
            .get(Some("b"), (100, 101))
            .put("c", Some("b"), (102, 103));
        assert_linearizable(&h);
    }

    #[test]
    fn unknown_put_taking_effect_late_is_linearizable() {
        // It timed out at 3 ms but was applied only later, between two reads.
        let h = H::new()
            .put("a", None, (0, 1))
            .put_unknown("b", (2, 3))
            .get(Some("a"), (50, 51))
            .get(Some("b"), (100, 101));
        assert_linearizable(&h);
    }

    #[test]
    fn unknown_put_that_never_took_effect_is_linearizable() {
        let h = H::new()
            .put("a", None, (0, 1))
            .put_unknown("b", (2, 3))
            .get(Some("a"), (100, 101))
            .put("c", Some("a"), (102, 103))
            .get(Some("c"), (104, 105));
        assert_linearizable(&h);
    }

    #[test]
    fn unknown_put_observed_before_its_invocation_fails() {
        let h = H::new()
            .put("a", None, (0, 1))
            .get(Some("b"), (2, 3))
            .put_unknown("b", (10, 11));
        let v = assert_violation(&h);
        assert_eq!(v.culprit.index, 1);
        assert!(v.note.unwrap().contains("before any put of it"));
    }

    #[test]
    fn unknown_deletes_may_or_may_not_take_effect() {
        let h = H::new()
            .put("a", None, (0, 1))
            .delete_unknown((2, 3))
            .delete_unknown((4, 5))
            .put("b", None, (6, 7))
            .put("c", Some("b"), (8, 9))
            .get(None, (10, 11))
            .put("d", None, (12, 13));
        // Needs one delete between a and b and the other between c and the
        // get; the canonical "earliest pending delete first" order finds it.
        assert_linearizable(&h);
        let h = H::new()
            .put("a", None, (0, 1))
            .delete_unknown((2, 3))
            .get(Some("a"), (4, 5));
        assert_linearizable(&h);
    }

    #[test]
    fn too_many_effects_from_unknown_deletes_fail() {
        // Two absences to explain but only one unknown delete.
        let h = H::new()
            .put("a", None, (0, 1))
            .delete_unknown((2, 3))
            .put("b", None, (6, 7))
            .put("c", Some("b"), (8, 9))
            .get(None, (10, 11));
        assert_violation(&h);
    }

    #[test]
    fn stale_read_fails() {
        let h = H::new()
            .put("a", None, (0, 1))
            .put("b", Some("a"), (2, 3))
            .get(Some("a"), (4, 5));
        let v = assert_violation(&h);
        assert_eq!(v.culprit.index, 2);
        assert_eq!(v.states, vec![Some("b".to_owned())]);
        let report = h.check().to_string();
        assert!(report.contains("> #2"), "{report}");
    }

    #[test]
    fn read_of_absent_after_acknowledged_put_fails() {
        let h = H::new().put("a", None, (0, 1)).get(None, (2, 3));
        assert_violation(&h);
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        // b was acknowledged, yet the next write replaced a (b vanished, as
        // after a failover to a server that never had it).
        let h = H::new()
            .put("a", None, (0, 1))
            .put("b", Some("a"), (2, 3))
            .put("c", Some("a"), (4, 5))
            .get(Some("c"), (6, 7));
        let v = assert_violation(&h);
        assert_eq!(v.culprit.index, 2);
        assert!(
            v.window.iter().any(|o| o.index == 1),
            "the lost write is shown"
        );
    }

    #[test]
    fn duplicate_apply_fails() {
        // A retried put of a applied twice: once first, and again after b,
        // so c's old value is a although b came in between.
        let h = H::new()
            .put("a", None, (0, 1))
            .put("b", Some("a"), (2, 3))
            .put("c", Some("a"), (4, 5));
        let v = assert_violation(&h);
        assert!(v.note.unwrap().contains("more than once"));
    }

    #[test]
    fn read_of_a_value_never_written_fails() {
        let h = H::new().put("a", None, (0, 1)).get(Some("zzz"), (2, 3));
        let v = assert_violation(&h);
        assert_eq!(v.culprit.index, 1);
        assert!(v.note.unwrap().contains("never written"));
    }

    #[test]
    fn unknown_gets_are_dropped() {
        let h = H::new()
            .put("a", None, (0, 1))
            .push("k", Call::Get, Outcome::Unknown, (2, 3))
            .get(Some("a"), (4, 5));
        let report = h.check();
        assert_eq!(report.verdict(), Verdict::Linearizable);
        assert_eq!(report.keys[0].searched, 2);
        assert_eq!(report.counts.unknown, 1);
        assert_eq!(report.counts.ok, 2);
    }

    #[test]
    fn keys_are_checked_independently() {
        let h = H::new()
            .push("x", Call::Put("a".into()), ok(None), (0, 1))
            .push("y", Call::Get, ok(None), (2, 3))
            .push("y", Call::Put("b".into()), ok(None), (4, 5))
            .push("x", Call::Get, ok(Some("a")), (6, 7))
            .push("z", Call::Get, ok(Some("never")), (8, 9));
        let report = h.check();
        assert_eq!(report.counts.keys, 3);
        let verdicts: Vec<_> = report
            .keys
            .iter()
            .map(|k| (k.key.as_str(), k.verdict))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("x", Verdict::Linearizable),
                ("y", Verdict::Linearizable),
                ("z", Verdict::NotLinearizable)
            ]
        );
        assert_eq!(report.verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn exhausted_budget_is_inconclusive() {
        let h = H::new()
            .put("a", None, (0, 10))
            .put("b", None, (0, 10))
            .put("c", None, (0, 10))
            .get(Some("zzz"), (0, 10));
        let report = check(
            &h.0,
            &CheckOptions {
                max_steps_per_key: 3,
            },
        );
        assert_eq!(report.verdict(), Verdict::Inconclusive);
        assert!(report.to_string().contains("inconclusive"));
    }

    #[test]
    fn window_is_limited_to_the_neighbourhood() {
        // A long healthy prefix, then one stale read: the window shows the
        // read, the write it missed, and a little context, not the prefix.
        let mut h = H::new();
        let mut old: Option<String> = None;
        for i in 0..200u64 {
            let v = format!("v{i}");
            h = h.put(&v, old.as_deref(), (10 * i, 10 * i + 1));
            old = Some(v);
        }
        h = h.get(Some("v198"), (2_000, 2_001));
        let v = assert_violation(&h);
        assert_eq!(v.culprit.index, 200);
        assert!(v.window.len() <= 6, "{:?}", v.window);
        assert!(v.window.iter().any(|o| o.index == 199));
        assert!(v.window.iter().any(|o| o.index == 198));
    }

    /// A small deterministic PRNG so the property tests need no dependency.
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Linearizable by construction: each operation takes effect at a random
    /// instant inside its interval; some writes lose their outcome.
    fn random_linearizable(rng: &mut XorShift, n: usize) -> Vec<Operation> {
        let mut points: Vec<(u64, u64, u64, usize)> = (0..n)
            .map(|i| {
                let invoke = rng.below(100);
                let at = invoke + rng.below(30);
                let complete = at + rng.below(30);
                (at, invoke, complete, i)
            })
            .collect();
        points.sort();
        let mut state: Option<String> = None;
        let mut ops = Vec::new();
        for (_, invoke, complete, i) in points {
            let (call, result) = match rng.below(5) {
                0 | 1 => (Call::Get, state.clone()),
                2 => (Call::Delete, state.take()),
                _ => {
                    let v = format!("v{i}");
                    (Call::Put(v.clone()), state.replace(v))
                }
            };
            let outcome = if call != Call::Get && rng.below(4) == 0 {
                Outcome::Unknown
            } else {
                Outcome::Ok(result)
            };
            ops.push(Operation {
                process: i as u64,
                key: "k".into(),
                call,
                outcome,
                invoke,
                complete,
            });
        }
        ops
    }

    /// Exhaustive reference: some subset of the unknown operations plus all
    /// known ones, in an order respecting real time, explains every result.
    fn brute_force(ops: &[Operation]) -> bool {
        fn go(ops: &[Operation], done: &mut Vec<bool>, state: Option<String>) -> bool {
            let pending_known = (0..ops.len()).any(|i| !done[i] && !ops[i].is_unknown());
            if !pending_known {
                return true;
            }
            for i in 0..ops.len() {
                if done[i] {
                    continue;
                }
                // i may go next only if no pending known op completed before
                // i was invoked.
                let blocked = (0..ops.len()).any(|j| {
                    j != i && !done[j] && !ops[j].is_unknown() && ops[j].complete < ops[i].invoke
                });
                if blocked {
                    continue;
                }
                let op = &ops[i];
                let fits = match &op.outcome {
                    Outcome::Ok(r) => *r == state,
                    Outcome::Unknown => true,
                };
                if !fits {
                    continue;
                }
                let next = match &op.call {
                    Call::Get => state.clone(),
                    Call::Put(v) => Some(v.clone()),
                    Call::Delete => None,
                    Call::Cas { expected, new } if *expected == state => new.clone(),
                    Call::Cas { .. } => state.clone(),
                };
                done[i] = true;
                let found = go(ops, done, next);
                done[i] = false;
                if found {
                    return true;
                }
            }
            false
        }
        go(ops, &mut vec![false; ops.len()], None)
    }

    #[test]
    fn agrees_with_brute_force_on_random_histories() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut failing = 0;
        for round in 0..3_000 {
            let mut ops = random_linearizable(&mut rng, 2 + round % 6);
            let report = check(&ops, &CheckOptions::default());
            assert_eq!(
                report.verdict(),
                Verdict::Linearizable,
                "{ops:#?}\n{report}"
            );
            // Corrupt one known result; the reference decides the truth.
            let known: Vec<usize> = (0..ops.len()).filter(|&i| !ops[i].is_unknown()).collect();
            if known.is_empty() {
                continue;
            }
            let i = known[rng.below(known.len() as u64) as usize];
            let pick = rng.below(ops.len() as u64 + 1) as usize;
            ops[i].outcome = Outcome::Ok((pick < ops.len()).then(|| format!("v{pick}")));
            let expected = brute_force(&ops);
            let report = check(&ops, &CheckOptions::default());
            let got = report.verdict() == Verdict::Linearizable;
            assert_eq!(got, expected, "{ops:#?}\n{report}");
            failing += usize::from(!expected);
        }
        assert!(
            failing > 500,
            "the mutation produced only {failing} violations"
        );
    }

    #[test]
    fn large_concurrent_history_is_checked_quickly() {
        let mut rng = XorShift(42);
        // 20k operations, ten at a time in flight, many unknown writes.
        let mut ops = Vec::new();
        let mut state: Option<String> = None;
        let mut clock = 0;
        for i in 0..20_000u64 {
            clock += 1 + rng.below(3);
            let invoke = clock.saturating_sub(rng.below(20));
            let complete = clock + rng.below(20);
            let (call, result) = match rng.below(3) {
                0 => (Call::Get, state.clone()),
                _ => {
                    let v = format!("v{i}");
                    (Call::Put(v.clone()), state.replace(v))
                }
            };
            let outcome = if call != Call::Get && rng.below(20) == 0 {
                Outcome::Unknown
            } else {
                Outcome::Ok(result)
            };
            ops.push(Operation {
                process: i % 10,
                key: "k".into(),
                call,
                outcome,
                invoke,
                complete,
            });
        }
        let started = std::time::Instant::now();
        let report = check(&ops, &CheckOptions::default());
        assert_eq!(report.verdict(), Verdict::Linearizable, "{report}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    #[test]
    fn a_cas_swaps_only_on_its_expected_value() {
        // put a; cas a->b swaps; cas a->c sees b and does not swap; get b.
        let h = H::new()
            .put("a", None, (0, 1))
            .cas(Some("a"), Some("b"), ok(Some("a")), (2, 3))
            .cas(Some("a"), Some("c"), ok(Some("b")), (4, 5))
            .get(Some("b"), (6, 7));
        assert_linearizable(&h);
        // A CAS that claims a swap from a value the key never held then is refused.
        let bad = H::new()
            .put("a", None, (0, 1))
            .cas(Some("x"), Some("b"), ok(Some("x")), (2, 3));
        assert_eq!(bad.check().verdict(), Verdict::NotLinearizable);
        // A mismatched CAS wrote nothing: reading its new value is a violation.
        let bad = H::new()
            .put("a", None, (0, 1))
            .cas(Some("z"), Some("b"), ok(Some("a")), (2, 3))
            .get(Some("b"), (4, 5));
        assert_eq!(bad.check().verdict(), Verdict::NotLinearizable);
        // Put-if-absent and delete-if-equal.
        let h = H::new()
            .cas(None, Some("a"), ok(None), (0, 1))
            .cas(None, Some("b"), ok(Some("a")), (2, 3))
            .cas(Some("a"), None, ok(Some("a")), (4, 5))
            .get(None, (6, 7));
        assert_linearizable(&h);
    }

    #[test]
    fn an_unknown_cas_takes_effect_only_where_it_matches() {
        // The unknown CAS 1->2 may have applied: a later read of 2 is fine.
        let h = H::new()
            .put("1", None, (0, 1))
            .cas(Some("1"), Some("2"), Outcome::Unknown, (2, 3))
            .get(Some("2"), (10, 11));
        assert_linearizable(&h);
        // ... or not: a read of 1 is fine too.
        let h = H::new()
            .put("1", None, (0, 1))
            .cas(Some("1"), Some("2"), Outcome::Unknown, (2, 3))
            .get(Some("1"), (10, 11));
        assert_linearizable(&h);
        // It cannot apply where the state is not its expected value: the key held 3 all
        // along, so 2 can never be read.
        let bad = H::new()
            .put("3", None, (0, 1))
            .cas(Some("1"), Some("2"), Outcome::Unknown, (2, 3))
            .get(Some("2"), (10, 11));
        assert_eq!(bad.check().verdict(), Verdict::NotLinearizable);
        // An unknown delete-if-equal is not just any unknown delete.
        let bad = H::new()
            .put("3", None, (0, 1))
            .cas(Some("1"), None, Outcome::Unknown, (2, 3))
            .get(None, (10, 11));
        assert_eq!(bad.check().verdict(), Verdict::NotLinearizable);
    }

    #[test]
    fn a_counter_of_concurrent_cas_increments_checks() {
        // Two clients race 0->1; one wins, the loser sees 1 and retries 1->2.
        let h = H::new()
            .put("0", None, (0, 1))
            .cas(Some("0"), Some("1"), ok(Some("0")), (2, 6))
            .cas(Some("0"), Some("1"), ok(Some("1")), (3, 7))
            .cas(Some("1"), Some("2"), ok(Some("1")), (8, 9))
            .get(Some("2"), (10, 11));
        assert_linearizable(&h);
        // Both claiming the win is a lost update.
        let bad = H::new()
            .put("0", None, (0, 1))
            .cas(Some("0"), Some("1"), ok(Some("0")), (2, 6))
            .cas(Some("0"), Some("1"), ok(Some("0")), (3, 7));
        assert_eq!(bad.check().verdict(), Verdict::NotLinearizable);
    }
}
