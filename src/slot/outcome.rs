//! A task's outcome as a slot carries it: four words (`kind`, `worker`, `rec`, `len`) that the
//! publisher writes before `DONE`, their encoding, and the parent's checked decoding.
//!
//! | kind | who publishes | `rec` | `len` | bytes |
//! |---|---|---|---|---|
//! | `OK` | worker | the archive's bytes themselves (at most 8) | `LEN_IN_HEADER \| length` | the output's rkyv archive, in `rec` |
//! | `OK` | worker | `REC_INLINE \| offset` in the slot's data area, or a ring record offset | data length | the output's rkyv archive |
//! | `ERR`, `PANIC`, `BAD_TASK`, `POISONED` | worker | ring record offset | message length | UTF-8 message |
//! | `TOO_LARGE` | worker | ring record offset | 8 | the output's archive length, u64 LE |
//! | `CANCELLED` | worker (skipped) or parent | 0 | 0 | none |
//! | `DIED` | parent | the dead worker's pid | `ExitCause::encode` | none |
//! | `TIMEOUT` | parent | the limit in ns | 0 | none |
//! | `EXPIRED` | worker | 0 | 0 | none (the task's deadline passed before it started) |
//! | `NO_WORKERS` | parent | 0 | 0 | none |
//! | `BROKEN` | parent | 0 | 0 | none |
//!
//! `worker` is the seat whose completion ring holds the record (for parent outcomes, the seat
//! of the dead worker, or `u32::MAX`).

/// The data is the rkyv archive of the task's output.
pub(crate) const KIND_OK: u32 = 1;
/// The data is the message of an error the worker's execute step returned.
pub(crate) const KIND_ERR: u32 = 2;
/// The data is the message of a panic in the worker's execute step.
pub(crate) const KIND_PANIC: u32 = 3;
/// The task did not validate; the data is the validator's message.
pub(crate) const KIND_BAD_TASK: u32 = 5;
/// The output's archive did not fit the ring; the data is its length (u64 LE).
pub(crate) const KIND_TOO_LARGE: u32 = 6;
/// The task was cancelled before it started (no record).
pub(crate) const KIND_CANCELLED: u32 = 7;
/// The worker running the task died (no record).
pub(crate) const KIND_DIED: u32 = 8;
/// The task ran past its timeout and its worker was killed (no record).
pub(crate) const KIND_TIMEOUT: u32 = 9;
/// Every worker has failed for good; nothing can run the task (no record).
pub(crate) const KIND_NO_WORKERS: u32 = 10;
/// The worker declared itself poisoned while running the task (and retires); the data is the
/// message.
pub(crate) const KIND_POISONED: u32 = 11;
/// The pool broke down (a pool thread failed, or the shared task queue was found corrupt) and
/// stopped every worker (no record).
pub(crate) const KIND_BROKEN: u32 = 12;
/// The task's deadline passed before a worker started it; not run (no record).
pub(crate) const KIND_EXPIRED: u32 = 13;
/// Spawn reports only (`WorkerCtl::spawn_kind`): the worker could not reserve the memory of its
/// seat's completion ring; the data is the OS error number, in decimal.
pub(crate) const KIND_NO_SPACE: u32 = 14;

/// Bit of `rec` meaning "no ring record: the output archive is inline in the slot's own data
/// area, at the offset in the low bits" (small results). The offset is past the task's own
/// archive, which stays intact so a task whose worker died can be re-run.
pub(crate) const REC_INLINE: u64 = 1 << 63;

/// Bit of `len` meaning "the output archive is `rec` itself": its first `len & !LEN_IN_HEADER`
/// bytes (at most [`WORD_BYTES`]), in memory order. A tiny result then travels in the slot
/// header's own cache line, which the parent reads anyway to see `DONE`.
pub(crate) const LEN_IN_HEADER: u32 = 1 << 31;

/// The most bytes of archive that travel inside a slot header word (a task in `task_off`,
/// a result in `result_rec`).
pub(crate) const WORD_BYTES: usize = 8;

/// The four outcome words of a slot, as read (one load each) from shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawOutcome {
    pub(crate) kind: u32,
    pub(crate) worker: u32,
    pub(crate) rec: u64,
    pub(crate) len: u32,
}

/// A published outcome after the parent's checks: every offset, length, seat and kind is in
/// range. Ring records are further checked against the record's own header when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// `len` bytes of output archive at `at` in the slot's data area.
    Inline { at: usize, len: usize },
    /// The first `len` (at most [`WORD_BYTES`]) of `bytes` are the output archive (it was in
    /// the header word, copied out with the other words).
    Word { bytes: [u8; WORD_BYTES], len: usize },
    /// A record of `kind` (a worker kind) in seat `seat`'s completion ring at `off`, with
    /// `len` data bytes.
    Record {
        kind: u32,
        seat: u32,
        off: u64,
        len: u64,
    },
    /// Cancelled before it ran.
    Cancelled,
    /// No worker left.
    NoWorkers,
    /// The pool broke down.
    Broken,
    /// The worker in `worker` (pid `pid`) died; `cause` is `ExitCause::encode`.
    Died { worker: u32, pid: u32, cause: u32 },
    /// Killed after running past `after_ns`.
    Timeout { worker: u32, after_ns: u64 },
    /// Its deadline passed before worker `worker` would have started it.
    Expired { worker: u32 },
    /// Nonsense: what is wrong with it.
    Invalid(&'static str),
}

impl RawOutcome {
    /// The four words.
    pub(crate) fn new(kind: u32, worker: u32, rec: u64, len: u32) -> Self {
        RawOutcome {
            kind,
            worker,
            rec,
            len,
        }
    }

    /// Checks the words against the pool's geometry: the slot's inline capacity, the number of
    /// seats and the ring capacity. Never trusts a value: a misbehaving worker may have written
    /// any of them.
    pub(crate) fn decode(&self, slot_inline: u64, seats: u32, ring_cap: u64) -> Published {
        match self.kind {
            KIND_CANCELLED => return Published::Cancelled,
            KIND_NO_WORKERS => return Published::NoWorkers,
            KIND_BROKEN => return Published::Broken,
            KIND_DIED => {
                return Published::Died {
                    worker: self.worker,
                    pid: self.rec as u32,
                    cause: self.len,
                };
            }
            KIND_TIMEOUT => {
                return Published::Timeout {
                    worker: self.worker,
                    after_ns: self.rec,
                };
            }
            KIND_EXPIRED => {
                return Published::Expired {
                    worker: self.worker,
                };
            }
            KIND_OK | KIND_ERR | KIND_PANIC | KIND_BAD_TASK | KIND_TOO_LARGE | KIND_POISONED => {}
            _ => return Published::Invalid("unknown result kind"),
        }
        if self.len & LEN_IN_HEADER != 0 {
            let len = (self.len & !LEN_IN_HEADER) as usize;
            if self.kind != KIND_OK {
                return Published::Invalid("only an output can be in the header");
            }
            if len > WORD_BYTES {
                return Published::Invalid("header result longer than its word");
            }
            return Published::Word {
                bytes: self.rec.to_ne_bytes(),
                len,
            };
        }
        let len = self.len as u64;
        if self.rec & REC_INLINE != 0 {
            let at = self.rec & !REC_INLINE;
            if self.kind != KIND_OK {
                return Published::Invalid("only an output can be inline");
            }
            return match at.checked_add(len) {
                Some(end) if end <= slot_inline => Published::Inline {
                    at: at as usize,
                    len: len as usize,
                },
                _ => Published::Invalid("inline result out of range"),
            };
        }
        if self.worker >= seats {
            return Published::Invalid("result names a worker seat out of range");
        }
        if self.rec % 16 != 0 || self.rec >= ring_cap || len > ring_cap {
            return Published::Invalid("result record out of range");
        }
        if self.kind == KIND_TOO_LARGE && len != 8 {
            return Published::Invalid("malformed too-large record");
        }
        Published::Record {
            kind: self.kind,
            seat: self.worker,
            off: self.rec,
            len,
        }
    }
}

#[cfg(all(test, not(stateful_pool_loom)))]
mod tests {
    use super::*;

    #[test]
    fn every_word_is_checked() {
        let d =
            |kind, worker, rec, len| RawOutcome::new(kind, worker, rec, len).decode(64, 2, 1024);
        assert_eq!(
            d(KIND_OK, 9, REC_INLINE | 16, 48),
            Published::Inline { at: 16, len: 48 }
        );
        assert!(matches!(
            d(KIND_OK, 0, REC_INLINE | 16, 49),
            Published::Invalid(_)
        ));
        assert!(matches!(
            d(KIND_OK, 0, REC_INLINE | u64::MAX >> 1, 8),
            Published::Invalid(_)
        ));
        assert!(matches!(
            d(KIND_ERR, 0, REC_INLINE, 8),
            Published::Invalid(_)
        ));
        assert_eq!(
            d(KIND_ERR, 1, 32, 100),
            Published::Record {
                kind: KIND_ERR,
                seat: 1,
                off: 32,
                len: 100
            }
        );
        assert!(matches!(d(KIND_ERR, 2, 32, 100), Published::Invalid(_)));
        assert!(matches!(d(KIND_ERR, 1, 33, 100), Published::Invalid(_)));
        assert!(matches!(d(KIND_ERR, 1, 1024, 1), Published::Invalid(_)));
        assert!(matches!(d(KIND_ERR, 1, 0, u32::MAX), Published::Invalid(_)));
        assert!(matches!(d(KIND_TOO_LARGE, 1, 0, 9), Published::Invalid(_)));
        let word = u64::from_ne_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            d(KIND_OK, 7, word, LEN_IN_HEADER | 3),
            Published::Word {
                bytes: [1, 2, 3, 4, 5, 6, 7, 8],
                len: 3
            }
        );
        assert!(matches!(
            d(KIND_OK, 0, word, LEN_IN_HEADER | 9),
            Published::Invalid(_)
        ));
        assert!(matches!(
            d(KIND_ERR, 0, word, LEN_IN_HEADER | 8),
            Published::Invalid(_)
        ));
        assert!(matches!(d(0, 0, 0, 0), Published::Invalid(_)));
        assert!(matches!(d(u32::MAX, 0, 0, 0), Published::Invalid(_)));
        assert_eq!(d(KIND_CANCELLED, 0, 0, 0), Published::Cancelled);
    }

    #[test]
    fn random_words_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..if cfg!(miri) { 2_000 } else { 100_000 } {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let o = RawOutcome::new(
                (x % 15) as u32,
                (x >> 8) as u32 % 4,
                x.rotate_left(7),
                if x % 3 == 0 {
                    LEN_IN_HEADER | (x >> 60) as u32
                } else {
                    (x >> 40) as u32
                },
            );
            match o.decode(1024, 3, 4096) {
                Published::Inline { at, len } => assert!(at + len <= 1024),
                Published::Word { len, .. } => assert!(len <= WORD_BYTES),
                Published::Record { seat, off, len, .. } => {
                    assert!(seat < 3 && off < 4096 && off % 16 == 0 && len <= 4096)
                }
                _ => {}
            }
        }
    }
}
