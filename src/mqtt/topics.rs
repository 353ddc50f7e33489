//! Subscription index: which subscribers want a topic.
//!
//! Exists so the cost of a publish depends on the number of matching
//! subscribers, not on the number of sessions: exact filters (nearly all of
//! them: `push/user/<id>`) live in a hash map keyed by topic; filters with
//! `+` or `#` live in a trie walked level by level, skipped when empty.
//! An exact topic nearly always has one subscriber (the user's device), so
//! that one is kept inline in the map's entry: a publish to it touches the
//! entry and the session, no further table; and the map's key is shared
//! with the messages routed on it instead of copying the topic per publish.

use std::collections::HashMap;
use std::sync::Arc;

/// Subscribers of one filter, by subscriber id: (handle, granted QoS).
type Subs<S> = HashMap<u64, (S, u8)>;

/// Exact map plus wildcard trie; `S` is the subscriber handle returned by `matches`.
pub struct Index<S> {
    exact: HashMap<Arc<str>, Exact<S>>,
    wild: Node<S>,
    wild_filters: usize,
}

/// The subscribers of one exact topic.
enum Exact<S> {
    One(u64, S, u8),
    Many(Box<Subs<S>>),
}

impl<S: Clone> Exact<S> {
    fn insert(&mut self, id: u64, handle: S, qos: u8) {
        match self {
            Exact::One(i, h, q) if *i == id => (*h, *q) = (handle, qos),
            Exact::One(i, h, q) => {
                let mut subs = Subs::with_capacity(2);
                subs.insert(*i, (h.clone(), *q));
                subs.insert(id, (handle, qos));
                *self = Exact::Many(Box::new(subs));
            }
            Exact::Many(subs) => {
                subs.insert(id, (handle, qos));
            }
        }
    }

    /// Removes `id`; true if it was there. The caller drops an empty entry.
    fn remove(&mut self, id: u64) -> bool {
        match self {
            Exact::One(i, ..) => *i == id,
            Exact::Many(subs) => {
                let found = subs.remove(&id).is_some();
                let last = (subs.len() == 1).then(|| subs.drain().next()).flatten();
                if let Some((i, (h, q))) = last {
                    *self = Exact::One(i, h, q);
                }
                found
            }
        }
    }

    /// Whether `remove(id)` leaves nothing.
    fn only(&self, id: u64) -> bool {
        matches!(self, Exact::One(i, ..) if *i == id)
    }

    fn extend_into(&self, out: &mut Vec<(u64, S, u8)>) {
        match self {
            Exact::One(i, h, q) => out.push((*i, h.clone(), *q)),
            Exact::Many(subs) => out.extend(subs.iter().map(|(id, (h, q))| (*id, h.clone(), *q))),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Exact::One(..) => 1,
            Exact::Many(subs) => subs.len(),
        }
    }
}

struct Node<S> {
    children: HashMap<Box<str>, Node<S>>,
    /// Filters ending at this level.
    here: Subs<S>,
    /// Filters ending with `#` after this level.
    hash: Subs<S>,
}

impl<S> Default for Node<S> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            here: HashMap::new(),
            hash: HashMap::new(),
        }
    }
}

impl<S> Node<S> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.hash.is_empty()
    }
}

impl<S> Default for Index<S> {
    fn default() -> Self {
        Index {
            exact: HashMap::new(),
            wild: Node::default(),
            wild_filters: 0,
        }
    }
}

fn is_wild(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

impl<S: Clone> Index<S> {
    /// Adds or replaces subscriber `id`'s subscription to `filter` (assumed valid).
    pub fn subscribe(&mut self, filter: &str, id: u64, handle: S, qos: u8) {
        if !is_wild(filter) {
            match self.exact.get_mut(filter) {
                Some(subs) => subs.insert(id, handle, qos),
                None => {
                    self.exact
                        .insert(filter.into(), Exact::One(id, handle, qos));
                }
            }
            return;
        }
        let mut levels: Vec<&str> = filter.split('/').collect();
        let hash = levels.last() == Some(&"#");
        if hash {
            levels.pop();
        }
        let mut node = &mut self.wild;
        for level in levels {
            node = node.children.entry(level.into()).or_default();
        }
        let subs = if hash { &mut node.hash } else { &mut node.here };
        if subs.insert(id, (handle, qos)).is_none() {
            self.wild_filters += 1;
        }
    }

    /// Removes subscriber `id` from `filter`; true if it was subscribed.
    pub fn unsubscribe(&mut self, filter: &str, id: u64) -> bool {
        if !is_wild(filter) {
            let Some(subs) = self.exact.get_mut(filter) else {
                return false;
            };
            if subs.only(id) {
                self.exact.remove(filter);
                return true;
            }
            return subs.remove(id);
        }
        let mut levels: Vec<&str> = filter.split('/').collect();
        let hash = levels.last() == Some(&"#");
        if hash {
            levels.pop();
        }
        let found = remove(&mut self.wild, &levels, hash, id);
        if found {
            self.wild_filters -= 1;
        }
        found
    }

    /// Appends every subscriber matching `topic` to `out` as (id, handle, qos),
    /// once per subscriber (highest QoS wins when several filters match):
    /// first the subscribers of exactly `topic`, then those only matching
    /// through a wildcard. Returns the exact map's shared copy of `topic`
    /// when it has one, and how many exact subscribers come first.
    pub fn matches(&self, topic: &str, out: &mut Vec<(u64, S, u8)>) -> (Option<Arc<str>>, usize) {
        let start = out.len();
        let mut key = None;
        if let Some((k, subs)) = self.exact.get_key_value(topic) {
            subs.extend_into(out);
            key = Some(Arc::clone(k));
        }
        let exact = out.len() - start;
        if self.wild_filters == 0 {
            return (key, exact);
        }
        let wild = out.len();
        walk(
            &self.wild,
            &topic.split('/').collect::<Vec<_>>(),
            0,
            topic.starts_with('$'),
            out,
        );
        if out.len() == wild {
            return (key, exact);
        }
        out[wild..].sort_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)));
        // Exact subscribers are few (one device, nearly always); sorted when not.
        let sorted = exact > 8;
        if sorted {
            out[start..wild].sort_by_key(|e| e.0);
        }
        let mut kept = wild;
        let mut last = None;
        for i in wild..out.len() {
            let (id, qos) = (out[i].0, out[i].2);
            if last == Some(id) {
                continue;
            }
            last = Some(id);
            let head = &mut out[start..wild];
            let also_exact = match sorted {
                true => head.binary_search_by_key(&id, |e| e.0).ok(),
                false => head.iter().position(|e| e.0 == id),
            };
            match also_exact {
                Some(j) => head[j].2 = head[j].2.max(qos),
                None => {
                    out.swap(kept, i);
                    kept += 1;
                }
            }
        }
        out.truncate(kept);
        (key, exact)
    }

    /// Number of (filter, subscriber) pairs.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.exact.values().map(Exact::len).sum::<usize>() + self.wild_filters
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn walk<S: Clone>(
    node: &Node<S>,
    levels: &[&str],
    i: usize,
    dollar: bool,
    out: &mut Vec<(u64, S, u8)>,
) {
    // `$` topics are not matched by a leading wildcard.
    let wild_ok = !(i == 0 && dollar);
    if wild_ok {
        out.extend(node.hash.iter().map(|(id, (h, q))| (*id, h.clone(), *q)));
    }
    let Some(level) = levels.get(i) else {
        out.extend(node.here.iter().map(|(id, (h, q))| (*id, h.clone(), *q)));
        return;
    };
    if let Some(child) = node.children.get(*level) {
        walk(child, levels, i + 1, dollar, out);
    }
    if wild_ok && *level != "+" {
        if let Some(child) = node.children.get("+") {
            walk(child, levels, i + 1, dollar, out);
        }
    }
}

fn remove<S>(node: &mut Node<S>, levels: &[&str], hash: bool, id: u64) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        let subs = if hash { &mut node.hash } else { &mut node.here };
        return subs.remove(&id).is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let found = remove(child, rest, hash, id);
    if child.is_empty() {
        node.children.remove(*first);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(index: &Index<()>, topic: &str) -> Vec<(u64, u8)> {
        let mut out = Vec::new();
        index.matches(topic, &mut out);
        let mut v: Vec<(u64, u8)> = out.into_iter().map(|(id, _, q)| (id, q)).collect();
        v.sort();
        v
    }

    #[test]
    fn exact_match_only_same_topic() {
        let mut ix = Index::default();
        ix.subscribe("push/user/1", 1, (), 1);
        ix.subscribe("push/user/2", 2, (), 0);
        assert_eq!(ids(&ix, "push/user/1"), vec![(1, 1)]);
        assert_eq!(ids(&ix, "push/user/2"), vec![(2, 0)]);
        assert!(ids(&ix, "push/user/3").is_empty());
        assert!(ids(&ix, "push/user").is_empty());
        assert!(ids(&ix, "push/user/1/x").is_empty());
    }

    #[test]
    fn plus_matches_one_level() {
        let mut ix = Index::default();
        ix.subscribe("push/+/1", 7, (), 1);
        assert_eq!(ids(&ix, "push/user/1"), vec![(7, 1)]);
        assert_eq!(ids(&ix, "push/group/1"), vec![(7, 1)]);
        assert_eq!(ids(&ix, "push//1"), vec![(7, 1)]);
        assert!(ids(&ix, "push/user/2").is_empty());
        assert!(ids(&ix, "push/a/b/1").is_empty());
        assert!(ids(&ix, "push/user").is_empty());
    }

    #[test]
    fn hash_matches_parent_and_descendants() {
        let mut ix = Index::default();
        ix.subscribe("push/#", 3, (), 1);
        assert_eq!(ids(&ix, "push"), vec![(3, 1)]);
        assert_eq!(ids(&ix, "push/user/1"), vec![(3, 1)]);
        assert!(ids(&ix, "other/user").is_empty());
        ix.subscribe("#", 4, (), 0);
        assert_eq!(ids(&ix, "other/user"), vec![(4, 0)]);
        assert_eq!(ids(&ix, "push/x"), vec![(3, 1), (4, 0)]);
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        let mut ix = Index::default();
        ix.subscribe("#", 1, (), 0);
        ix.subscribe("+/sys", 2, (), 0);
        ix.subscribe("$SYS/#", 3, (), 0);
        ix.subscribe("$SYS/sys", 4, (), 0);
        assert_eq!(ids(&ix, "$SYS/sys"), vec![(3, 0), (4, 0)]);
        assert_eq!(ids(&ix, "a/sys"), vec![(1, 0), (2, 0)]);
    }

    #[test]
    fn one_delivery_per_subscriber_with_highest_qos() {
        let mut ix = Index::default();
        ix.subscribe("a/b", 1, (), 0);
        ix.subscribe("a/+", 1, (), 1);
        ix.subscribe("#", 1, (), 0);
        ix.subscribe("a/#", 2, (), 0);
        assert_eq!(ids(&ix, "a/b"), vec![(1, 1), (2, 0)]);
    }

    #[test]
    fn exact_subscribers_come_first_and_are_counted() {
        let mut ix = Index::default();
        ix.subscribe("push/user/1", 5, (), 0);
        ix.subscribe("push/user/#", 9, (), 1);
        ix.subscribe("push/+/1", 5, (), 1);
        ix.subscribe("push/#", 9, (), 0);
        let mut out = Vec::new();
        let (key, exact) = ix.matches("push/user/1", &mut out);
        assert_eq!(key.as_deref(), Some("push/user/1"));
        assert_eq!(exact, 1);
        let got: Vec<(u64, u8)> = out.iter().map(|(id, _, q)| (*id, *q)).collect();
        assert_eq!(got, [(5, 1), (9, 1)]);
        out.clear();
        for id in 10..30 {
            ix.subscribe("push/user/1", id, (), 0);
        }
        ix.subscribe("push/+/1", 20, (), 1);
        let (_, exact) = ix.matches("push/user/1", &mut out);
        assert_eq!((exact, out.len()), (21, 22));
        assert!(out[..21].iter().any(|(id, _, q)| (*id, *q) == (20, 1)));
        assert_eq!(out[21].0, 9);
    }

    #[test]
    fn resubscribe_replaces_qos() {
        let mut ix = Index::default();
        ix.subscribe("a", 1, (), 0);
        ix.subscribe("a", 1, (), 1);
        ix.subscribe("a/+", 1, (), 0);
        ix.subscribe("a/+", 1, (), 1);
        assert_eq!(ix.len(), 2);
        assert_eq!(ids(&ix, "a"), vec![(1, 1)]);
        assert_eq!(ids(&ix, "a/x"), vec![(1, 1)]);
    }

    #[test]
    fn unsubscribe_removes_and_prunes() {
        let mut ix = Index::default();
        ix.subscribe("a/b", 1, (), 1);
        ix.subscribe("a/b", 2, (), 1);
        ix.subscribe("a/+/c", 1, (), 1);
        ix.subscribe("a/#", 2, (), 1);
        assert!(ix.unsubscribe("a/b", 1));
        assert!(!ix.unsubscribe("a/b", 1));
        assert!(!ix.unsubscribe("x/+", 1));
        assert_eq!(ids(&ix, "a/b"), vec![(2, 1)]);
        assert!(ix.unsubscribe("a/+/c", 1));
        assert!(ix.unsubscribe("a/#", 2));
        assert!(ix.unsubscribe("a/b", 2));
        assert!(ix.is_empty());
        assert!(ix.exact.is_empty());
        assert!(ix.wild.is_empty());
    }
}
