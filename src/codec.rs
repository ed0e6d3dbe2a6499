//! rkyv archives written straight into shared memory, and read back in place.
//!
//! [`ShmWriter`] is an rkyv writer over a fixed region (a task slot, an arena block, a result
//! ring record): serialising writes the archive bytes exactly once, where the reader will find
//! them. The same writer in *counting* mode (no buffer) measures an archive first, for values that
//! must go somewhere bigger than a slot.
//!
//! Readers always validate (`rkyv::access` with bytecheck): a worker is a separate failure domain
//! and a C host can send anything, so bytes from another process are checked before use. For the
//! plain-data types typical of tasks this costs nanoseconds. A plain number (an integer or a
//! float) skips rkyv's serialiser and validator altogether ([`plain`]): its whole validation
//! is the length and alignment check rkyv itself would make.

pub(crate) mod plain;

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::{BoxedError, Source};
use rkyv::ser::allocator::{Arena, ArenaHandle};
use rkyv::ser::sharing::Share;
use rkyv::ser::{Positional, Serializer, Writer};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use std::cell::Cell;

/// The rkyv writer this crate serialises with: into a fixed shared-memory region, or counting
/// only. Users never construct one; it appears in the [`Message`] bound.
#[doc(hidden)]
#[derive(Debug)]
pub struct ShmWriter {
    ptr: *mut u8,
    cap: usize,
    pos: usize,
    /// Whether large writes may stream (`shm::copy`): into shared memory, read later by
    /// another process; not into a private buffer the same process reads next.
    stream: bool,
}

impl ShmWriter {
    /// A writer into `cap` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + cap` must be valid for writes and owned exclusively by the caller (no
    /// other reference or writer) for as long as the writer is used.
    pub(crate) unsafe fn new(ptr: *mut u8, cap: usize) -> Self {
        ShmWriter {
            ptr,
            cap,
            pos: 0,
            stream: true,
        }
    }

    /// A writer that only counts bytes.
    pub(crate) fn counting() -> Self {
        ShmWriter {
            ptr: std::ptr::null_mut(),
            cap: usize::MAX,
            pos: 0,
            stream: false,
        }
    }
}

impl Positional for ShmWriter {
    fn pos(&self) -> usize {
        self.pos
    }
}

impl<E: Source> Writer<E> for ShmWriter {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        // rkyv pads with `write(&ZEROS[..n])` before every aligned value, mostly with n = 0,
        // which the copy below would turn into a call to `memset` for nothing.
        if bytes.is_empty() {
            return Ok(());
        }
        let end = self.pos.checked_add(bytes.len());
        match end {
            Some(end) if end <= self.cap => {
                if !self.ptr.is_null() {
                    // SAFETY: `ptr..ptr+cap` is a region the writer's creator owns exclusively
                    // (see `new`) and `pos + len <= cap`. `bytes` cannot overlap it: they come
                    // from the value being serialised, and the region is owned by this writer
                    // alone, so no live reference (not even a slice of shared memory being
                    // re-sent) points into it. A large write into shared memory streams
                    // (`shm::copy`).
                    unsafe {
                        let dst = self.ptr.add(self.pos);
                        if self.stream {
                            crate::shm::copy::copy_into(bytes, dst)
                        } else {
                            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len())
                        }
                    };
                }
                self.pos = end;
                Ok(())
            }
            _ => Err(E::new(Overflow)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("archive does not fit in its shared-memory region")]
struct Overflow;

/// A type that can travel through the pool as a task, a spawn argument, a spawn output or a
/// result: it derives rkyv's `Archive`, `Serialize` and `Deserialize`, and its archived form can
/// be validated (`bytecheck`, on by default in rkyv's derive).
///
/// It is implemented automatically; derive the three rkyv traits on your type:
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
/// struct Resize { width: u32, height: u32, name: String }
///
/// fn assert_message<T: stateful_pool::Message>() {}
/// assert_message::<Resize>();
/// assert_message::<Vec<u8>>();
/// ```
pub trait Message:
    Sized
    + Archive<
        Archived: for<'a> CheckBytes<HighValidator<'a, BoxedError>>
                      + Deserialize<Self, HighDeserializer<BoxedError>>,
    > + for<'a> Serialize<HighSerializer<ShmWriter, ArenaHandle<'a>, BoxedError>>
    + Send
    + 'static
{
}

impl<T> Message for T where
    T: Archive<
            Archived: for<'a> CheckBytes<HighValidator<'a, BoxedError>>
                          + Deserialize<T, HighDeserializer<BoxedError>>,
        > + for<'a> Serialize<HighSerializer<ShmWriter, ArenaHandle<'a>, BoxedError>>
        + Send
        + 'static
{
}

/// What can be written into shared memory: anything rkyv serialises with our writer. Every
/// [`Message`] is; so are the borrowing encoders below.
#[doc(hidden)]
pub trait Encode:
    for<'a> Serialize<HighSerializer<ShmWriter, ArenaHandle<'a>, BoxedError>>
{
}

impl<T: ?Sized> Encode for T where
    T: for<'a> Serialize<HighSerializer<ShmWriter, ArenaHandle<'a>, BoxedError>>
{
}

/// What a submit accepts for a task of type `T`: a `&T` itself, or a borrowed form that
/// rkyv archives exactly as a `T` would, written straight into shared memory with no owned
/// `T` built first.
///
/// | task type `T` | also accepted as |
/// |---|---|
/// | any [`Message`] | `&T` |
/// | `String` | `&str` |
/// | `Vec<E>` | `&[E]`, `&[E; N]` (so `Vec<u8>` takes a `&[u8]` or a `b"bytes"`) |
///
/// The elements of a batch ([`Pool::batch`](crate::Pool::batch)) and a map's inputs
/// ([`Pool::map`](crate::Pool::map)) are the same forms one level down: `T`, `&T`, `&str`
/// for `String`, `&[E]`, `[E; N]` or `&[E; N]` for `Vec<E>` (so `b"bytes"` literals too).
///
/// ```
/// # use stateful_pool::ArchivesAs;
/// fn accepts<A: ArchivesAs<T> + ?Sized, T>(_: &A) {}
/// accepts::<str, String>("hello");
/// accepts::<[u8], Vec<u8>>(&b"bytes"[..]);
/// accepts::<[u8; 5], Vec<u8>>(b"bytes");
/// accepts::<u64, u64>(&7);
/// // Elements of a batch or a map:
/// accepts::<&str, String>(&"hello");
/// accepts::<&u64, u64>(&&7);
/// ```
///
/// The trait is sealed: the worker reads what arrives as `T`'s archived form, so only forms
/// whose archive is byte-for-byte `T`'s may implement it.
pub trait ArchivesAs<T>: sealed::Sealed<T> {}

impl<T, A: ?Sized + sealed::Sealed<T>> ArchivesAs<T> for A {}

pub(crate) mod sealed {
    /// The encoder behind [`ArchivesAs`](super::ArchivesAs) (not nameable outside the crate).
    pub trait Sealed<T> {
        /// A value rkyv serialises as `T`'s archive.
        type Enc<'a>: super::Encode + Plain
        where
            Self: 'a;
        /// That value, borrowing `self`.
        fn enc(&self) -> Self::Enc<'_>;
    }

    /// An encoder whose value may be a plain number ([`super::plain`]): its archive, made
    /// without rkyv's serialiser; `None` for every other value.
    pub trait Plain {
        /// The archive, if the value is a plain number.
        #[inline(always)]
        fn plain(&self) -> Option<super::plain::Word> {
            None
        }
    }
}

impl<T: Message> sealed::Plain for Same<'_, T> {
    #[inline(always)]
    fn plain(&self) -> Option<plain::Word> {
        plain::archive(self.0)
    }
}

impl sealed::Plain for Str<'_> {}

impl<E> sealed::Plain for Slice<'_, E> {}

impl<I> sealed::Plain for BatchOf<I> {}

/// A task already archived (a loan's placed archive): nothing to encode.
impl sealed::Plain for () {}

impl<T: Message> sealed::Sealed<T> for T {
    type Enc<'a> = Same<'a, T>;
    fn enc(&self) -> Same<'_, T> {
        Same(self)
    }
}

impl sealed::Sealed<String> for str {
    type Enc<'a> = Str<'a>;
    fn enc(&self) -> Str<'_> {
        Str(self)
    }
}

impl<E: Message> sealed::Sealed<Vec<E>> for [E] {
    type Enc<'a> = Slice<'a, E>;
    fn enc(&self) -> Slice<'_, E> {
        Slice(self)
    }
}

impl<E: Message, const N: usize> sealed::Sealed<Vec<E>> for [E; N] {
    type Enc<'a> = Slice<'a, E>;
    fn enc(&self) -> Slice<'_, E> {
        Slice(self)
    }
}

// The references, so that a batch or a map can take `&str`s, `&[u8]`s or `&T`s as its
// elements. (One impl for `&A` over any accepted `A` would overlap the first impl above.)
impl<T: Message> sealed::Sealed<T> for &T {
    type Enc<'a>
        = Same<'a, T>
    where
        Self: 'a;
    fn enc(&self) -> Same<'_, T> {
        Same(self)
    }
}

impl sealed::Sealed<String> for &str {
    type Enc<'a>
        = Str<'a>
    where
        Self: 'a;
    fn enc(&self) -> Str<'_> {
        Str(self)
    }
}

impl<E: Message, const N: usize> sealed::Sealed<Vec<E>> for &[E; N] {
    type Enc<'a>
        = Slice<'a, E>
    where
        Self: 'a;
    fn enc(&self) -> Slice<'_, E> {
        Slice(*self)
    }
}

impl<E: Message> sealed::Sealed<Vec<E>> for &[E] {
    type Enc<'a>
        = Slice<'a, E>
    where
        Self: 'a;
    fn enc(&self) -> Slice<'_, E> {
        Slice(self)
    }
}

/// A borrowed `T`, archived as `T` is.
#[doc(hidden)]
#[derive(Debug)]
pub struct Same<'a, T>(&'a T);

impl<T: Archive> Archive for Same<'_, T> {
    type Archived = T::Archived;
    type Resolver = T::Resolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        self.0.resolve(resolver, out)
    }
}

impl<T, S> Serialize<S> for Same<'_, T>
where
    T: Serialize<S>,
    S: rkyv::rancor::Fallible + ?Sized,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        self.0.serialize(serializer)
    }
}

/// A `&str` archived exactly as a `String` with the same contents.
#[doc(hidden)]
#[derive(Debug)]
pub struct Str<'a>(&'a str);

impl Archive for Str<'_> {
    type Archived = rkyv::string::ArchivedString;
    type Resolver = rkyv::string::StringResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::string::ArchivedString::resolve_from_str(self.0, resolver, out);
    }
}

impl<S> Serialize<S> for Str<'_>
where
    S: rkyv::rancor::Fallible + rkyv::ser::Allocator + Writer + ?Sized,
    S::Error: Source,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        rkyv::string::ArchivedString::serialize_from_str(self.0, serializer)
    }
}

/// A `&[E]` archived exactly as a `Vec<E>` with the same elements (for bytes, one memcpy
/// from the caller's slice into shared memory).
#[doc(hidden)]
#[derive(Debug)]
pub struct Slice<'a, E>(&'a [E]);

impl<E: Archive> Archive for Slice<'_, E> {
    type Archived = rkyv::vec::ArchivedVec<E::Archived>;
    type Resolver = rkyv::vec::VecResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::vec::ArchivedVec::resolve_from_len(self.0.len(), resolver, out);
    }
}

impl<E, S> Serialize<S> for Slice<'_, E>
where
    E: Serialize<S>,
    S: rkyv::rancor::Fallible + rkyv::ser::Allocator + Writer + ?Sized,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        rkyv::vec::ArchivedVec::serialize_from_slice(self.0, serializer)
    }
}

/// What a batch task returns: the worker's seat index, and each task's outcome in order,
/// `Err((kind, message))` with a result kind (`KIND_ERR`, `KIND_PANIC`, `KIND_POISONED`, or
/// `KIND_CANCELLED` for a task not run because the worker retired during the batch).
pub(crate) type BatchOut<O> = (u32, Vec<Result<O, (u32, String)>>);

/// A batch of tasks, archived exactly as a `Vec` of them: `I` yields each task's encoder
/// (`ArchivesAs::enc`), so the tasks stay where the caller has them, in any accepted form.
#[derive(Debug)]
pub(crate) struct BatchOf<I>(pub(crate) I);

/// The batch of `tasks`, each in a form that archives as a `T`.
pub(crate) fn batch_of<'a, T, In: sealed::Sealed<T> + 'a>(
    tasks: impl ExactSizeIterator<Item = &'a In> + Clone,
) -> BatchOf<impl ExactSizeIterator<Item = In::Enc<'a>> + Clone> {
    BatchOf(tasks.map(|t| t.enc()))
}

impl<I: ExactSizeIterator<Item: Archive>> Archive for BatchOf<I> {
    type Archived = rkyv::vec::ArchivedVec<<I::Item as Archive>::Archived>;
    type Resolver = rkyv::vec::VecResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::vec::ArchivedVec::resolve_from_len(self.0.len(), resolver, out);
    }
}

impl<I, S> Serialize<S> for BatchOf<I>
where
    I: ExactSizeIterator<Item: Serialize<S>> + Clone,
    S: rkyv::rancor::Fallible + rkyv::ser::Allocator + Writer + ?Sized,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        rkyv::vec::ArchivedVec::serialize_from_iter::<I::Item, _, _>(self.0.clone(), serializer)
    }
}

/// Why encoding failed.
#[derive(Debug)]
pub(crate) enum EncodeError {
    /// The archive is larger than the region (retry somewhere bigger).
    Overflow,
    /// The value's `Serialize` impl failed.
    Failed(String),
}

impl EncodeError {
    /// What to tell the caller (the one wording of both causes).
    pub(crate) fn message(self) -> String {
        match self {
            EncodeError::Failed(m) => m,
            EncodeError::Overflow => "the archive did not fit where it was measured to fit".into(),
        }
    }
}

/// Serialises `value` into `cap` bytes at `ptr`; returns the archive length.
///
/// # Safety
/// As for [`ShmWriter::new`]: `ptr..ptr + cap` is valid for writes and the caller's alone
/// while this runs.
#[inline]
pub(crate) unsafe fn encode_into<T: Encode>(
    value: &T,
    ptr: *mut u8,
    cap: usize,
) -> Result<usize, EncodeError> {
    // SAFETY: passed on from our caller (this function's contract).
    unsafe { encode_with(value, ptr, cap, true) }
}

/// [`encode_into`] for a private buffer that this process reads next (a thread stage's task,
/// spawn arguments on their way to the spawn area): never streams, so the bytes stay in cache.
///
/// # Safety
/// As for [`encode_into`].
pub(crate) unsafe fn encode_into_private<T: Encode>(
    value: &T,
    ptr: *mut u8,
    cap: usize,
) -> Result<usize, EncodeError> {
    // SAFETY: passed on from our caller (this function's contract).
    unsafe { encode_with(value, ptr, cap, false) }
}

/// Serialises `value` into `cap` bytes at `ptr` (streaming large writes if `stream`); returns
/// the archive length.
///
/// # Safety
/// As for [`encode_into`].
#[inline]
unsafe fn encode_with<T: Encode>(
    value: &T,
    ptr: *mut u8,
    cap: usize,
    stream: bool,
) -> Result<usize, EncodeError> {
    // SAFETY: passed on from our caller (this function's contract).
    let mut writer = unsafe { ShmWriter::new(ptr, cap) };
    writer.stream = stream;
    match serialize(value, writer) {
        Ok(n) => Ok(n),
        // The writer is gone with the error; tell overflow from a failing `Serialize` by
        // measuring (only on this failure path).
        Err(e) => match encoded_len(value) {
            Ok(n) if n > cap => Err(EncodeError::Overflow),
            Ok(_) => Err(EncodeError::Failed(e.to_string())),
            Err(e) => Err(e),
        },
    }
}

/// The length of `value`'s archive.
pub(crate) fn encoded_len<T: Encode>(value: &T) -> Result<usize, EncodeError> {
    serialize(value, ShmWriter::counting()).map_err(|e| EncodeError::Failed(e.to_string()))
}

thread_local! {
    /// This thread's scratch arena for serialisers (rkyv's `to_bytes_in` keeps one too).
    static ARENA: Cell<Option<Arena>> = const { Cell::new(None) };
}

/// Serialises `value` with `writer`; returns the archive length.
///
/// What `rkyv::api::high::to_bytes_in` does, built where it is used and handing back only the
/// length: rkyv's function takes the writer by value and passes it through its closures and
/// its `Result`, so our 32-byte writer was copied several times per archive, with loads that
/// straddle the stores just before them (stalls). That made serialising a `u64` take ≈ 56 ns,
/// against ≈ 40 ns now, and it is paid on both sides of every round trip.
#[inline(always)]
fn serialize<T: Encode>(value: &T, writer: ShmWriter) -> Result<usize, BoxedError> {
    ARENA.with(|slot| {
        // Taken while in use: should anything serialise through here again meanwhile, it
        // gets a fresh arena.
        let mut arena = slot.take().unwrap_or_default();
        let mut serializer = Serializer::new(writer, arena.acquire(), Share::new());
        let r = rkyv::api::serialize_using::<_, BoxedError>(value, &mut serializer)
            .map(|_| serializer.into_writer().pos);
        // No `shrink` here: `acquire` shrinks at the next use (keeping the largest block, as
        // it would now), and a second walk of the block list cost ≈ 5 ns per archive.
        slot.set(Some(arena));
        r
    })
}

/// Serialises `value` into a fresh 16-aligned buffer of its own (for thread stages, where the
/// archive never leaves the process).
pub(crate) fn encode_owned<T: Encode>(value: &T) -> Result<AlignedVec<16>, EncodeError> {
    // One pass for the common small task; a value that overflows is measured, then written.
    const FIRST_TRY: usize = 256;
    let mut buf = AlignedVec::<16>::with_capacity(FIRST_TRY);
    // SAFETY: the buffer has `FIRST_TRY` bytes of capacity and is ours alone; `encode_into`
    // writes at most `cap` bytes (it fails with `Overflow` rather than write past it).
    let n = match unsafe { encode_into_private(value, buf.as_mut_ptr(), FIRST_TRY) } {
        Ok(n) => n,
        Err(EncodeError::Overflow) => {
            let len = encoded_len(value)?;
            buf.reserve(len);
            // SAFETY: as above, with `len` bytes of capacity now.
            unsafe { encode_into_private(value, buf.as_mut_ptr(), len)? }
        }
        Err(e) => return Err(e),
    };
    // SAFETY: `encode_into` initialised the first `n` bytes, at most the capacity it was given.
    unsafe { buf.set_len(n) };
    Ok(buf)
}

/// Validates `bytes` as an archive of `T` and returns a reference into them.
#[inline]
pub(crate) fn access<T: Message>(bytes: &[u8]) -> Result<&T::Archived, String> {
    // A plain number needs no validator (`plain`: it accepts exactly what rkyv accepts).
    if let Some(a) = plain::access::<T>(bytes) {
        return Ok(a);
    }
    rkyv::access::<T::Archived, BoxedError>(bytes).map_err(|e| e.to_string())
}

/// Validates and deserialises `bytes` into an owned `T`.
#[inline]
pub(crate) fn decode<T: Message>(bytes: &[u8]) -> Result<T, String> {
    if let Some(v) = plain::decode::<T>(bytes) {
        return Ok(v);
    }
    let archived = access::<T>(bytes)?;
    rkyv::deserialize::<T, BoxedError>(archived).map_err(|e| e.to_string())
}

#[cfg(all(test, not(stateful_pool_loom)))]
mod tests {
    use super::*;

    /// `encode_into` over a buffer we own.
    fn enc<T: Encode>(value: &T, buf: &mut [u8]) -> Result<usize, EncodeError> {
        // SAFETY: `buf` is ours, exclusively borrowed, `buf.len()` bytes long.
        unsafe { encode_into(value, buf.as_mut_ptr(), buf.len()) }
    }

    #[test]
    fn a_borrowed_batch_archives_as_a_vec() {
        let tasks = vec![1u64, 2, 3];
        let refs: Vec<&u64> = tasks.iter().collect();
        let mut a = vec![0u8; 256];
        let mut b = vec![0u8; 256];
        let n = enc(&batch_of::<u64, _>(refs.iter()), &mut a).unwrap();
        let m = enc(&tasks, &mut b).unwrap();
        assert_eq!(a[..n], b[..m]);
    }

    #[test]
    fn bytes_archive_exactly_as_a_vec_of_u8() {
        for data in [&b""[..], b"x", b"hello, shared memory", &[7u8; 300][..]] {
            let mut a = vec![0u8; 1024];
            let mut b = vec![0u8; 1024];
            let n = enc(&Slice(data), &mut a).unwrap();
            let m = enc(&data.to_vec(), &mut b).unwrap();
            assert_eq!(n, m);
            assert_eq!(a[..n], b[..m]);
            assert_eq!(encoded_len(&Slice(data)).unwrap(), n);
        }
    }

    #[test]
    fn borrowed_forms_archive_exactly_as_their_task_type() {
        use super::sealed::Sealed;
        fn same_bytes<T: Encode, A: Encode>(owned: &T, borrowed: &A) {
            let mut a = vec![0u8; 1024];
            let mut b = vec![0u8; 1024];
            let n = enc(owned, &mut a).unwrap();
            let m = enc(borrowed, &mut b).unwrap();
            assert_eq!(a[..n], b[..m]);
        }
        for s in [
            "",
            "short",
            "a string longer than the inline small-string form",
        ] {
            same_bytes(&s.to_string(), &Sealed::<String>::enc(s));
        }
        same_bytes(
            &vec![1u32, 2, 3],
            &Sealed::<Vec<u32>>::enc(&[1u32, 2, 3][..]),
        );
        same_bytes(&42u64, &Sealed::<u64>::enc(&42u64));
        // The forms a batch's elements and a map's inputs take.
        same_bytes(&vec![1u8, 2, 3], &Sealed::<Vec<u8>>::enc(&[1u8, 2, 3]));
        same_bytes(&vec![1u8, 2], &Sealed::<Vec<u8>>::enc(&&[1u8, 2][..]));
        same_bytes(&"x".to_string(), &Sealed::<String>::enc(&"x"));
        same_bytes(&7u64, &Sealed::<u64>::enc(&&7u64));
        let owned = vec!["a".to_string(), "a longer string, out of line".to_string()];
        same_bytes(&owned, &batch_of::<String, _>(["a", &owned[1]].iter()));
        same_bytes(&owned, &batch_of::<String, _>(owned.iter()));
        let refs: Vec<&String> = owned.iter().collect();
        same_bytes(&owned, &batch_of::<String, _>(refs.iter()));
        let bytes = vec![vec![1u8, 2], vec![3u8, 4]];
        same_bytes(&bytes, &batch_of::<Vec<u8>, _>([[1u8, 2], [3, 4]].iter()));
        same_bytes(
            &bytes,
            &batch_of::<Vec<u8>, _>([&[1u8, 2][..], &[3, 4]].iter()),
        );
        same_bytes(
            &bytes,
            &batch_of::<Vec<u8>, _>([b"\x01\x02", b"\x03\x04"].iter()),
        );
    }

    #[repr(C, align(16))]
    struct Buf([u8; 256]);

    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
    struct T {
        a: u64,
        s: String,
        v: Vec<u32>,
    }

    #[test]
    fn roundtrip_in_place_and_counting_agree() {
        let value = T {
            a: 7,
            s: "hello".into(),
            v: vec![1, 2, 3],
        };
        let mut buf = Buf([0; 256]);
        let n = enc(&value, &mut buf.0).unwrap();
        assert_eq!(encoded_len(&value).unwrap(), n);
        assert_eq!(decode::<T>(&buf.0[..n]).unwrap(), value);
        assert_eq!(access::<T>(&buf.0[..n]).unwrap().s.as_str(), "hello");
    }

    #[test]
    fn overflow_is_reported_as_such() {
        let value = T {
            a: 1,
            s: "x".repeat(300),
            v: vec![],
        };
        let mut buf = Buf([0; 256]);
        assert!(matches!(
            enc(&value, &mut buf.0),
            Err(EncodeError::Overflow)
        ));
    }

    /// Our serialiser (`serialize`, with its own thread-local arena) writes exactly what rkyv's
    /// `to_bytes` does, also for archives whose serialisation needs more scratch space than the
    /// arena's first block (each case starts from a fresh arena, so each large one grows it).
    #[test]
    fn archives_are_rkyvs_own_bytes_whatever_the_scratch_space() {
        fn same<V>(value: &V)
        where
            V: Encode + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, BoxedError>>,
        {
            ARENA.with(|slot| drop(slot.take()));
            let theirs = rkyv::to_bytes::<BoxedError>(value).unwrap();
            // (Positions, not addresses, decide rkyv's padding: any buffer will do.)
            let mut ours = vec![0u8; theirs.len()];
            let n = enc(value, &mut ours).unwrap();
            assert_eq!(&ours[..n], &theirs[..]);
            assert_eq!(encoded_len(value).unwrap(), n);
        }
        same(&7u64);
        same(&(3u32, 4u32));
        let n = if cfg!(miri) { 300 } else { 20_000 };
        let many: Vec<String> = (0..n).map(|i| format!("string number {i}")).collect();
        same(&many);
        same(&vec![many.clone(), many]);
        same(&T {
            a: 1,
            s: "after the large ones".into(),
            v: vec![9; 100],
        });
    }

    /// A `Serialize` impl that fails is reported with its own message, not as an overflow.
    #[test]
    fn a_failing_serialiser_is_reported_with_its_message() {
        struct Refuses;
        impl rkyv::Archive for Refuses {
            type Archived = rkyv::Archived<u32>;
            type Resolver = ();
            fn resolve(&self, _: (), _: rkyv::Place<rkyv::Archived<u32>>) {}
        }
        impl<S: rkyv::rancor::Fallible + ?Sized> rkyv::Serialize<S> for Refuses
        where
            S::Error: Source,
        {
            fn serialize(&self, _: &mut S) -> Result<(), S::Error> {
                Err(S::Error::new(std::fmt::Error))
            }
        }
        let mut buf = Buf([0; 256]);
        match enc(&Refuses, &mut buf.0) {
            Err(EncodeError::Failed(m)) => assert!(m.contains("formatting"), "{m}"),
            other => panic!(
                "expected a failure, got {:?}",
                other.map_err(EncodeError::message)
            ),
        }
        assert!(matches!(encoded_len(&Refuses), Err(EncodeError::Failed(_))));

        // One that panics (the worker catches it) leaves this thread's serialiser usable.
        struct Panics;
        impl rkyv::Archive for Panics {
            type Archived = rkyv::Archived<u32>;
            type Resolver = ();
            fn resolve(&self, _: (), _: rkyv::Place<rkyv::Archived<u32>>) {}
        }
        impl<S: rkyv::rancor::Fallible + ?Sized> rkyv::Serialize<S> for Panics {
            fn serialize(&self, _: &mut S) -> Result<(), S::Error> {
                panic!("a Serialize impl that panics")
            }
        }
        let caught = std::panic::catch_unwind(|| {
            let mut buf = Buf([0; 256]);
            let _ = enc(&Panics, &mut buf.0);
        });
        assert!(caught.is_err());
        let value = vec!["still fine".to_string(); 3];
        let n = enc(&value, &mut buf.0).unwrap();
        assert_eq!(decode::<Vec<String>>(&buf.0[..n]).unwrap(), value);
    }

    #[test]
    fn garbage_is_rejected_not_ub() {
        let mut buf = Buf([0xAB; 256]);
        buf.0[0] = 1;
        assert!(decode::<T>(&buf.0[..64]).is_err());
        assert!(decode::<T>(&buf.0[..0]).is_err());
    }

    /// The in-tree smoke version of the `archive` cargo-fuzz target: mutated valid archives
    /// and random bytes are rejected or decoded, never undefined behaviour (run under Miri too).
    #[cfg(feature = "fuzzing")]
    #[test]
    fn mutated_archives_never_misbehave() {
        let valid = rkyv::to_bytes::<rkyv::rancor::Error>(&vec![
            "alpha".to_string(),
            "a longer string that is not inline".to_string(),
        ])
        .unwrap();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let iters = if cfg!(miri) { 200 } else { 20_000 };
        for i in 0..iters {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut b = valid.to_vec();
            if i % 3 == 0 {
                b.truncate((rng % (b.len() as u64 + 1)) as usize);
            } else {
                for k in 0..(1 + i % 3) {
                    let at = ((rng >> (8 * k)) % b.len() as u64) as usize;
                    b[at] = (rng >> 40) as u8 ^ k as u8;
                }
            }
            crate::__fuzz::archive(&b);
        }
    }
}
