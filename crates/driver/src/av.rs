// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Address vectors (`FI_AV_TABLE` semantics): the n-th inserted address gets index n.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use vfabric_proto::FabricAddr;

use crate::domain::DomainInner;
use crate::{Error, Result};

/// An index into an [`AddressVector`] (`fi_addr_t`).
pub type FiAddr = u64;
/// "Any source" for receives (`FI_ADDR_UNSPEC`).
pub const FI_ADDR_UNSPEC: FiAddr = u64::MAX;
/// "Unknown address" in completions (`FI_ADDR_NOTAVAIL`).
pub const FI_ADDR_NOTAVAIL: FiAddr = u64::MAX;

/// Hasher of the reverse map (a `FabricAddr` hashes as three integers): one multiply-rotate
/// step per integer instead of SipHash, which dominated the cost of a receive completion. The
/// keys are addresses the application inserted, so no one picks them to collide.
#[derive(Default, Clone, Copy)]
struct AddrHasher(u64);

impl AddrHasher {
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.add(u64::from(*b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
struct AvTable {
    entries: Vec<Option<FabricAddr>>,
    reverse: HashMap<FabricAddr, FiAddr, BuildHasherDefault<AddrHasher>>,
}

pub(crate) struct AvShared {
    table: RwLock<AvTable>,
    /// Bumped (under the table's write lock) by every insert and remove: a remembered answer
    /// is valid while this is unchanged.
    generation: AtomicU64,
    /// The last forward answer (generation, fi_addr, address) and the last reverse answer
    /// (generation, address, index or `FI_ADDR_NOTAVAIL`): a sender talks to one peer for a
    /// while, a receiver hears from one, so a few loads and compares, no lock, usually answer.
    forward: Memo,
    reverse: Memo,
}

/// One remembered answer of four words, read and written without a lock (a sequence lock: a
/// reader that overlaps a writer gets `None` and asks the table; a writer that finds another
/// one active leaves the memo to it).
struct Memo {
    /// Odd while a writer is at work.
    seq: AtomicU64,
    words: [AtomicU64; 4],
}

/// First word of an empty memo: no generation reaches it.
const NO_GENERATION: u64 = u64::MAX;

impl Memo {
    fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            words: [
                AtomicU64::new(NO_GENERATION),
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
            ],
        }
    }

    #[inline]
    fn read(&self) -> Option<[u64; 4]> {
        let before = self.seq.load(Ordering::Acquire);
        if before & 1 != 0 {
            return None;
        }
        let w = [
            self.words[0].load(Ordering::Relaxed),
            self.words[1].load(Ordering::Relaxed),
            self.words[2].load(Ordering::Relaxed),
            self.words[3].load(Ordering::Relaxed),
        ];
        // The words before the second look at `seq`.
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == before).then_some(w)
    }

    fn write(&self, w: [u64; 4]) {
        let before = self.seq.load(Ordering::Relaxed);
        if before & 1 != 0
            || self
                .seq
                .compare_exchange(before, before + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // `seq` odd before any word changes.
        fence(Ordering::Release);
        for (slot, v) in self.words.iter().zip(w) {
            slot.store(v, Ordering::Relaxed);
        }
        self.seq.store(before + 2, Ordering::Release);
    }
}

/// An address as two memo words.
fn addr_words(a: &FabricAddr) -> [u64; 2] {
    [a.node, u64::from(a.ep) | (u64::from(a.generation) << 32)]
}

fn addr_of_words(node: u64, rest: u64) -> FabricAddr {
    FabricAddr::new(node, rest as u32, (rest >> 32) as u32)
}

impl AvShared {
    fn new() -> Self {
        Self {
            table: RwLock::new(AvTable::default()),
            generation: AtomicU64::new(0),
            forward: Memo::new(),
            reverse: Memo::new(),
        }
    }

    #[inline]
    pub(crate) fn lookup(&self, fi_addr: FiAddr) -> Result<FabricAddr> {
        let now = self.generation.load(Ordering::Acquire);
        if let Some([generation, key, node, rest]) = self.forward.read() {
            if generation == now && key == fi_addr {
                return Ok(addr_of_words(node, rest));
            }
        }
        self.lookup_table(fi_addr)
    }

    /// [`AvShared::lookup`] in the table (and remembered).
    #[cold]
    #[inline(never)]
    fn lookup_table(&self, fi_addr: FiAddr) -> Result<FabricAddr> {
        let table = self.table.read().unwrap();
        // Read under the table lock: consistent with what the table says now.
        let generation = self.generation.load(Ordering::Acquire);
        let addr = table.entries.get(fi_addr as usize).copied().flatten();
        drop(table);
        let addr =
            addr.ok_or_else(|| Error::InvalidArgument(format!("fi_addr {fi_addr} not in the AV")))?;
        let [node, rest] = addr_words(&addr);
        self.forward.write([generation, fi_addr, node, rest]);
        Ok(addr)
    }

    #[inline]
    pub(crate) fn reverse_lookup(&self, addr: &FabricAddr) -> Option<FiAddr> {
        let now = self.generation.load(Ordering::Acquire);
        let [node, rest] = addr_words(addr);
        if let Some([generation, n, r, found]) = self.reverse.read() {
            if generation == now && n == node && r == rest {
                return (found != FI_ADDR_NOTAVAIL).then_some(found);
            }
        }
        self.reverse_lookup_table(addr)
    }

    /// [`AvShared::reverse_lookup`] in the table (and remembered).
    #[cold]
    #[inline(never)]
    fn reverse_lookup_table(&self, addr: &FabricAddr) -> Option<FiAddr> {
        let [node, rest] = addr_words(addr);
        let table = self.table.read().unwrap();
        let generation = self.generation.load(Ordering::Acquire);
        let found = table.reverse.get(addr).copied();
        drop(table);
        self.reverse
            .write([generation, node, rest, found.unwrap_or(FI_ADDR_NOTAVAIL)]);
        found
    }

    /// Modify the table; remembered answers become stale.
    fn update<T>(&self, f: impl FnOnce(&mut AvTable) -> T) -> T {
        let mut table = self.table.write().unwrap();
        let r = f(&mut table);
        self.generation.fetch_add(1, Ordering::Release);
        r
    }
}

/// An address vector. `Send + Sync`.
pub struct AddressVector {
    pub(crate) domain: Arc<DomainInner>,
    pub(crate) shared: Arc<AvShared>,
}

impl std::fmt::Debug for AddressVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressVector")
            .field("count", &self.count())
            .finish()
    }
}

impl AddressVector {
    pub(crate) fn new(domain: Arc<DomainInner>) -> Self {
        Self {
            domain,
            shared: Arc::new(AvShared::new()),
        }
    }

    /// `fi_av_insert` of one address. An address of another fabric is refused
    /// ([`Error::ForeignFabric`]): it could only ever fail, or, on a fabric that happened to
    /// number its endpoints alike, reach the wrong peer.
    pub fn insert(&self, addr: FabricAddr) -> Result<FiAddr> {
        let ours = self.domain.fabric_id();
        if addr.fabric() != ours {
            return Err(Error::ForeignFabric { addr, ours });
        }
        Ok(self.shared.update(|t| {
            let idx = t.entries.len() as FiAddr;
            t.entries.push(Some(addr));
            t.reverse.entry(addr).or_insert(idx);
            idx
        }))
    }

    /// Insert an address in its 16-byte wire form (what `Endpoint::getname` produces).
    pub fn insert_bytes(&self, bytes: &[u8]) -> Result<FiAddr> {
        let a = FabricAddr::from_bytes(bytes)
            .map_err(|e| Error::InvalidArgument(format!("address: {e}")))?;
        self.insert(a)
    }

    /// `fi_av_insertsvc`-like: insert a printable address (`vfab://FABRIC.HOST.DEV/EP.GEN`).
    pub fn insert_str(&self, s: &str) -> Result<FiAddr> {
        let a: FabricAddr = s
            .trim()
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("address {s:?}: {e}")))?;
        self.insert(a)
    }

    /// `fi_av_remove`. The index is not reused.
    pub fn remove(&self, fi_addr: FiAddr) -> Result<()> {
        self.shared.update(|t| {
            let slot = t.entries.get_mut(fi_addr as usize).ok_or_else(|| {
                Error::InvalidArgument(format!("fi_addr {fi_addr} not in the AV"))
            })?;
            let Some(addr) = slot.take() else {
                return Err(Error::InvalidArgument(format!(
                    "fi_addr {fi_addr} already removed"
                )));
            };
            if t.reverse.get(&addr) == Some(&fi_addr) {
                t.reverse.remove(&addr);
                if let Some(other) = t.entries.iter().position(|e| *e == Some(addr)) {
                    t.reverse.insert(addr, other as FiAddr);
                }
            }
            Ok(())
        })
    }

    /// `fi_av_lookup`.
    pub fn lookup(&self, fi_addr: FiAddr) -> Result<FabricAddr> {
        self.shared.lookup(fi_addr)
    }

    /// Index of `addr`, if inserted (used for `CqEntry::src_addr`).
    pub fn reverse_lookup(&self, addr: &FabricAddr) -> Option<FiAddr> {
        self.shared.reverse_lookup(addr)
    }

    /// `fi_av_straddr`: printable form of an address.
    pub fn straddr(&self, addr: &FabricAddr) -> String {
        addr.to_string()
    }

    /// Entries ever inserted (removed ones included: indices are not reused).
    pub fn count(&self) -> usize {
        self.shared.table.read().unwrap().entries.len()
    }

    /// ADDR_CHECK the address at `fi_addr` with the device.
    pub fn check(&self, fi_addr: FiAddr) -> Result<bool> {
        let a = self.lookup(fi_addr)?;
        self.domain.addr_check(&a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(av: &AvShared, a: FabricAddr) -> FiAddr {
        av.update(|t| {
            let idx = t.entries.len() as FiAddr;
            t.entries.push(Some(a));
            t.reverse.entry(a).or_insert(idx);
            idx
        })
    }

    /// A reader never sees a memo half written: every answer it gets is one a writer wrote
    /// whole (all four words equal here), however the two threads interleave.
    #[test]
    fn a_memo_is_read_whole_or_not_at_all() {
        let memo = Memo::new();
        memo.write([0; 4]);
        let rounds = 200_000u64;
        let mut whole = 0u64;
        std::thread::scope(|s| {
            s.spawn(|| {
                for v in 1..=rounds {
                    memo.write([v; 4]);
                }
            });
            for _ in 0..rounds {
                if let Some(w) = memo.read() {
                    assert!(w.iter().all(|x| *x == w[0]), "torn memo {w:?}");
                    whole += 1;
                }
            }
        });
        assert!(whole > 0);
        assert_eq!(memo.read(), Some([rounds; 4]));
    }

    #[test]
    fn remembered_answers_follow_inserts_and_removes() {
        let av = AvShared::new();
        let a = FabricAddr::new(1, 2, 3);
        let b = FabricAddr::new(1, 4, 5);
        assert_eq!(av.reverse_lookup(&a), None);
        assert_eq!(insert(&av, a), 0);
        // A remembered "not found" must not survive the insert.
        assert_eq!(av.reverse_lookup(&a), Some(0));
        assert_eq!(av.lookup(0).unwrap(), a);
        assert_eq!(av.lookup(0).unwrap(), a);
        assert_eq!(insert(&av, b), 1);
        assert_eq!(av.lookup(1).unwrap(), b);
        assert_eq!(av.reverse_lookup(&b), Some(1));
        assert_eq!(av.reverse_lookup(&a), Some(0));
        // Removing index 0 invalidates both remembered answers for it.
        av.update(|t| {
            t.entries[0] = None;
            t.reverse.remove(&a);
        });
        assert!(av.lookup(0).is_err());
        assert_eq!(av.reverse_lookup(&a), None);
        assert_eq!(av.lookup(1).unwrap(), b);
    }
}
