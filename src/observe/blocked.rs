//! Which hosts are blocked most: a heavy-hitter sketch over the last hour, in bounded memory,
//! for `GET /v1/blocked`.
//!
//! The data path only counts each block in a small map of its own thread (one uncontended lock,
//! no allocation for a key it has seen since the last drain), and drops it, counted, when the
//! maps already hold [`PENDING`] other keys in all. A thread of its own takes those maps every
//! [`DRAIN_EVERY`] and adds them into twelve five-minute windows, each a space-saving summary
//! (Metwally et al.) of at most [`KEEP`] keys, compacted back to [`KEEP`] whenever it reaches
//! twice that: a key that ever held at least a 1/[`KEEP`] share of a window's blocks is never
//! evicted from it, and every count is an upper bound that overshoots by at most the window's
//! `error`. A flood of random unfiled names therefore costs at most 12 × 2 × [`KEEP`] keys plus
//! the pending maps, each with a host of at most [`MAX_HOST`] bytes, however many names it uses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use hashbrown::Equivalent;

use ipnet::IpNet;

use crate::core::decision::{Decision, Reason};

/// Keys a window keeps after compaction (it holds up to twice as many between compactions).
pub(crate) const KEEP: usize = 1024;
/// Keys the pending maps hold in all between drains (about: threads adding at once may each
/// add one more); blocks of other keys are dropped and counted until the next drain.
const PENDING: usize = 16 * 1024;
/// Slots a drained map keeps for the next 20 ms; a flood's larger map gives its memory back.
const PENDING_KEEP: usize = 1024;
/// Pending maps: threads share them round-robin (a lock each, uncontended with up to this many
/// threads).
const SHARDS: usize = 64;
/// How often the pending maps are drained.
const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// Length of one window.
const WINDOW: Duration = Duration::from_secs(300);
/// Windows kept: one hour.
const WINDOWS: usize = 12;
/// Longest host kept (a DNS name has at most 253 characters).
const MAX_HOST: usize = 253;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    listener: Box<str>,
    host: Box<str>,
    reason: Reason,
    dst: IpAddr,
}

/// A [`Key`] borrowed from the data path: it hashes as the key it equals, so a pending map is
/// searched without allocating.
#[derive(Hash)]
struct KeyRef<'a> {
    listener: &'a str,
    host: &'a str,
    reason: Reason,
    dst: IpAddr,
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.reason == key.reason
            && self.dst == key.dst
            && self.host == &*key.host
            && self.listener == &*key.listener
    }
}

/// The blocks one shard counted since the last drain.
type Pending = hashbrown::HashMap<Key, u64, RandomState>;

/// The pending maps and the number of keys they hold.
struct Shards {
    maps: Box<[Shard]>,
    keys: AtomicUsize,
}

/// One pending map, on cache lines of its own: threads that count blocks at once do not write
/// to the same line.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<Pending>);

/// A space-saving summary of one window.
#[derive(Default)]
struct Summary {
    /// Count (an upper bound) and the overestimate it may carry.
    counts: HashMap<Key, (u64, u64), RandomState>,
    /// The largest count evicted so far: a new key may have had up to this many before.
    floor: u64,
    blocks: u64,
}

impl Summary {
    fn add(&mut self, key: Key, n: u64) {
        self.blocks += n;
        let floor = self.floor;
        self.counts.entry(key).or_insert((floor, floor)).0 += n;
        if self.counts.len() >= 2 * KEEP {
            self.compact();
        }
    }

    fn compact(&mut self) {
        let mut all: Vec<(Key, (u64, u64))> = self.counts.drain().collect();
        all.select_nth_unstable_by(KEEP, |a, b| b.1.0.cmp(&a.1.0));
        self.floor = self.floor.max(all[KEEP].1.0);
        all.truncate(KEEP);
        self.counts = all.into_iter().collect();
    }
}

struct Window {
    /// Index of the window since start (`elapsed / WINDOW`).
    index: u64,
    summary: Summary,
}

#[derive(Default)]
struct Windows {
    ring: Vec<Window>,
}

impl Windows {
    fn current(&mut self, index: u64) -> &mut Summary {
        if self.ring.last().is_none_or(|w| w.index != index) {
            self.ring.retain(|w| w.index + WINDOWS as u64 > index);
            self.ring.push(Window {
                index,
                summary: Summary::default(),
            });
        }
        &mut self.ring.last_mut().expect("pushed above").summary
    }
}

/// The sketch: the data path's side ([`Blocked::record`]) and the API's ([`Blocked::top`]).
pub(crate) struct Blocked {
    /// The draining thread holds them weakly: it ends once the sketch is dropped.
    pending: Arc<Shards>,
    windows: Arc<Mutex<Windows>>,
    dropped: AtomicU64,
    started: Instant,
}

/// A filter and size for [`Blocked::top`].
pub(crate) struct Query<'a> {
    pub top: usize,
    pub listener: Option<&'a str>,
    pub dst: Option<IpNet>,
}

impl Blocked {
    /// Starts the draining thread; it ends when the sketch is dropped.
    pub(crate) fn new() -> Blocked {
        let pending = Arc::new(Shards {
            maps: (0..SHARDS).map(|_| Shard::default()).collect(),
            keys: AtomicUsize::new(0),
        });
        let windows: Arc<Mutex<Windows>> = Arc::default();
        let started = Instant::now();
        let (from, into) = (Arc::downgrade(&pending), windows.clone());
        let spawned = std::thread::Builder::new()
            .name("blocked-hosts".into())
            .spawn(move || drain_loop(&from, &into, started));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the blocked-hosts thread; /v1/blocked stays empty");
        }
        Blocked {
            pending,
            windows,
            dropped: AtomicU64::new(0),
            started,
        }
    }

    /// Counts one decision if it blocks: every listener hands each decision here. Report mode's
    /// would-be blocks count too: that is when an operator asks who they would be. Never waits
    /// on another thread but the drain, which holds a shard's lock only to swap its map out; a
    /// block of a new key when the pending maps are full is dropped and counted.
    pub(crate) fn record(
        &self,
        listener: &str,
        decision: Decision,
        host: &str,
        reason: Reason,
        dst: IpAddr,
    ) {
        if !matches!(decision, Decision::Block | Decision::Report) {
            return;
        }
        // A host that did not parse is kept as sent: cut to a DNS name's length, so a key's
        // size is bounded too.
        let mut end = host.len().min(MAX_HOST);
        while !host.is_char_boundary(end) {
            end -= 1;
        }
        let key = KeyRef {
            listener,
            host: &host[..end],
            reason,
            dst,
        };
        let mut pending = self.pending.maps[shard()]
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pending.get_mut(&key) {
            *n += 1;
        } else if self.pending.keys.load(Ordering::Relaxed) < PENDING {
            self.pending.keys.fetch_add(1, Ordering::Relaxed);
            let key = Key {
                listener: key.listener.into(),
                host: key.host.into(),
                reason: key.reason,
                dst,
            };
            pending.insert(key, 1);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The `top` hosts blocked most in the last hour, with their reasons, destination prefixes
    /// and listeners, as the JSON answer of `GET /v1/blocked`.
    pub(crate) fn top(&self, q: &Query<'_>) -> serde_json::Value {
        struct Host {
            count: u64,
            error: u64,
            reasons: HashMap<&'static str, u64>,
            dst: HashMap<IpNet, u64>,
            listeners: HashMap<String, u64>,
        }
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.window_index();
        let mut hosts: HashMap<&str, Host> = HashMap::new();
        let mut blocks = 0;
        let mut error = 0;
        let mut tracked = 0;
        for w in windows
            .ring
            .iter()
            .filter(|w| w.index + WINDOWS as u64 > now)
        {
            blocks += w.summary.blocks;
            error += w.summary.floor;
            tracked += w.summary.counts.len();
            for (key, &(count, err)) in &w.summary.counts {
                if q.listener.is_some_and(|l| l != &*key.listener)
                    || q.dst.is_some_and(|net| !net.contains(&key.dst))
                {
                    continue;
                }
                let h = hosts.entry(&key.host).or_insert_with(|| Host {
                    count: 0,
                    error: 0,
                    reasons: HashMap::new(),
                    dst: HashMap::new(),
                    listeners: HashMap::new(),
                });
                h.count += count;
                h.error += err;
                *h.reasons.entry(key.reason.as_str()).or_default() += count;
                *h.dst.entry(prefix(key.dst)).or_default() += count;
                *h.listeners.entry(key.listener.to_string()).or_default() += count;
            }
        }
        let mut ranked: Vec<(&str, Host)> = hosts.into_iter().collect();
        ranked.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        ranked.truncate(q.top);
        let sorted = |m: HashMap<String, u64>| {
            let mut v: Vec<(String, u64)> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v.into_iter()
                .map(|(k, n)| (k, serde_json::Value::from(n)))
                .collect::<serde_json::Map<_, _>>()
        };
        let list: Vec<serde_json::Value> = ranked
            .into_iter()
            .map(|(host, h)| {
                serde_json::json!({
                    "host": host,
                    "count": h.count,
                    "error": h.error,
                    "reasons": sorted(h.reasons.into_iter().map(|(k, n)| (k.to_string(), n)).collect()),
                    "dst": sorted(h.dst.into_iter().map(|(k, n)| (k.to_string(), n)).collect()),
                    "listeners": sorted(h.listeners),
                })
            })
            .collect();
        serde_json::json!({
            "window_seconds": WINDOW.as_secs() * WINDOWS as u64,
            "blocks": blocks,
            "error": error,
            "dropped": self.dropped.load(Ordering::Relaxed),
            "tracked": tracked,
            "capacity": WINDOWS * 2 * KEEP,
            "hosts": list,
        })
    }

    fn window_index(&self) -> u64 {
        self.started.elapsed().as_secs() / WINDOW.as_secs()
    }
}

/// The destination prefix a block is reported under: the /24 of an IPv4 address, the /64 of an
/// IPv6 one.
fn prefix(ip: IpAddr) -> IpNet {
    let len = if ip.is_ipv4() { 24 } else { 64 };
    IpNet::new(ip, len).map_or_else(|_| IpNet::from(ip), |n| n.trunc())
}

/// This thread's shard of the pending maps, assigned round-robin at its first block.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// Every [`DRAIN_EVERY`], swaps each shard's pending map for an empty one and adds what it
/// counted to the current window, until the sketch is dropped.
fn drain_loop(pending: &Weak<Shards>, windows: &Mutex<Windows>, started: Instant) {
    let mut taken = Pending::default();
    loop {
        std::thread::sleep(DRAIN_EVERY);
        let Some(shards) = pending.upgrade() else {
            return;
        };
        for shard in shards.maps.iter() {
            {
                let mut shard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
                if shard.is_empty() {
                    continue;
                }
                std::mem::swap(&mut *shard, &mut taken);
            }
            shards.keys.fetch_sub(taken.len(), Ordering::Relaxed);
            let index = started.elapsed().as_secs() / WINDOW.as_secs();
            let mut w = windows.lock().unwrap_or_else(|p| p.into_inner());
            let summary = w.current(index);
            for (key, n) in taken.drain() {
                summary.add(key, n);
            }
            taken.shrink_to(PENDING_KEEP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(host: &str) -> Key {
        Key {
            listener: "http".into(),
            host: host.into(),
            reason: Reason::Unfiled,
            dst: [10, 0, 0, 1].into(),
        }
    }

    #[test]
    fn heavy_hitters_survive_a_flood_and_memory_stays_bounded() {
        let mut s = Summary::default();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..200_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            s.add(key(&format!("r{state:x}.cn")), 1);
            if i % 10 == 0 {
                s.add(key("heavy.cn"), 1);
            }
            if i % 40 == 0 {
                s.add(key("second.cn"), 1);
            }
            assert!(s.counts.len() < 2 * KEEP);
        }
        let (heavy, heavy_err) = s.counts[&key("heavy.cn")];
        assert!(
            heavy >= 20_000 && heavy - heavy_err <= 20_000,
            "{heavy} {heavy_err}"
        );
        let (second, second_err) = s.counts[&key("second.cn")];
        assert!(second >= 5_000 && second - second_err <= 5_000);
        let mut top: Vec<_> = s.counts.iter().collect();
        top.sort_by_key(|e| std::cmp::Reverse(e.1.0));
        assert_eq!(&*top[0].0.host, "heavy.cn");
        assert_eq!(&*top[1].0.host, "second.cn");
    }

    #[test]
    fn recorded_blocks_reach_the_answer_and_long_hosts_are_cut() {
        let b = Blocked::new();
        let long = "é".repeat(5000);
        for _ in 0..3 {
            b.record(
                "http",
                Decision::Block,
                "a.cn",
                Reason::Unfiled,
                [10, 0, 0, 1].into(),
            );
        }
        b.record(
            "tls",
            Decision::Block,
            &long,
            Reason::InvalidSni,
            [10, 0, 1, 1].into(),
        );
        std::thread::sleep(DRAIN_EVERY * 10);
        let all = b.top(&Query {
            top: 10,
            listener: None,
            dst: None,
        });
        assert_eq!(all["blocks"], 4);
        assert_eq!(all["hosts"][0]["host"], "a.cn");
        assert_eq!(all["hosts"][0]["reasons"]["unfiled"], 3);
        assert_eq!(all["hosts"][0]["dst"]["10.0.0.0/24"], 3);
        let cut = all["hosts"][1]["host"].as_str().unwrap();
        assert!(
            cut.len() <= MAX_HOST && cut.len() >= MAX_HOST - 1,
            "{}",
            cut.len()
        );
        let tls = b.top(&Query {
            top: 10,
            listener: Some("tls"),
            dst: Some("10.0.1.0/24".parse().unwrap()),
        });
        assert_eq!(tls["hosts"].as_array().unwrap().len(), 1);
    }

    /// Each block is counted or dropped and counted, never lost: a full pending map drops new
    /// keys until the next drain, while keys it holds keep counting.
    #[test]
    fn every_block_is_counted_or_dropped_and_known_keys_keep_counting() {
        let b = Blocked::new();
        let dst = [10, 0, 0, 1].into();
        let total = 3 * PENDING as u64;
        for i in 0..total {
            let host = if i % 10 == 0 {
                "heavy.cn".to_string()
            } else {
                format!("r{i}.cn")
            };
            b.record("http", Decision::Block, &host, Reason::Unfiled, dst);
        }
        b.record("http", Decision::Allow, "filed.cn", Reason::Filed, dst);
        std::thread::sleep(DRAIN_EVERY * 10);
        let all = b.top(&Query {
            top: 1,
            listener: None,
            dst: None,
        });
        let (blocks, dropped) = (
            all["blocks"].as_u64().unwrap(),
            all["dropped"].as_u64().unwrap(),
        );
        assert_eq!(blocks + dropped, total, "{all}");
        assert_eq!(all["hosts"][0]["host"], "heavy.cn", "{all}");
        let heavy = all["hosts"][0]["count"].as_u64().unwrap();
        assert!(heavy >= total / 10, "{all}");
    }

    #[test]
    fn prefixes() {
        assert_eq!(prefix([10, 1, 2, 3].into()).to_string(), "10.1.2.0/24");
        assert_eq!(
            prefix("2001:db8::1".parse().unwrap()).to_string(),
            "2001:db8::/64"
        );
    }
}
