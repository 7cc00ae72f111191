//! Rooms: the spaces subscriptions and triggers are drawn from, their JSON
//! form, and the index the generator uses to know which subscriptions a
//! trigger must reach (the 3.x delivery rule: same key set, and for every
//! key equal values or `"*"` on either side).

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

/// A small, fast, seedable PRNG (SplitMix64): runs are reproducible from
/// `--seed`, and no dependency is needed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// A key set and, for each key, how many values it takes (`0..n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSpace {
    /// Keys, in the order given; a wildcard room has `"*"` on the last key.
    pub keys: Vec<(String, u64)>,
}

impl RoomSpace {
    /// Parses `key=N[,key=N…]`, e.g. `customer=1000,warehouse=10`.
    pub fn parse(spec: &str) -> Result<RoomSpace, String> {
        let mut keys: Vec<(String, u64)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, n) = part.split_once('=').ok_or_else(|| format!("room space {spec:?}: expected key=N"))?;
            let key = key.trim();
            let n: u64 = n.trim().parse().map_err(|_| format!("room space {spec:?}: {n:?} is not a count"))?;
            if key.is_empty() || n == 0 {
                return Err(format!("room space {spec:?}: empty key or zero count"));
            }
            if keys.iter().any(|(k, _)| k == key) {
                return Err(format!("room space {spec:?}: key {key:?} twice"));
            }
            keys.push((key.to_string(), n));
        }
        if keys.is_empty() {
            return Err(format!("room space {spec:?}: no keys"));
        }
        if keys.len() > 16 {
            return Err(format!("room space {spec:?}: at most 16 keys"));
        }
        Ok(RoomSpace { keys })
    }

    /// A space of one key.
    pub fn single(key: &str, n: u64) -> RoomSpace {
        RoomSpace { keys: vec![(key.to_string(), n.max(1))] }
    }

    /// Number of concrete rooms in the space.
    #[cfg(test)]
    pub fn size(&self) -> u64 {
        self.keys.iter().fold(1u64, |acc, (_, n)| acc.saturating_mul(*n))
    }

    /// The room every key of which is `"*"`: what the bundled backend
    /// allows for this space.
    pub fn all_wildcard(&self) -> Value {
        Value::Object(self.keys.iter().map(|(k, _)| (k.clone(), Value::from("*"))).collect())
    }
}

impl fmt::Display for RoomSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.keys.iter().map(|(k, n)| format!("{k}={n}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// A room of one of the run's spaces: a value per key, `None` being `"*"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Room {
    /// Index of the space in the run's list.
    pub space: usize,
    /// One value per key of the space, in the space's key order.
    pub values: Vec<Option<i64>>,
}

impl Room {
    /// A concrete room of `space`, uniformly drawn; with probability
    /// `wildcard_share` its last key is `"*"`.
    pub fn random(space_id: usize, space: &RoomSpace, wildcard_share: f64, rng: &mut Rng) -> Room {
        let mut values: Vec<Option<i64>> = space.keys.iter().map(|(_, n)| Some(rng.below(*n) as i64)).collect();
        if rng.chance(wildcard_share) {
            if let Some(last) = values.last_mut() {
                *last = None;
            }
        }
        Room { space: space_id, values }
    }

    /// Bitmask of the wildcard keys.
    pub fn wildcard_mask(&self) -> u32 {
        self.values.iter().enumerate().filter(|(_, v)| v.is_none()).fold(0, |m, (i, _)| m | (1 << i))
    }

    /// The room as JSON, keys named after `spaces[self.space]`.
    pub fn to_json(&self, spaces: &[RoomSpace]) -> Value {
        let mut map = Map::new();
        for ((key, _), value) in spaces[self.space].keys.iter().zip(&self.values) {
            map.insert(key.clone(), value.map_or_else(|| Value::from("*"), Value::from));
        }
        Value::Object(map)
    }

    /// When the key at `index` is `"*"`, the rooms listing each of its
    /// values explicitly (the "explicit" form of a wildcard trigger);
    /// otherwise the room itself.
    pub fn expand_last(&self, spaces: &[RoomSpace]) -> Vec<Room> {
        let Some(index) = self.values.iter().rposition(Option::is_none) else {
            return vec![self.clone()];
        };
        let n = spaces[self.space].keys[index].1;
        (0..n as i64)
            .map(|v| {
                let mut room = self.clone();
                room.values[index] = Some(v);
                room
            })
            .collect()
    }
}

/// Whether a trigger to `trigger` reaches a subscription to `sub` (the
/// rule [`SubscriptionIndex`] implements; the tests check one against the other).
#[cfg(test)]
pub fn delivers(trigger: &Room, sub: &Room) -> bool {
    trigger.space == sub.space
        && trigger.values.len() == sub.values.len()
        && trigger.values.iter().zip(&sub.values).all(|(t, s)| t.is_none() || s.is_none() || t == s)
}

/// A subscription in the index: its values and its id.
type Entry = (Vec<Option<i64>>, u32);

/// Concrete values on the keys both sides name → subscription ids.
type Table = HashMap<Vec<i64>, Vec<u32>>;

/// Index of the run's subscriptions, answering "which subscriptions does a
/// trigger to these rooms reach" without scanning them all.
///
/// Subscriptions are grouped by space and by their wildcard mask M. For a
/// trigger room with wildcard mask W, the keys outside `M | W` must be
/// equal; a table keyed by those values is built on first use for each
/// (space, M, M | W) and kept.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    /// Per space: wildcard mask → subscriptions with that mask.
    by_mask: Vec<HashMap<u32, Vec<Entry>>>,
    /// (space, M, M | W) → lookup table.
    tables: HashMap<(usize, u32, u32), Table>,
    /// Per subscription: the stamp of the last trigger that matched it, to
    /// count a subscription once per trigger.
    stamps: Vec<u64>,
    /// The current trigger's stamp.
    stamp: u64,
}

impl SubscriptionIndex {
    /// An index of `subscriptions` (id = position), over `spaces` spaces.
    pub fn new(spaces: usize, subscriptions: &[Room]) -> SubscriptionIndex {
        let mut by_mask: Vec<HashMap<u32, Vec<Entry>>> = vec![HashMap::new(); spaces];
        for (id, room) in subscriptions.iter().enumerate() {
            by_mask[room.space].entry(room.wildcard_mask()).or_default().push((room.values.clone(), id as u32));
        }
        SubscriptionIndex { by_mask, tables: HashMap::new(), stamps: vec![0; subscriptions.len()], stamp: 0 }
    }

    /// The subscriptions a trigger to `rooms` reaches, each once, appended
    /// to `out` (cleared first).
    pub fn matches(&mut self, rooms: &[Room], out: &mut Vec<u32>) {
        out.clear();
        self.stamp += 1;
        for room in rooms {
            let Some(masks) = self.by_mask.get(room.space) else { continue };
            let w = room.wildcard_mask();
            for (&m, subs) in masks {
                let u = m | w;
                let table = self.tables.entry((room.space, m, u)).or_insert_with(|| {
                    let mut table = Table::new();
                    for (values, id) in subs {
                        table.entry(concrete_outside(values, u)).or_default().push(*id);
                    }
                    table
                });
                if let Some(ids) = table.get(&concrete_outside(&room.values, u)) {
                    for &id in ids {
                        let stamp = &mut self.stamps[id as usize];
                        if *stamp != self.stamp {
                            *stamp = self.stamp;
                            out.push(id);
                        }
                    }
                }
            }
        }
    }
}

/// The values at the positions outside `mask` (all concrete there).
fn concrete_outside(values: &[Option<i64>], mask: u32) -> Vec<i64> {
    values.iter().enumerate().filter(|(i, _)| mask & (1 << i) == 0).map(|(_, v)| v.unwrap_or(i64::MIN)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(space: usize, values: &[Option<i64>]) -> Room {
        Room { space, values: values.to_vec() }
    }

    #[test]
    fn parses_spaces() {
        let space = RoomSpace::parse("customer=1000, warehouse=10").expect("valid");
        assert_eq!(space.keys, vec![("customer".to_string(), 1000), ("warehouse".to_string(), 10)]);
        assert_eq!(space.size(), 10_000);
        assert_eq!(space.to_string(), "customer=1000,warehouse=10");
        assert!(RoomSpace::parse("a").is_err());
        assert!(RoomSpace::parse("a=0").is_err());
        assert!(RoomSpace::parse("a=1,a=2").is_err());
        assert!(RoomSpace::parse("").is_err());
    }

    #[test]
    fn json_form() {
        let spaces = vec![RoomSpace::parse("customer=3,warehouse=2").expect("valid")];
        let r = room(0, &[Some(1), None]);
        assert_eq!(r.to_json(&spaces), serde_json::json!({"customer": 1, "warehouse": "*"}));
        let expanded = r.expand_last(&spaces);
        assert_eq!(expanded, vec![room(0, &[Some(1), Some(0)]), room(0, &[Some(1), Some(1)])]);
    }

    #[test]
    fn delivery_rule() {
        assert!(delivers(&room(0, &[Some(1), Some(2)]), &room(0, &[Some(1), Some(2)])));
        assert!(delivers(&room(0, &[Some(1), None]), &room(0, &[Some(1), Some(2)])));
        assert!(delivers(&room(0, &[Some(1), Some(2)]), &room(0, &[Some(1), None])));
        assert!(delivers(&room(0, &[None, Some(2)]), &room(0, &[Some(1), None])));
        assert!(!delivers(&room(0, &[Some(1), Some(2)]), &room(0, &[Some(1), Some(3)])));
        assert!(!delivers(&room(0, &[Some(1)]), &room(1, &[Some(1)])));
    }

    /// The index agrees with the rule applied to every subscription.
    #[test]
    fn index_matches_brute_force() {
        let spaces = [RoomSpace::parse("a=4,b=3,c=2").expect("valid"), RoomSpace::parse("u=5").expect("valid")];
        let mut rng = Rng::new(7);
        let mut subs = Vec::new();
        for _ in 0..400 {
            let space = rng.below(2) as usize;
            let mut r = Room::random(space, &spaces[space], 0.3, &mut rng);
            // Wildcards on any key, not only the last.
            for v in r.values.iter_mut() {
                if rng.chance(0.15) {
                    *v = None;
                }
            }
            subs.push(r);
        }
        let mut index = SubscriptionIndex::new(spaces.len(), &subs);
        let mut out = Vec::new();
        for _ in 0..300 {
            let n = 1 + rng.below(3) as usize;
            let rooms: Vec<Room> = (0..n)
                .map(|_| {
                    let space = rng.below(2) as usize;
                    let mut r = Room::random(space, &spaces[space], 0.3, &mut rng);
                    if rng.chance(0.2) {
                        r.values[0] = None;
                    }
                    r
                })
                .collect();
            index.matches(&rooms, &mut out);
            let mut got = out.clone();
            got.sort_unstable();
            let want: Vec<u32> = subs
                .iter()
                .enumerate()
                .filter(|(_, s)| rooms.iter().any(|t| delivers(t, s)))
                .map(|(i, _)| i as u32)
                .collect();
            assert_eq!(got, want, "trigger {rooms:?}");
        }
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut rng = Rng::new(1);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            counts[rng.below(10) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
        let hits = (0..100_000).filter(|_| rng.chance(0.25)).count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
        assert!(!rng.chance(0.0));
    }
}
