//! Module heads kept in memory, so that a poll or a change watch that finds nothing new, the
//! common case by far, costs no database read, and a change to a group's module read by a
//! thousand boxes at once is read from the database once.
//!
//! The cache is exact only while this process hears of every write, so it is on only then:
//! always for the embedded database (this process is its only writer, and every write goes
//! through [`super::HubStore`]), and for PostgreSQL while the replica's LISTEN connection is
//! up. Every notification of a write to a key forgets that key's heads before the boxes are
//! woken ([`super::Watchers::wake`]); a lost LISTEN connection turns the cache off until the
//! next one is listening.
//!
//! A read that races a write must not put the older heads back after the write's
//! notification forgot them: each read takes a ticket (the key's count of forgets and the
//! cache's epoch) and its heads are kept only if the ticket is still current.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A module's head per module name, for one key; a module never written is absent (head 0).
pub type Heads = Arc<HashMap<String, u64>>;

#[derive(Default)]
pub struct HeadCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    on: bool,
    /// Raised when everything is forgotten or the cache is turned off or on.
    epoch: u64,
    /// Per key, how many times it was forgotten: the ticket of a read in flight.
    forgets: HashMap<String, u64>,
    heads: HashMap<String, Heads>,
}

/// What the cache holds for a key.
pub enum Lookup {
    Hit(Heads),
    /// Not held: read the heads and [`HeadCache::offer`] them with this ticket.
    Miss(Ticket),
    /// The cache is off: read the database.
    Off,
}

pub struct Ticket {
    epoch: u64,
    forgets: u64,
}

impl HeadCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns the cache on (this process hears of every write from now on) or off (it may
    /// not), forgetting everything either way.
    pub fn set_on(&self, on: bool) {
        let mut inner = self.lock();
        inner.on = on;
        inner.epoch = inner.epoch.wrapping_add(1);
        inner.heads.clear();
    }

    pub fn lookup(&self, key: &str) -> Lookup {
        let inner = self.lock();
        if !inner.on {
            return Lookup::Off;
        }
        match inner.heads.get(key) {
            Some(heads) => Lookup::Hit(heads.clone()),
            None => Lookup::Miss(Ticket {
                epoch: inner.epoch,
                forgets: inner.forgets.get(key).copied().unwrap_or(0),
            }),
        }
    }

    /// Keeps the heads read for `key` under `ticket`, unless a write was heard since.
    pub fn offer(&self, key: &str, ticket: Ticket, heads: Heads) {
        let mut inner = self.lock();
        let current = inner.on
            && inner.epoch == ticket.epoch
            && inner.forgets.get(key).copied().unwrap_or(0) == ticket.forgets;
        if current {
            inner.heads.insert(key.to_owned(), heads);
        }
    }

    /// Forgets `key`'s heads: a write to it was heard.
    pub fn forget(&self, key: &str) {
        let mut inner = self.lock();
        inner.heads.remove(key);
        let count = inner.forgets.entry(key.to_owned()).or_insert(0);
        *count = count.wrapping_add(1);
    }

    /// Forgets every key's heads: writes may have been missed.
    pub fn forget_all(&self) {
        let mut inner = self.lock();
        inner.epoch = inner.epoch.wrapping_add(1);
        inner.heads.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(head: u64) -> Heads {
        Arc::new(HashMap::from([("catalog".to_owned(), head)]))
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let cache = HeadCache::default();
        assert!(matches!(cache.lookup("s1"), Lookup::Off));
        cache.set_on(true);
        let Lookup::Miss(ticket) = cache.lookup("s1") else {
            panic!("an empty cache holds nothing");
        };
        // The write's notification arrives while the read is in flight.
        cache.forget("s1");
        cache.offer("s1", ticket, heads(1));
        assert!(matches!(cache.lookup("s1"), Lookup::Miss(_)));
        // A read after it is kept, and a write to another key leaves it.
        let Lookup::Miss(ticket) = cache.lookup("s1") else {
            panic!("nothing was kept");
        };
        cache.offer("s1", ticket, heads(2));
        cache.forget("s2");
        match cache.lookup("s1") {
            Lookup::Hit(h) => assert_eq!(h.get("catalog"), Some(&2)),
            _ => panic!("the read after the write was not kept"),
        }
        // Everything forgotten, or the cache off: a ticket from before is refused.
        let Lookup::Miss(ticket) = cache.lookup("s3") else {
            panic!("s3 was never read");
        };
        cache.forget_all();
        cache.offer("s3", ticket, heads(3));
        assert!(matches!(cache.lookup("s1"), Lookup::Miss(_)));
        assert!(matches!(cache.lookup("s3"), Lookup::Miss(_)));
        cache.set_on(false);
        assert!(matches!(cache.lookup("s1"), Lookup::Off));
    }
}
