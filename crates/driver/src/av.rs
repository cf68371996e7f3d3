// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Address vectors (`FI_AV_TABLE` semantics): the n-th inserted address gets index n.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
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
    /// The last forward answer (fi_addr, address) and the last reverse answer (address, index
    /// or `FI_ADDR_NOTAVAIL`): a sender talks to one peer for a while, a receiver hears from
    /// one, so a few loads and compares, no lock, usually answer. Written only under the
    /// table's lock (an answer under its read lock, so from the table as it is; emptied under
    /// its write lock by every change), so a remembered answer is always the table's.
    forward: Memo,
    reverse: Memo,
    /// An entry was ever removed: until then, every index a request was posted with still
    /// names its address (see [`AvShared::source_of`]).
    removed_any: AtomicBool,
}

/// One remembered answer of three words, read and written without a lock of its own (a
/// sequence lock: a reader that overlaps a writer gets `None` and asks the table; a writer
/// that finds another one active leaves the memo to it, except [`Memo::clear`]).
struct Memo {
    /// Bit 0: a writer is at work; bit 1: empty (nothing remembered).
    seq: AtomicU64,
    words: [AtomicU64; 3],
}

const MEMO_WRITING: u64 = 1;
const MEMO_EMPTY: u64 = 2;
/// What a write adds to `seq` (above the two flag bits).
const MEMO_STEP: u64 = 4;

impl Memo {
    fn new() -> Self {
        Self {
            seq: AtomicU64::new(MEMO_EMPTY),
            words: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    #[inline]
    fn read(&self) -> Option<[u64; 3]> {
        let before = self.seq.load(Ordering::Acquire);
        if before & (MEMO_WRITING | MEMO_EMPTY) != 0 {
            return None;
        }
        let w = [
            self.words[0].load(Ordering::Relaxed),
            self.words[1].load(Ordering::Relaxed),
            self.words[2].load(Ordering::Relaxed),
        ];
        // The words before the second look at `seq`.
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == before).then_some(w)
    }

    /// Take the writer's bit if no other writer holds it: `seq` as it was.
    fn begin(&self) -> Option<u64> {
        let before = self.seq.load(Ordering::Relaxed);
        if before & MEMO_WRITING != 0
            || self
                .seq
                .compare_exchange(
                    before,
                    before | MEMO_WRITING,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return None;
        }
        // The writer's bit set before any word changes.
        fence(Ordering::Release);
        Some(before)
    }

    fn write(&self, w: [u64; 3]) {
        let Some(before) = self.begin() else {
            return;
        };
        for (slot, v) in self.words.iter().zip(w) {
            slot.store(v, Ordering::Relaxed);
        }
        self.seq.store(
            (before & !(MEMO_WRITING | MEMO_EMPTY)) + MEMO_STEP,
            Ordering::Release,
        );
    }

    /// Forget the answer. Called under the table's write lock, where no other writer (they
    /// hold its read lock) can be at work; one that is (it cannot) would finish in a few
    /// stores, so this waits for it rather than leave a stale answer.
    fn clear(&self) {
        let before = loop {
            if let Some(before) = self.begin() {
                break before;
            }
            std::hint::spin_loop();
        };
        self.seq.store(
            ((before & !(MEMO_WRITING | MEMO_EMPTY)) + MEMO_STEP) | MEMO_EMPTY,
            Ordering::Release,
        );
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
            forward: Memo::new(),
            reverse: Memo::new(),
            removed_any: AtomicBool::new(false),
        }
    }

    #[inline]
    pub(crate) fn lookup(&self, fi_addr: FiAddr) -> Result<FabricAddr> {
        if let Some([key, node, rest]) = self.forward.read() {
            if key == fi_addr {
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
        let addr = table.entries.get(fi_addr as usize).copied().flatten();
        let addr =
            addr.ok_or_else(|| Error::InvalidArgument(format!("fi_addr {fi_addr} not in the AV")))?;
        let [node, rest] = addr_words(&addr);
        // Under the table's read lock: no change empties the memo before this is written.
        self.forward.write([fi_addr, node, rest]);
        drop(table);
        Ok(addr)
    }

    #[inline]
    pub(crate) fn reverse_lookup(&self, addr: &FabricAddr) -> Option<FiAddr> {
        let [node, rest] = addr_words(addr);
        if let Some([n, r, found]) = self.reverse.read() {
            if n == node && r == rest {
                return (found != FI_ADDR_NOTAVAIL).then_some(found);
            }
        }
        self.reverse_lookup_table(addr)
    }

    /// The index a completion reports for its source `addr`, from a request posted with the
    /// index `posted` (a directed receive's source; `FI_ADDR_UNSPEC`: any). The posted index
    /// names that source unless an entry was removed since (indices are not reused, so only a
    /// removal can make it stale): no look-up then. Otherwise, and for any source, the look-up
    /// at completion, so an entry reports what the AV says when it is built
    /// (`FI_ADDR_NOTAVAIL` if it has no entry for `addr`).
    #[inline]
    pub(crate) fn source_of(&self, posted: FiAddr, addr: &FabricAddr) -> FiAddr {
        if posted != FI_ADDR_UNSPEC && !self.removed_any.load(Ordering::Acquire) {
            return posted;
        }
        self.reverse_lookup(addr).unwrap_or(FI_ADDR_NOTAVAIL)
    }

    /// [`AvShared::reverse_lookup`] in the table (and remembered).
    #[cold]
    #[inline(never)]
    fn reverse_lookup_table(&self, addr: &FabricAddr) -> Option<FiAddr> {
        let [node, rest] = addr_words(addr);
        let table = self.table.read().unwrap();
        let found = table.reverse.get(addr).copied();
        // Under the table's read lock, as for `lookup_table`.
        self.reverse
            .write([node, rest, found.unwrap_or(FI_ADDR_NOTAVAIL)]);
        drop(table);
        found
    }

    /// `fi_av_remove` of one index (see [`AddressVector::remove`]).
    fn remove(&self, fi_addr: FiAddr) -> Result<()> {
        self.update(|t| {
            let slot = t.entries.get_mut(fi_addr as usize).ok_or_else(|| {
                Error::InvalidArgument(format!("fi_addr {fi_addr} not in the AV"))
            })?;
            let Some(addr) = slot.take() else {
                return Err(Error::InvalidArgument(format!(
                    "fi_addr {fi_addr} already removed"
                )));
            };
            // Before the write lock goes, as the memos are emptied.
            self.removed_any.store(true, Ordering::Release);
            if t.reverse.get(&addr) == Some(&fi_addr) {
                t.reverse.remove(&addr);
                if let Some(other) = t.entries.iter().position(|e| *e == Some(addr)) {
                    t.reverse.insert(addr, other as FiAddr);
                }
            }
            Ok(())
        })
    }

    /// Modify the table; remembered answers become stale.
    fn update<T>(&self, f: impl FnOnce(&mut AvTable) -> T) -> T {
        let mut table = self.table.write().unwrap();
        let r = f(&mut table);
        // Before the write lock goes: no answer of the old table survives it.
        self.forward.clear();
        self.reverse.clear();
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
        self.shared.remove(fi_addr)
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
    /// whole (all three words equal here), however the two threads interleave; an emptied
    /// memo answers nothing.
    #[test]
    fn a_memo_is_read_whole_or_not_at_all() {
        let memo = Memo::new();
        assert_eq!(memo.read(), None);
        memo.write([0; 3]);
        let rounds = 200_000u64;
        let mut whole = 0u64;
        std::thread::scope(|s| {
            s.spawn(|| {
                for v in 1..=rounds {
                    memo.write([v; 3]);
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
        assert_eq!(memo.read(), Some([rounds; 3]));
        memo.clear();
        assert_eq!(memo.read(), None);
        memo.write([1; 3]);
        assert_eq!(memo.read(), Some([1; 3]));
    }

    /// A completion reports the index its request was posted with (even where the look-up
    /// would name another index of the same address), until an entry is removed: from then on
    /// it reports what the table says when it is built.
    #[test]
    fn a_posted_source_is_reported_until_an_entry_is_removed() {
        let av = AvShared::new();
        let a = FabricAddr::new(1, 2, 3);
        let b = FabricAddr::new(1, 4, 5);
        assert_eq!(insert(&av, a), 0);
        assert_eq!(insert(&av, a), 1);
        assert_eq!(insert(&av, b), 2);
        assert_eq!(av.source_of(1, &a), 1);
        assert_eq!(av.source_of(2, &b), 2);
        assert_eq!(av.source_of(FI_ADDR_UNSPEC, &a), 0);
        // The posted index is removed: the look-up names the address's other index...
        av.remove(1).unwrap();
        assert_eq!(av.source_of(1, &a), 0);
        // ... and none once that goes too; another index is looked up as well now.
        av.remove(0).unwrap();
        assert_eq!(av.source_of(0, &a), FI_ADDR_NOTAVAIL);
        assert_eq!(av.source_of(2, &b), 2);
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
        // Removing index 0 invalidates both remembered answers for it (the last ones asked).
        assert_eq!(av.lookup(0).unwrap(), a);
        av.update(|t| {
            t.entries[0] = None;
            t.reverse.remove(&a);
        });
        assert!(av.lookup(0).is_err());
        assert_eq!(av.reverse_lookup(&a), None);
        assert_eq!(av.lookup(1).unwrap(), b);
    }
}
