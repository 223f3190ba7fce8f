//! Which server a request tries next: the route's first choice, primary
//! redirects, and random order for the rest (docs/design.md §6).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::Rng;

use crate::config::Route;

/// Whether a request changes state; the routes treat the two differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
}

/// Sentinel for "no primary known".
const UNKNOWN: usize = usize::MAX;

/// Weight of a new latency sample in the moving average.
const EWMA_WEIGHT: f64 = 0.2;

/// Share of `Nearest` reads sent in random order instead, so that a server
/// that was slow or down once gets measured again when it recovers.
const EXPLORE_PROBABILITY: f64 = 0.05;

/// A server that did not answer at all (attempt timeout, connection failure) is tried after
/// the others for this long, so one paused or dead server does not stall a share of every
/// client's requests for a whole attempt timeout each.
const SUSPECT_FOR: Duration = Duration::from_secs(1);

/// Routing state shared by every request of one client. Lock-free: it is
/// read on every request and written on every reply, and a lost update only
/// costs one less well-placed first attempt.
#[derive(Debug)]
pub(crate) struct Router {
    route: Route,
    servers: usize,
    /// Index of the last primary learned of, or [`UNKNOWN`].
    primary: AtomicUsize,
    /// Moving average of successful attempt latency per server, in
    /// microseconds; 0 = no sample yet.
    latency_us: Vec<AtomicU64>,
    /// Per server: until when (microseconds since `origin`) it is tried last; 0 = healthy.
    suspect_until_us: Vec<AtomicU64>,
    origin: Instant,
}

impl Router {
    pub fn new(route: Route, servers: usize) -> Self {
        Self {
            route,
            servers,
            primary: AtomicUsize::new(UNKNOWN),
            latency_us: (0..servers).map(|_| AtomicU64::new(0)).collect(),
            suspect_until_us: (0..servers).map(|_| AtomicU64::new(0)).collect(),
            origin: Instant::now(),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// `server` did not answer: try it after the others for a while.
    pub fn mark_unresponsive(&self, server: usize) {
        if let Some(slot) = self.suspect_until_us.get(server) {
            let until = self.now_us().saturating_add(SUSPECT_FOR.as_micros() as u64);
            slot.store(until.max(1), Ordering::Relaxed);
        }
    }

    /// `server` answered: it is healthy again.
    pub fn mark_responsive(&self, server: usize) {
        if let Some(slot) = self.suspect_until_us.get(server) {
            if slot.load(Ordering::Relaxed) != 0 {
                slot.store(0, Ordering::Relaxed);
            }
        }
    }

    fn suspects(&self) -> Vec<bool> {
        let now = self.now_us();
        self.suspect_until_us
            .iter()
            .map(|s| s.load(Ordering::Relaxed) > now)
            .collect()
    }

    /// The order one request tries servers in, before any redirect.
    pub fn plan(&self, kind: OpKind) -> Plan {
        let mut rng = rand::rng();
        let first = match (self.route, kind) {
            (Route::Primary, OpKind::Write) => self.primary(),
            (Route::Nearest, OpKind::Read) if !rng.random_bool(EXPLORE_PROBABILITY) => {
                self.nearest(&mut rng)
            }
            _ => None,
        };
        let suspects = self.suspects();
        let first = first.filter(|&f| !suspects.get(f).copied().unwrap_or(false));
        Plan::new(self.servers, first, suspects, &mut rng)
    }

    /// The last primary learned of.
    pub fn primary(&self) -> Option<usize> {
        match self.primary.load(Ordering::Relaxed) {
            UNKNOWN => None,
            i => Some(i),
        }
    }

    /// Remembers `server` as the primary.
    pub fn set_primary(&self, server: usize) {
        if server < self.servers {
            self.primary.store(server, Ordering::Relaxed);
        }
    }

    /// Forgets `server` as the primary, if it still is the one remembered
    /// (another request may have learned a newer one meanwhile).
    pub fn forget_primary(&self, server: usize) {
        let _ =
            self.primary
                .compare_exchange(server, UNKNOWN, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Folds a successful attempt's latency into `server`'s average.
    pub fn record_latency(&self, server: usize, sample: Duration) {
        self.fold_latency(server, sample);
    }

    /// Counts a failed attempt as a slow one, so `Nearest` moves away from a
    /// server that stopped answering.
    pub fn record_failure(&self, server: usize, penalty: Duration) {
        self.fold_latency(server, penalty);
    }

    fn fold_latency(&self, server: usize, sample: Duration) {
        let Some(slot) = self.latency_us.get(server) else {
            return;
        };
        // At least 1 us, so that a measured server never reads as unmeasured.
        let sample = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(ewma(old, sample))
        });
    }

    /// The server with the lowest average latency. Unmeasured servers count
    /// as fastest so each gets measured once; ties go to a random one.
    fn nearest(&self, rng: &mut impl Rng) -> Option<usize> {
        let mut order: Vec<usize> = (0..self.servers).collect();
        order.shuffle(rng);
        order
            .into_iter()
            .min_by_key(|&i| self.latency_us[i].load(Ordering::Relaxed))
    }
}

fn ewma(old: u64, sample: u64) -> u64 {
    if old == 0 {
        return sample;
    }
    let next = old as f64 * (1.0 - EWMA_WEIGHT) + sample as f64 * EWMA_WEIGHT;
    // Float-to-int `as` saturates, and the result stays >= 1 because both
    // inputs are.
    (next.round() as u64).max(1)
}

/// The servers one request will try, in order. Cycles through fresh random
/// permutations for as long as the request's deadline allows.
#[derive(Debug)]
pub(crate) struct Plan {
    servers: usize,
    queue: VecDeque<usize>,
    /// Servers that recently did not answer: last in every round.
    suspects: Vec<bool>,
}

impl Plan {
    fn new(servers: usize, first: Option<usize>, suspects: Vec<bool>, rng: &mut impl Rng) -> Self {
        let mut plan = Self {
            servers,
            queue: VecDeque::with_capacity(servers),
            suspects,
        };
        plan.refill(rng);
        if let Some(first) = first {
            plan.put_first(first);
        }
        plan
    }

    /// The next server to try.
    pub fn next_server(&mut self) -> usize {
        if self.queue.is_empty() {
            self.refill(&mut rand::rng());
        }
        // `refill` always adds `servers` (>= 1) entries.
        self.queue.pop_front().unwrap_or(0)
    }

    /// Makes `server` the next one tried (a redirect to the primary), taking
    /// it out of its later place in this round.
    pub fn put_first(&mut self, server: usize) {
        if server >= self.servers {
            return;
        }
        self.queue.retain(|&s| s != server);
        self.queue.push_front(server);
    }

    fn refill(&mut self, rng: &mut impl Rng) {
        let mut round: Vec<usize> = (0..self.servers.max(1)).collect();
        round.shuffle(rng);
        // Stable: healthy servers first, each group still in random order.
        round.sort_by_key(|&s| self.suspects.get(s).copied().unwrap_or(false));
        self.queue.extend(round);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(plan: &mut Plan, n: usize) -> Vec<usize> {
        (0..n).map(|_| plan.next_server()).collect()
    }

    #[test]
    fn every_round_visits_every_server_once() {
        let router = Router::new(Route::Random, 4);
        let mut plan = router.plan(OpKind::Read);
        for _ in 0..3 {
            let mut round = take(&mut plan, 4);
            round.sort_unstable();
            assert_eq!(round, vec![0, 1, 2, 3]);
        }
    }

    #[test]
    fn a_redirect_jumps_the_queue_without_repeating_in_the_round() {
        let mut plan = Plan::new(3, None, vec![false; 3], &mut rand::rng());
        let first = plan.next_server();
        let target = (first + 1) % 3;
        plan.put_first(target);
        assert_eq!(plan.next_server(), target);
        let last = plan.next_server();
        assert!(last != first && last != target);
        plan.put_first(99);
        assert_eq!(take(&mut plan, 3).len(), 3);
    }

    #[test]
    fn primary_route_sends_writes_to_the_known_primary_first() {
        let router = Router::new(Route::Primary, 5);
        router.set_primary(3);
        for _ in 0..20 {
            assert_eq!(router.plan(OpKind::Write).next_server(), 3);
        }
        router.forget_primary(1); // not the remembered one: no effect
        assert_eq!(router.primary(), Some(3));
        router.forget_primary(3);
        assert_eq!(router.primary(), None);
        router.set_primary(17); // out of range: ignored
        assert_eq!(router.primary(), None);
    }

    #[test]
    fn random_route_ignores_the_known_primary() {
        let router = Router::new(Route::Random, 3);
        router.set_primary(2);
        let firsts: std::collections::HashSet<usize> = (0..200)
            .map(|_| router.plan(OpKind::Write).next_server())
            .collect();
        assert_eq!(firsts.len(), 3);
    }

    #[test]
    fn nearest_route_prefers_the_lowest_latency_for_reads() {
        let router = Router::new(Route::Nearest, 3);
        router.record_latency(0, Duration::from_millis(9));
        router.record_latency(1, Duration::from_millis(1));
        router.record_latency(2, Duration::from_millis(5));
        let to_one = (0..400)
            .filter(|_| router.plan(OpKind::Read).next_server() == 1)
            .count();
        // All but the ~5 % exploration picks.
        assert!(to_one > 340, "{to_one} of 400 reads went to the nearest");
        router.record_failure(1, Duration::from_secs(2));
        let to_two = (0..400)
            .filter(|_| router.plan(OpKind::Read).next_server() == 2)
            .count();
        assert!(
            to_two > 340,
            "{to_two} of 400 reads avoided the failed server"
        );
    }

    #[test]
    fn unresponsive_servers_go_last_until_they_answer() {
        let router = Router::new(Route::Random, 3);
        router.mark_unresponsive(1);
        for _ in 0..50 {
            let mut plan = router.plan(OpKind::Read);
            let round = take(&mut plan, 3);
            assert_eq!(round[2], 1, "{round:?}");
        }
        router.mark_responsive(1);
        let firsts: std::collections::HashSet<usize> = (0..200)
            .map(|_| router.plan(OpKind::Read).next_server())
            .collect();
        assert_eq!(firsts.len(), 3);
    }

    #[test]
    fn a_suspect_primary_is_not_tried_first() {
        let router = Router::new(Route::Primary, 3);
        router.set_primary(0);
        router.mark_unresponsive(0);
        for _ in 0..20 {
            assert_ne!(router.plan(OpKind::Write).next_server(), 0);
        }
    }

    #[test]
    fn ewma_moves_a_fifth_of_the_way_and_never_reaches_zero() {
        assert_eq!(ewma(0, 500), 500);
        assert_eq!(ewma(1000, 2000), 1200);
        assert_eq!(ewma(1, 1), 1);
        assert_eq!(ewma(u64::MAX, u64::MAX), u64::MAX);
    }
}
