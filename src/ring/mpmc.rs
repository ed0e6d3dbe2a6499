//! The bounded multi-producer multi-consumer queue of `u32` slot indices (Dmitry Vyukov's
//! algorithm, as in crossbeam's `ArrayQueue`), laid out for shared memory and made repairable
//! after a consumer dies mid-pop.
//!
//! The same code runs over a shared-memory segment (the task queue: parent threads push,
//! worker processes pop) and over heap memory (the parent's free-slot list, loom and Miri tests):
//! [`MpmcRing`] is a view over a header and a cell array wherever they live.
//!
//! # Protocol
//!
//! Positions are `u64` and never wrap. Cell `i` has a `seq` stamp:
//! - `seq == pos`: the cell is empty and the producer that claims position `pos` may write it;
//! - `seq == pos + 1`: the cell is full and the consumer that claims `pos` may read it;
//! - after reading, the consumer stores `seq = pos + capacity`, the next lap's "empty" stamp.
//!
//! A producer claims `pos = tail` by CAS `tail → tail + 1`, writes the value, then stores
//! `seq = pos + 1` (Release). A consumer claims `pos = head` by CAS `head → head + 1`, reads the
//! value (its Acquire load of `seq` saw the producer's Release), then stores `seq = pos + cap`.
//!
//! # Crash repair (intent record)
//!
//! A consumer killed between its `head` CAS and its `seq` store would leave the cell "full"
//! forever and wedge producers one lap later. So a consumer that passes a `claim` word (the
//! worker's control block in shared memory) writes `claim = pos + 1` *before* its CAS and clears
//! it after its `seq` store. A supervisor that finds a dead worker with `claim = p + 1`,
//! `head > p` and the cell's `seq == p + 1` knows the dead worker won position `p` and did not
//! finish: it takes the value (that task joins the dead worker's failures) and stores
//! `seq = p + cap` itself (see [`MpmcRing::repair`]). If `seq != p + 1` the pop completed (or the
//! CAS was lost) and there is nothing to repair.
//!
//! The supervisor also pops, conditionally and only the head ([`MpmcRing::pop_head_if`]), to
//! take tasks settled without a worker off the queue; it needs no intent record, since it
//! is the thread that repairs.
//!
//! A worker pops with [`MpmcRing::pop_tracked`], which also stores the value it won in the
//! worker's `current_slot` word *before* releasing the cell: after the CAS, the value is always
//! either still in the cell (repairable) or in `current_slot`, so a death at any instant
//! leaves the claimed slot findable.

use crate::sync::{AtomicU32, AtomicU64, CachePadded, Ordering};

/// Shared counters of a ring. `#[repr(C)]`, all atomics: any zeroed or initialised bytes are a
/// valid value, so it can live in shared memory.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct MpmcHeader {
    /// Next position a consumer will claim.
    head: CachePadded<AtomicU64>,
    /// Next position a producer will claim.
    tail: CachePadded<AtomicU64>,
}

/// One cell: a sequence stamp and the value (a slot index).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct MpmcCell {
    seq: AtomicU64,
    value: AtomicU32,
    _pad: u32,
}

/// A view of a ring: its header and its cells (length = capacity, a power of two).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MpmcRing<'a> {
    hdr: &'a MpmcHeader,
    cells: &'a [MpmcCell],
    mask: u64,
    /// Whether waits on other parties give up after [`Patience`](crate::sync::Patience):
    /// yes for a ring in shared memory (another process may be dead or hostile), no for a
    /// parent-local ring, whose other parties are this process's own threads.
    bounded: bool,
}

impl MpmcHeader {
    pub(crate) fn new() -> Self {
        MpmcHeader {
            head: CachePadded(AtomicU64::new(0)),
            tail: CachePadded(AtomicU64::new(0)),
        }
    }
}

impl MpmcCell {
    pub(crate) fn new(index: u64) -> Self {
        MpmcCell {
            seq: AtomicU64::new(index),
            value: AtomicU32::new(0),
            _pad: 0,
        }
    }
}

impl<'a> MpmcRing<'a> {
    /// A view over initialised storage: `cells[i].seq == i` before first use (or any state the
    /// protocol reached), `cells.len()` a power of two.
    #[inline]
    pub(crate) fn new(hdr: &'a MpmcHeader, cells: &'a [MpmcCell]) -> Self {
        assert!(
            cells.len().is_power_of_two(),
            "ring capacity must be a power of two"
        );
        MpmcRing {
            hdr,
            cells,
            mask: cells.len() as u64 - 1,
            bounded: true,
        }
    }

    /// Capacity in values.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.cells.len()
    }

    #[inline]
    fn cell(&self, pos: u64) -> &MpmcCell {
        &self.cells[(pos & self.mask) as usize]
    }

    /// Pushes `value`; on a full ring hands it back. Also hands it back if the ring stays
    /// stuck past [`Patience`](crate::sync::Patience) (a cell that a consumer never releases:
    /// a dead consumer awaiting repair, or a worker that wrote garbage into the queue), so a
    /// producer never spins without bound on what another process wrote.
    #[inline]
    pub(crate) fn push(&self, value: u32) -> Result<(), u32> {
        let cap = self.cells.len() as u64;
        let mut patience = crate::sync::Patience::new();
        let mut tail = self.hdr.tail.load(Ordering::Relaxed);
        loop {
            let cell = self.cell(tail);
            // SYNC POINT: Acquire pairs with the consumer's Release store of `seq = pos + cap`,
            // so its read of the old value happened before we overwrite it.
            let seq = cell.seq.load(Ordering::Acquire);
            if seq == tail {
                match self.hdr.tail.compare_exchange_weak(
                    tail,
                    tail.wrapping_add(1),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        cell.value.store(value, Ordering::Relaxed);
                        // SYNC POINT: value visible to the consumer's Acquire load of `seq`.
                        cell.seq.store(tail.wrapping_add(1), Ordering::Release);
                        return Ok(());
                    }
                    Err(t) => tail = t,
                }
                continue;
            }
            if seq.wrapping_add(cap) == tail.wrapping_add(1) {
                // The cell still holds last lap's value: full, unless a consumer moved on.
                if self.hdr.head.load(Ordering::SeqCst).wrapping_add(cap) == tail {
                    return Err(value);
                }
            }
            if !patience.step() && self.bounded {
                return Err(value);
            }
            tail = self.hdr.tail.load(Ordering::Relaxed);
        }
    }

    /// Pops a value, or `None` if the ring is empty (or stays stuck past
    /// [`Patience`](crate::sync::Patience)). With `claim`, records the intent described in the
    /// module docs so a crash mid-pop can be repaired.
    #[inline]
    pub(crate) fn pop(&self, claim: Option<&AtomicU64>) -> Option<u32> {
        self.pop_inner(claim, None, || {}, false)
    }

    /// Pops the value at the head if `take` accepts it; `None` (and nothing changed) if the
    /// head's cell is empty or mid-push, `take` declines, or another consumer took the head
    /// first. One try, no waiting: for the supervisor thread, which takes tasks settled
    /// without a worker off the head of the queue (no intent record: the supervisor is also
    /// the only thread that repairs, so it never races its own pops).
    ///
    /// Reading the value before the `head` CAS is sound: the cell held it for position `pos`
    /// (`seq == pos + 1`, Acquired), and it can change only after a consumer that won `pos`
    /// releases the cell; a CAS of `head` from `pos` that succeeds means nobody won it.
    pub(crate) fn pop_head_if(&self, take: impl FnOnce(u32) -> bool) -> Option<u32> {
        let cap = self.cells.len() as u64;
        let head = self.hdr.head.load(Ordering::SeqCst);
        let cell = self.cell(head);
        // SYNC POINT: Acquire pairs with the producer's Release store of `seq = pos + 1`.
        if cell.seq.load(Ordering::Acquire) != head.wrapping_add(1) {
            return None;
        }
        let value = cell.value.load(Ordering::Relaxed);
        if !take(value) {
            return None;
        }
        self.hdr
            .head
            .compare_exchange(
                head,
                head.wrapping_add(1),
                Ordering::SeqCst,
                Ordering::Relaxed,
            )
            .ok()?;
        // SYNC POINT: our read of the value happened before the next lap's producer writes it.
        cell.seq.store(head.wrapping_add(cap), Ordering::Release);
        Some(value)
    }

    /// A worker's pop: records the intent in `claim` (module docs) and stores the value it won
    /// in `current` *before* releasing the cell, so at every instant after the `head` CAS
    /// either the cell still holds the value (`repair` finds it) or `current` does. `mid` runs
    /// between the CAS and the release (a failpoint for the crash tests; a no-op otherwise).
    ///
    /// `None` as soon as the cell at `head` is empty for this lap, without reading `tail`: the
    /// ring is empty, or the producer of that position is mid-push. A consumer of a shared
    /// queue that read `tail` here would pull the line every push writes (a transfer per
    /// task, measured on W2); so a `None` here means "nothing to take yet", and the caller
    /// polls [`has_ready`](Self::has_ready) and asks [`is_empty`](Self::is_empty) before it
    /// sleeps, as the worker's loop does.
    pub(crate) fn pop_tracked(
        &self,
        claim: &AtomicU64,
        current: &AtomicU32,
        mid: impl Fn(),
    ) -> Option<u32> {
        self.pop_inner(Some(claim), Some(current), mid, true)
    }

    #[inline(always)]
    fn pop_inner(
        &self,
        claim: Option<&AtomicU64>,
        current: Option<&AtomicU32>,
        mid: impl Fn(),
        empty_cell_is_none: bool,
    ) -> Option<u32> {
        let cap = self.cells.len() as u64;
        let mut patience = crate::sync::Patience::new();
        let mut head = self.hdr.head.load(Ordering::Relaxed);
        loop {
            let cell = self.cell(head);
            // SYNC POINT: Acquire pairs with the producer's Release store of `seq = pos + 1`.
            let seq = cell.seq.load(Ordering::Acquire);
            if seq == head.wrapping_add(1) {
                if let Some(c) = claim {
                    c.store(head.wrapping_add(1), Ordering::SeqCst);
                }
                match self.hdr.head.compare_exchange_weak(
                    head,
                    head.wrapping_add(1),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        mid();
                        let value = cell.value.load(Ordering::Relaxed);
                        if let Some(cur) = current {
                            // Relaxed: the Release store of `seq` below publishes it to whoever
                            // Acquires the released cell (the supervisor's `repair`).
                            cur.store(value, Ordering::Relaxed);
                        }
                        // SYNC POINT: our read is done before a producer's Acquire sees this.
                        cell.seq.store(head.wrapping_add(cap), Ordering::Release);
                        if let Some(c) = claim {
                            c.store(0, Ordering::Release);
                        }
                        return Some(value);
                    }
                    Err(h) => {
                        // Lost the position: withdraw the intent at once, so that a repair of
                        // the winner (should it die) is never held up by our stale claim.
                        if let Some(c) = claim {
                            c.store(0, Ordering::SeqCst);
                        }
                        head = h;
                    }
                }
                continue;
            }
            if seq == head && (empty_cell_is_none || self.hdr.tail.load(Ordering::SeqCst) == head) {
                // Empty cell and no producer mid-push here: the ring is empty (or, for a
                // worker's pop, the cell is not filled yet: see `pop_tracked`).
                return None;
            }
            // A producer mid-push, a consumer of the last lap not done, or a stale `head`.
            if !patience.step() && self.bounded {
                return None;
            }
            head = self.hdr.head.load(Ordering::Relaxed);
        }
    }

    /// Test builds: a hostile consumer writes `seq` and `value` garbage into a cell.
    #[cfg(all(feature = "failpoints", not(stateful_pool_loom)))]
    pub(crate) fn scribble(&self, seq: u64, value: u64) {
        let cell = self.cell(value);
        cell.seq.store(seq % 4096, Ordering::SeqCst);
        cell.value.store(value as u32 % 64, Ordering::SeqCst);
    }

    /// Whether the ring looks empty right now (a snapshot; for wait conditions).
    pub(crate) fn is_empty(&self) -> bool {
        let head = self.hdr.head.load(Ordering::SeqCst);
        let tail = self.hdr.tail.load(Ordering::SeqCst);
        tail <= head
    }

    /// Whether a consumer should try to pop: the cell at `head` is not the empty cell of this
    /// lap (it is full, or `head` has moved on since it was read). Reads the consumers' `head`
    /// and one cell, never the producers' `tail`: a spinning consumer polling this does not
    /// pull the line every push writes, only the cell the next push fills (which the pop
    /// reads anyway). `false` while the cell at `head` waits for its producer, even if later
    /// positions are already filled: so it is for spinning only. A consumer about to sleep
    /// must ask [`is_empty`](Self::is_empty), because the wake-up for a later position may
    /// have been spent on a consumer that saw this cell still empty.
    #[inline]
    pub(crate) fn has_ready(&self) -> bool {
        let head = self.hdr.head.load(Ordering::SeqCst);
        self.cell(head).seq.load(Ordering::SeqCst) != head
    }

    /// Whether something is queued but the cell at `head` is not filled yet (a snapshot): its
    /// producer is mid-push, perhaps preempted there, or a consumer wrote garbage into it.
    /// [`pop_tracked`](Self::pop_tracked) answers "nothing yet" meanwhile, so a worker that
    /// sees this yields the CPU instead of polling at full speed. Reads `tail` only when the
    /// cell is not ready.
    pub(crate) fn head_unfilled(&self) -> bool {
        !self.has_ready() && !self.is_empty()
    }

    /// Number of values in the ring right now (a snapshot).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let head = self.hdr.head.load(Ordering::SeqCst);
        let tail = self.hdr.tail.load(Ordering::SeqCst);
        tail.saturating_sub(head) as usize
    }

    /// Repairs a pop left half-done by a consumer that died with intent record `claim_value`
    /// (the `claim` word's content, `pos + 1`; 0 means no pop in progress). Afterwards the cell
    /// is empty for the next lap and the ring works again.
    ///
    /// `live_claim(c)` must say whether a *live* consumer's claim word holds `c`. It is asked
    /// only after `head` was seen past the position. Such a consumer either won the position
    /// (and is about to release the cell) or is about to find its CAS lost (and withdraws the
    /// claim right after): either way the answer is [`Repair::Deferred`], and the caller asks
    /// again a little later. Both states are transient for a consumer that runs, so the repair
    /// converges; a consumer that dies instead is repaired in its own turn.
    ///
    /// Must only be called once the consumer is known dead (it can no longer store).
    pub(crate) fn repair(&self, claim_value: u64, live_claim: impl Fn(u64) -> bool) -> Repair {
        if claim_value == 0 {
            return Repair::Nothing;
        }
        let pos = claim_value - 1;
        let cap = self.cells.len() as u64;
        if self.hdr.head.load(Ordering::SeqCst) <= pos {
            // The CAS never happened: the position is still available to live consumers.
            return Repair::Nothing;
        }
        if live_claim(claim_value) {
            return Repair::Deferred;
        }
        let cell = self.cell(pos);
        if cell.seq.load(Ordering::Acquire) == claim_value {
            // The dead consumer won the CAS and did not store `seq`.
            let value = cell.value.load(Ordering::Relaxed);
            if cell
                .seq
                .compare_exchange(
                    claim_value,
                    pos.wrapping_add(cap),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                return Repair::Taken(value);
            }
        }
        Repair::Nothing
    }
}

impl MpmcRing<'_> {
    /// Finishes the pop of a consumer that died after winning position `claim_value - 1` and
    /// recording the value it won elsewhere (a worker's `current_slot`): releases the cell if
    /// it is still full, without taking the value (it is accounted for). Returns `false`
    /// without touching the cell while `live_claim(claim_value)` says a live consumer shows
    /// the same intent (the dead one's words may be forged, and the live one may be the real
    /// winner, mid-pop): ask again later, as for [`repair`](Self::repair), whose order this
    /// follows (`head` first, then the live claims, then the cell). `true` once done.
    pub(crate) fn release_won(&self, claim_value: u64, live_claim: impl Fn(u64) -> bool) -> bool {
        let pos = claim_value.wrapping_sub(1);
        let cap = self.cells.len() as u64;
        if claim_value == 0 || self.hdr.head.load(Ordering::SeqCst) <= pos {
            // Nobody won that position (the words were garbage): its cell, if full, holds a
            // task still queued for whoever pops it.
            return true;
        }
        // After `head > pos` was seen: a live winner of `pos` stored its claim before its CAS,
        // so it shows here until its pop is complete.
        if live_claim(claim_value) {
            return false;
        }
        let _ = self.cell(pos).seq.compare_exchange(
            claim_value,
            pos.wrapping_add(cap),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        true
    }
}

/// What [`MpmcRing::repair`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repair {
    /// Nothing to repair: the dead consumer never won the position, or finished its pop.
    Nothing,
    /// The dead consumer had won the position: here is the value it had not taken out (the
    /// cell is released).
    Taken(u32),
    /// A live consumer shows the same intent: ask again later.
    Deferred,
}

#[cfg(test)]
impl MpmcRing<'_> {
    /// Test helper: a consumer that records its intent, wins the `head` CAS, and dies (or is
    /// paused) before reading the value or storing `seq` (the crash window `repair` exists
    /// for).
    pub(crate) fn pop_and_die_after_cas(&self, claim: &AtomicU64) {
        let head = self.hdr.head.load(Ordering::SeqCst);
        claim.store(head + 1, Ordering::SeqCst);
        self.hdr
            .head
            .compare_exchange(head, head + 1, Ordering::SeqCst, Ordering::Relaxed)
            .expect("no concurrent consumer in this test");
    }

    /// Test helper: the `seq` stamp of the cell of position `pos`.
    pub(crate) fn seq_at(&self, pos: u64) -> u64 {
        self.cell(pos).seq.load(Ordering::SeqCst)
    }
}

#[cfg(all(test, stateful_pool_loom))]
impl MpmcRing<'_> {
    /// Test helper: a consumer that races others for the head, wins a position, records the
    /// value in `current` (as `pop_tracked` does) and dies before releasing the cell.
    pub(crate) fn pop_and_die_after_recording(&self, claim: &AtomicU64, current: &AtomicU32) {
        self.pop_and_die_after_cas_racing(claim);
        let pos = claim.load(Ordering::SeqCst) - 1;
        current.store(
            self.cell(pos).value.load(Ordering::Relaxed),
            Ordering::SeqCst,
        );
    }

    /// Test helper: a consumer that races others for the head (intent, CAS, retry as a real
    /// pop does) and dies right after winning a position.
    pub(crate) fn pop_and_die_after_cas_racing(&self, claim: &AtomicU64) {
        let mut head = self.hdr.head.load(Ordering::SeqCst);
        loop {
            claim.store(head + 1, Ordering::SeqCst);
            match self.hdr.head.compare_exchange(
                head,
                head + 1,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(h) => {
                    claim.store(0, Ordering::SeqCst);
                    head = h;
                }
            }
        }
    }
}

/// A ring whose storage is on the heap: the parent's free-slot list, and the tests.
#[derive(Debug)]
pub(crate) struct HeapMpmc {
    hdr: Box<MpmcHeader>,
    cells: Box<[MpmcCell]>,
}

impl HeapMpmc {
    /// A ring for at least `min_capacity` values (rounded up to a power of two).
    pub(crate) fn with_capacity(min_capacity: usize) -> Self {
        let cap = min_capacity.max(1).next_power_of_two();
        HeapMpmc {
            hdr: Box::new(MpmcHeader::new()),
            cells: (0..cap as u64).map(MpmcCell::new).collect(),
        }
    }

    /// The ring view. Its waits are not bounded: every party is a thread of this process.
    pub(crate) fn ring(&self) -> MpmcRing<'_> {
        MpmcRing {
            bounded: false,
            ..MpmcRing::new(&self.hdr, &self.cells)
        }
    }
}
