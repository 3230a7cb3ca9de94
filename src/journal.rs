//! The activity journal: the durable home of every event a till posts, until the hub has it.
//!
//! Why not redb: a durable redb commit rewrites B-tree pages and its header, about 30 KiB of
//! flash for one small event. The journal appends checksummed records to preallocated
//! segment files and writes only the sectors a commit fills, with `O_DIRECT` so the kernel
//! does not widen a 600-byte commit to a 4 KiB page. A lone event costs one sector or two;
//! under load one commit carries many events. See `docs/STORAGE.md`.
//!
//! Layout: segment files `seg-<number>.log` of a fixed size, numbered upwards. Each commit
//! starts on a sector boundary and holds whole records, then zero padding to the next
//! boundary. A record is
//!
//! ```text
//! magic u32 "SBJ1" | payload length u32 | seq u64 | crc32 u32 (of length, seq, payload) | payload
//! ```
//!
//! with a postcard [`StoredEvent`] as payload, all little-endian. Sequence numbers rise by
//! one per event across segments.
//!
//! Recovery reads every segment in order and keeps records while they are well formed,
//! checksummed, and newer than the one before. A torn commit ends the log where it tears; a
//! recycled segment's stale records are older, and so end it too. Acknowledged events were
//! synced before the acknowledgement, so they are always before any tear.
//!
//! Segments whose events the hub has acknowledged are renamed and reused for new events, so
//! in the steady state the journal allocates nothing and its files stay written in place.
//! The file layer is a trait so tests can drop unsynced writes the way a power cut does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;

use crate::storage::StoredEvent;

const MAGIC: u32 = u32::from_le_bytes(*b"SBJ1");
const HEADER: usize = 20;
/// Largest payload a record may have; anything larger on disk is damage, not data.
const MAX_PAYLOAD: usize = 1024 * 1024;

/// One segment file, as the journal needs it.
pub trait SegmentFile: Send {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` (a whole number of sectors) at `offset` (a sector boundary).
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// The directory of segment files.
pub trait SegmentStore: Send {
    /// Numbers of the existing segments, in any order.
    fn list(&self) -> io::Result<Vec<u64>>;
    fn open(&self, number: u64) -> io::Result<Box<dyn SegmentFile>>;
    /// Creates a zero-filled segment of `size` bytes, durably.
    fn create(&self, number: u64, size: u64) -> io::Result<Box<dyn SegmentFile>>;
    /// Renames a segment, durably, for reuse.
    fn rename(&self, from: u64, to: u64) -> io::Result<()>;
    /// The write granularity: commits start and end on multiples of it.
    fn sector(&self) -> usize;
}

/// Whether a posted event was new or already in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New { seq: u64 },
    Duplicate { seq: u64 },
}

/// Where an event is, and what status needs of it without reading it.
#[derive(Debug, Clone, Copy)]
struct Location {
    segment: u64,
    offset: u64,
    len: u32,
    received_at_ms: i64,
}

struct Segment {
    number: u64,
    file: Box<dyn SegmentFile>,
    /// Highest seq stored in this segment, if any.
    last_seq: Option<u64>,
}

/// What recovery found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub events: u64,
    pub last_seq: u64,
}

/// The journal. Not thread-safe by itself: the activity module wraps it in a mutex.
pub struct Journal {
    store: Box<dyn SegmentStore>,
    segment_size: u64,
    segments: VecDeque<Segment>,
    /// Offset of the next commit in the last segment.
    write_offset: u64,
    next_seq: u64,
    pushed_through: u64,
    ids: HashMap<String, u64>,
    locations: BTreeMap<u64, Location>,
    /// Bytes handed to the file layer, for flash accounting.
    pub bytes_written: u64,
    pub commits: u64,
}

impl Journal {
    /// Opens the journal, recovering its content, with `pushed_through` the last event the
    /// hub is known to have.
    pub fn open(
        store: Box<dyn SegmentStore>,
        segment_size: u64,
        pushed_through: u64,
    ) -> io::Result<(Journal, Recovery)> {
        let sector = store.sector() as u64;
        if segment_size < 4 * sector || segment_size % sector != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("segment size {segment_size} must be a multiple of {sector} and at least 4 sectors"),
            ));
        }
        let mut numbers = store.list()?;
        numbers.sort_unstable();
        let mut journal = Journal {
            store,
            segment_size,
            segments: VecDeque::new(),
            write_offset: 0,
            next_seq: pushed_through + 1,
            pushed_through,
            ids: HashMap::new(),
            locations: BTreeMap::new(),
            bytes_written: 0,
            commits: 0,
        };
        let mut last_seq: Option<u64> = None;
        let mut events = 0;
        for number in numbers {
            let file = journal.store.open(number)?;
            let (records, end) = scan(&*file, segment_size, sector, last_seq)?;
            let mut segment_last = None;
            for (seq, offset, len, event) in records {
                journal.ids.insert(event.id.clone(), seq);
                journal.locations.insert(
                    seq,
                    Location {
                        segment: number,
                        offset,
                        len,
                        received_at_ms: event.received_at_ms,
                    },
                );
                segment_last = Some(seq);
                last_seq = Some(seq);
                events += 1;
            }
            journal.write_offset = end;
            journal.segments.push_back(Segment {
                number,
                file,
                last_seq: segment_last,
            });
        }
        if let Some(last) = last_seq {
            journal.next_seq = journal.next_seq.max(last + 1);
        }
        if let Some(segment) = journal.segments.back_mut() {
            scrub(
                &mut *segment.file,
                segment_size,
                sector,
                journal.write_offset,
                last_seq.unwrap_or(0),
            )?;
        }
        if journal.segments.is_empty() {
            let file = journal.store.create(0, segment_size)?;
            journal.segments.push_back(Segment {
                number: 0,
                file,
                last_seq: None,
            });
            journal.write_offset = 0;
        }
        let recovery = Recovery {
            segments: journal.segments.len(),
            events,
            last_seq: last_seq.unwrap_or(0),
        };
        Ok((journal, recovery))
    }

    /// Appends the new events among `events` in one durable commit (several only when a
    /// segment fills) and says, for each, whether it was new. Returns only once synced.
    pub fn append(&mut self, events: &[StoredEvent]) -> io::Result<Vec<Appended>> {
        let mut outcomes = Vec::with_capacity(events.len());
        let mut pending: Vec<(String, u64, Location)> = Vec::new();
        let result = self.append_inner(events, &mut outcomes, &mut pending);
        if let Err(e) = result {
            // Nothing of this batch is acknowledged. Events of it already synced (a segment
            // filled mid-batch) stay: they are on disk and will be pushed, and a replay by a
            // till is answered as a duplicate. The rest is forgotten and its sequence numbers
            // reused, so the log stays gapless; the bytes it left past the write offset are
            // overwritten by the next commit.
            if let Some((_, first, _)) = pending.first() {
                self.next_seq = *first;
            }
            for (id, _, _) in pending {
                self.ids.remove(&id);
            }
            return Err(e);
        }
        Ok(outcomes)
    }

    fn append_inner(
        &mut self,
        events: &[StoredEvent],
        outcomes: &mut Vec<Appended>,
        pending: &mut Vec<(String, u64, Location)>,
    ) -> io::Result<()> {
        let sector = self.store.sector() as u64;
        let mut buffer: Vec<u8> = Vec::new();
        for event in events {
            if let Some(&seq) = self.ids.get(&event.id) {
                outcomes.push(Appended::Duplicate { seq });
                continue;
            }
            let payload = postcard::to_stdvec(event)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if payload.len() > MAX_PAYLOAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an event is larger than the journal's record limit",
                ));
            }
            let record_len = (HEADER + payload.len()) as u64;
            let needed = round_up(buffer.len() as u64 + record_len, sector);
            if self.write_offset + needed > self.segment_size {
                self.flush(&mut buffer, pending)?;
                self.rotate()?;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let offset = self.write_offset + buffer.len() as u64;
            encode_record(&mut buffer, seq, &payload);
            let location = Location {
                segment: self.current_number(),
                offset,
                len: payload.len() as u32,
                received_at_ms: event.received_at_ms,
            };
            self.ids.insert(event.id.clone(), seq);
            pending.push((event.id.clone(), seq, location));
            outcomes.push(Appended::New { seq });
        }
        self.flush(&mut buffer, pending)
    }

    /// Writes and syncs the buffered commit into the current segment.
    fn flush(
        &mut self,
        buffer: &mut Vec<u8>,
        pending: &mut Vec<(String, u64, Location)>,
    ) -> io::Result<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        let sector = self.store.sector();
        let padded = round_up(buffer.len() as u64, sector as u64) as usize;
        buffer.resize(padded, 0);
        let offset = self.write_offset;
        let segment = self
            .segments
            .back_mut()
            .ok_or_else(|| io::Error::other("the journal has no segment"))?;
        segment.file.write_at(buffer, offset)?;
        segment.file.sync()?;
        self.bytes_written += padded as u64;
        self.commits += 1;
        self.write_offset += padded as u64;
        for (_, seq, location) in pending.drain(..) {
            segment.last_seq = Some(seq);
            self.locations.insert(seq, location);
        }
        buffer.clear();
        Ok(())
    }

    fn current_number(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.number)
    }

    /// Starts a new segment: reuses the oldest one if the hub has all its events, else
    /// creates one.
    fn rotate(&mut self) -> io::Result<()> {
        let number = self.current_number() + 1;
        let reusable = self.segments.len() >= 2
            && self
                .segments
                .front()
                .is_some_and(|s| s.last_seq.is_none_or(|last| last <= self.pushed_through));
        let file = if reusable {
            let old = self
                .segments
                .pop_front()
                .ok_or_else(|| io::Error::other("the journal has no segment"))?;
            // Its events leave the journal: they are at the hub, and a replay of one of
            // their ids is now stored again and dropped by the hub as a duplicate.
            let stale: Vec<u64> = self
                .locations
                .iter()
                .filter(|(_, l)| l.segment == old.number)
                .map(|(&seq, _)| seq)
                .collect();
            let stale_set: std::collections::HashSet<u64> = stale.iter().copied().collect();
            for seq in stale {
                self.locations.remove(&seq);
            }
            self.ids.retain(|_, seq| !stale_set.contains(seq));
            drop(old.file);
            self.store.rename(old.number, number)?;
            self.store.open(number)?
        } else {
            self.store.create(number, self.segment_size)?
        };
        self.segments.push_back(Segment {
            number,
            file,
            last_seq: None,
        });
        self.write_offset = 0;
        Ok(())
    }

    /// Up to `limit` events the hub does not have yet, oldest first.
    pub fn unpushed(&self, limit: usize) -> io::Result<Vec<(u64, StoredEvent)>> {
        let mut out = Vec::new();
        for (&seq, location) in self.locations.range(self.pushed_through + 1..).take(limit) {
            let segment = self
                .segments
                .iter()
                .find(|s| s.number == location.segment)
                .ok_or_else(|| io::Error::other("an event's segment is gone"))?;
            let mut buf = vec![0u8; HEADER + location.len as usize];
            segment.file.read_at(&mut buf, location.offset)?;
            let event = postcard::from_bytes(&buf[HEADER..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            out.push((seq, event));
        }
        Ok(out)
    }

    /// Records that the hub has every event up to `seq`.
    pub fn mark_pushed(&mut self, seq: u64) {
        self.pushed_through = self.pushed_through.max(seq);
    }

    pub fn pushed_through(&self) -> u64 {
        self.pushed_through
    }

    /// Events waiting for the hub, and when the oldest of them arrived.
    pub fn pending(&self) -> (u64, Option<i64>) {
        let mut range = self.locations.range(self.pushed_through + 1..);
        let oldest = range.next().map(|(_, l)| l.received_at_ms);
        let count = self.next_seq.saturating_sub(self.pushed_through + 1);
        (count, oldest)
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Highest sequence number stored so far.
    #[cfg(test)]
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

fn encode_record(buffer: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    let seq_bytes = seq.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(&seq_bytes);
    crc.update(payload);
    buffer.extend_from_slice(&MAGIC.to_le_bytes());
    buffer.extend_from_slice(&len);
    buffer.extend_from_slice(&seq_bytes);
    buffer.extend_from_slice(&crc.finalize().to_le_bytes());
    buffer.extend_from_slice(payload);
}

type Scanned = (Vec<(u64, u64, u32, StoredEvent)>, u64);

/// The record at `pos` if it is whole, checksummed, and the next in sequence after
/// `last_seq` (any sequence number when the log is empty so far).
fn parse_record(
    data: &[u8],
    pos: usize,
    last_seq: Option<u64>,
) -> Option<(u64, usize, StoredEvent)> {
    let header = data.get(pos..pos + HEADER)?;
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if word(0) != MAGIC {
        return None;
    }
    let len = word(4) as usize;
    if len > MAX_PAYLOAD {
        return None;
    }
    let payload = data.get(pos + HEADER..pos + HEADER + len)?;
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&header[8..16]);
    let seq = u64::from_le_bytes(seq_bytes);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..16]);
    crc.update(payload);
    if crc.finalize() != word(16) {
        return None;
    }
    if last_seq.is_some_and(|last| seq != last + 1) {
        return None;
    }
    let event = postcard::from_bytes::<StoredEvent>(payload).ok()?;
    Some((seq, len, event))
}

/// Reads the valid records of one segment; returns them (seq, offset, payload length, event)
/// and the offset where the next commit goes.
fn scan(
    file: &dyn SegmentFile,
    size: u64,
    sector: u64,
    mut last_seq: Option<u64>,
) -> io::Result<Scanned> {
    // Segments are a few MiB: reading one whole is simpler and faster than record by record.
    let mut data = vec![0u8; size as usize];
    file.read_at(&mut data, 0)?;
    let mut out = Vec::new();
    let mut pos: usize = 0;
    let mut end: u64 = 0;
    let word = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    while pos + HEADER <= data.len() {
        match parse_record(&data, pos, last_seq) {
            Some((seq, len, event)) => {
                out.push((seq, pos as u64, len as u32, event));
                last_seq = Some(seq);
                pos += HEADER + len;
                end = round_up(pos as u64, sector);
            }
            None => {
                // Not a record here: commit padding, or a record torn by a power cut. A
                // commit can only start on a sector boundary, so try the next one; the log
                // goes on there only with the very next sequence number.
                if pos as u64 % sector == 0 {
                    break;
                }
                let next = round_up(pos as u64, sector) as usize;
                let continues = next + HEADER <= data.len()
                    && word(next) == MAGIC
                    && parse_record(&data, next, last_seq).is_some();
                if !continues {
                    break;
                }
                pos = next;
            }
        }
    }
    Ok((out, end))
}

/// Zeroes what a torn commit may have left past the end of the log: sectors that start a
/// record newer than the last valid one. Left there, such a record could line up behind a
/// later commit and come back as an event nobody acknowledged.
fn scrub(
    file: &mut dyn SegmentFile,
    size: u64,
    sector: u64,
    end: u64,
    last_seq: u64,
) -> io::Result<()> {
    let mut header = [0u8; HEADER];
    let zeros = vec![0u8; sector as usize];
    let mut wrote = false;
    let mut pos = end;
    while pos + HEADER as u64 <= size {
        file.read_at(&mut header, pos)?;
        let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&header[8..16]);
        if magic == MAGIC && u64::from_le_bytes(seq) > last_seq {
            file.write_at(&zeros, pos)?;
            wrote = true;
        }
        pos += sector;
    }
    if wrote {
        file.sync()?;
    }
    Ok(())
}

/// Segment files in a directory, written with `O_DIRECT` where the filesystem allows it.
pub struct DirStore {
    dir: PathBuf,
    direct: bool,
    sector: usize,
}

impl DirStore {
    /// Uses `dir`, creating it. Probes whether `O_DIRECT` works there (it does not on tmpfs)
    /// and falls back to buffered writes with `fdatasync`, which cost a whole page per commit.
    pub fn new(dir: PathBuf) -> io::Result<DirStore> {
        std::fs::create_dir_all(&dir)?;
        let probe = dir.join(".direct-probe");
        let mut direct = false;
        let mut sector = 4096;
        for candidate in [512usize, 4096] {
            if direct_write_works(&probe, candidate) {
                direct = true;
                sector = candidate;
                break;
            }
        }
        let _ = std::fs::remove_file(&probe);
        if !direct {
            tracing::warn!(
                "{}: O_DIRECT is not available; the journal writes whole pages",
                dir.display()
            );
        }
        Ok(DirStore {
            dir,
            direct,
            sector,
        })
    }

    fn path(&self, number: u64) -> PathBuf {
        self.dir.join(format!("seg-{number:016x}.log"))
    }

    fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }

    fn open_file(&self, number: u64) -> io::Result<Box<dyn SegmentFile>> {
        let path = self.path(number);
        let read = std::fs::File::open(&path)?;
        let write = open_for_write(&path, self.direct)?;
        Ok(Box::new(DiskSegment {
            read,
            write,
            sector: self.sector,
            scratch: Vec::new(),
        }))
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

fn open_for_write(path: &std::path::Path, direct: bool) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

fn direct_write_works(probe: &std::path::Path, sector: usize) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(file) = std::fs::File::create(probe) else {
        return false;
    };
    drop(file);
    let Ok(file) = open_for_write(probe, true) else {
        return false;
    };
    let mut scratch = Vec::new();
    let buf = aligned(&mut scratch, sector, &vec![0u8; sector]);
    file.write_at(buf, 0).is_ok()
}

/// A copy of `data` at an address aligned to `align`, as `O_DIRECT` requires, without unsafe
/// code: the scratch vector is over-allocated and the slice starts at the aligned offset.
fn aligned<'a>(scratch: &'a mut Vec<u8>, align: usize, data: &[u8]) -> &'a [u8] {
    scratch.clear();
    scratch.resize(data.len() + align, 0);
    let start = scratch.as_ptr().align_offset(align).min(align);
    scratch[start..start + data.len()].copy_from_slice(data);
    &scratch[start..start + data.len()]
}

impl SegmentStore for DirStore {
    fn list(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(hex) = name
                .strip_prefix("seg-")
                .and_then(|n| n.strip_suffix(".log"))
            {
                if let Ok(n) = u64::from_str_radix(hex, 16) {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }

    fn open(&self, number: u64) -> io::Result<Box<dyn SegmentFile>> {
        self.open_file(number)
    }

    fn create(&self, number: u64, size: u64) -> io::Result<Box<dyn SegmentFile>> {
        use std::io::Write;
        let path = self.path(number);
        let tmp = path.with_extension("new");
        {
            // Written with zeros once, so later commits overwrite allocated blocks and
            // fdatasync has no block allocation to journal.
            let mut file = std::fs::File::create(&tmp)?;
            let zeros = vec![0u8; 1024 * 1024];
            let mut left = size;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        self.sync_dir()?;
        self.open_file(number)
    }

    fn rename(&self, from: u64, to: u64) -> io::Result<()> {
        std::fs::rename(self.path(from), self.path(to))?;
        self.sync_dir()
    }

    fn sector(&self) -> usize {
        self.sector
    }
}

struct DiskSegment {
    read: std::fs::File,
    write: std::fs::File,
    sector: usize,
    scratch: Vec<u8>,
}

impl SegmentFile for DiskSegment {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.read.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let data = aligned(&mut self.scratch, self.sector.max(4096), buf);
        self.write.write_all_at(data, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        // With O_DIRECT the data is on the device already; this flushes the device's cache.
        self.write.sync_data()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Files in memory where writes are volatile until synced, and a "power cut" keeps a
    /// random part of the unsynced sectors: what a disk may do.
    #[derive(Default)]
    pub struct MemDisk {
        files: BTreeMap<u64, MemFileData>,
        pub rng: u64,
        /// When set, syncs fail: the writes stay volatile, as when power goes mid-commit.
        pub failing_syncs: bool,
    }

    #[derive(Default, Clone)]
    struct MemFileData {
        durable: Vec<u8>,
        current: Vec<u8>,
        dirty_sectors: std::collections::BTreeSet<u64>,
    }

    pub const SECTOR: usize = 512;

    /// splitmix64: deterministic for a given seed, so a failing power-cut case can be
    /// replayed. Shared with the storage tests.
    pub fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    impl MemDisk {
        fn next(&mut self) -> u64 {
            splitmix64(&mut self.rng)
        }

        /// Loses power: each sector written since the last sync survives or not, at random,
        /// in any combination (a device may reorder writes it has not been asked to flush).
        pub fn power_cut(&mut self) {
            let mut dirty = Vec::new();
            for (n, f) in &self.files {
                dirty.extend(f.dirty_sectors.iter().map(|s| (*n, *s)));
            }
            for (n, s) in dirty {
                let survives = self.next() % 2 == 0;
                if let Some(f) = self.files.get_mut(&n) {
                    if survives {
                        let range = s as usize * SECTOR..(s as usize + 1) * SECTOR;
                        let sector = f.current[range.clone()].to_vec();
                        f.durable[range].copy_from_slice(&sector);
                    }
                }
            }
            for f in self.files.values_mut() {
                f.dirty_sectors.clear();
                f.current = f.durable.clone();
            }
            self.failing_syncs = false;
        }
    }

    #[derive(Clone)]
    pub struct MemStore(pub Arc<Mutex<MemDisk>>);

    struct MemFile {
        disk: Arc<Mutex<MemDisk>>,
        number: u64,
    }

    impl SegmentFile for MemFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let disk = self.disk.lock().unwrap();
            let f = &disk.files[&self.number];
            let start = offset as usize;
            buf.copy_from_slice(&f.current[start..start + buf.len()]);
            Ok(())
        }

        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            assert_eq!(offset as usize % SECTOR, 0);
            assert_eq!(buf.len() % SECTOR, 0);
            let mut disk = self.disk.lock().unwrap();
            let f = disk.files.get_mut(&self.number).unwrap();
            let start = offset as usize;
            f.current[start..start + buf.len()].copy_from_slice(buf);
            for s in 0..buf.len() / SECTOR {
                f.dirty_sectors.insert(offset / SECTOR as u64 + s as u64);
            }
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            let mut disk = self.disk.lock().unwrap();
            if disk.failing_syncs {
                return Err(io::Error::other("power is going"));
            }
            let f = disk.files.get_mut(&self.number).unwrap();
            f.durable = f.current.clone();
            f.dirty_sectors.clear();
            Ok(())
        }
    }

    impl SegmentStore for MemStore {
        fn list(&self) -> io::Result<Vec<u64>> {
            Ok(self.0.lock().unwrap().files.keys().copied().collect())
        }
        fn open(&self, number: u64) -> io::Result<Box<dyn SegmentFile>> {
            Ok(Box::new(MemFile {
                disk: self.0.clone(),
                number,
            }))
        }
        fn create(&self, number: u64, size: u64) -> io::Result<Box<dyn SegmentFile>> {
            let data = vec![0u8; size as usize];
            self.0.lock().unwrap().files.insert(
                number,
                MemFileData {
                    durable: data.clone(),
                    current: data,
                    dirty_sectors: Default::default(),
                },
            );
            self.open(number)
        }
        fn rename(&self, from: u64, to: u64) -> io::Result<()> {
            let mut disk = self.0.lock().unwrap();
            let f = disk.files.remove(&from).unwrap();
            disk.files.insert(to, f);
            Ok(())
        }
        fn sector(&self) -> usize {
            SECTOR
        }
    }

    fn event(id: &str) -> StoredEvent {
        StoredEvent {
            id: id.to_owned(),
            received_at_ms: 7,
            event: format!(r#"{{"id":"{id}","pad":"{}"}}"#, "x".repeat(300)),
        }
    }

    fn mem(seed: u64) -> (MemStore, Arc<Mutex<MemDisk>>) {
        let disk = Arc::new(Mutex::new(MemDisk {
            rng: seed,
            ..Default::default()
        }));
        (MemStore(disk.clone()), disk)
    }

    #[test]
    fn events_survive_a_reopen_and_replays_are_recognised() {
        let (store, _) = mem(1);
        let (mut j, rec) = Journal::open(Box::new(store.clone()), 64 * 1024, 0).unwrap();
        assert_eq!(rec.events, 0);
        let out = j.append(&[event("a"), event("b"), event("a")]).unwrap();
        assert_eq!(
            out,
            [
                Appended::New { seq: 1 },
                Appended::New { seq: 2 },
                Appended::Duplicate { seq: 1 }
            ]
        );
        j.append(&[event("c")]).unwrap();
        // Two commits, each padded to whole sectors only.
        assert_eq!(j.commits, 2);
        assert_eq!(j.bytes_written % SECTOR as u64, 0);
        assert!(j.bytes_written <= 4 * SECTOR as u64, "{}", j.bytes_written);
        drop(j);

        let (mut j, rec) = Journal::open(Box::new(store), 64 * 1024, 0).unwrap();
        assert_eq!((rec.events, rec.last_seq), (3, 3));
        assert_eq!(
            j.append(&[event("b")]).unwrap(),
            [Appended::Duplicate { seq: 2 }]
        );
        assert_eq!(j.append(&[event("d")]).unwrap(), [Appended::New { seq: 4 }]);
        let ids: Vec<_> = j
            .unpushed(10)
            .unwrap()
            .into_iter()
            .map(|e| e.1.id)
            .collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        j.mark_pushed(2);
        assert_eq!(j.pending().0, 2);
        assert_eq!(j.unpushed(10).unwrap()[0].0, 3);
    }

    #[test]
    fn segments_are_reused_once_pushed_and_recovery_follows_them() {
        let (store, _) = mem(2);
        // Four sectors a segment: a commit of two events fills most of one.
        let size = 4 * SECTOR as u64;
        let (mut j, _) = Journal::open(Box::new(store.clone()), size, 0).unwrap();
        for n in 0..40 {
            j.append(&[event(&format!("e{n}"))]).unwrap();
            // The hub keeps up, five events behind.
            j.mark_pushed(j.last_seq().saturating_sub(5));
        }
        assert!(j.segment_count() <= 5, "{} segments", j.segment_count());
        let pending: Vec<_> = j.unpushed(100).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(pending, (36..=40).collect::<Vec<_>>());
        drop(j);
        let (j, rec) = Journal::open(Box::new(store), size, 35).unwrap();
        assert_eq!(rec.last_seq, 40);
        let pending: Vec<_> = j.unpushed(100).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(pending, (36..=40).collect::<Vec<_>>());
    }

    #[test]
    fn a_full_journal_grows_instead_of_dropping_unpushed_events() {
        let (store, _) = mem(3);
        let (mut j, _) = Journal::open(Box::new(store), 4 * SECTOR as u64, 0).unwrap();
        for n in 0..30 {
            j.append(&[event(&format!("e{n}"))]).unwrap();
        }
        assert_eq!(j.unpushed(100).unwrap().len(), 30);
        assert!(j.segment_count() > 5);
    }

    #[test]
    fn power_cuts_never_lose_an_acknowledged_event_nor_invent_one() {
        for seed in 0..300u64 {
            let (store, disk) = mem(seed);
            let size = 8 * SECTOR as u64;
            // What the journal must hold, in order: every acknowledged event, plus any prefix
            // of an unacknowledged commit that happened to reach the disk.
            let mut stored: Vec<String> = Vec::new();
            let mut doomed: Vec<String> = Vec::new();
            let mut pushed = 0u64;
            let mut n = 0;
            let fresh = |n: &mut u32| {
                *n += 1;
                event(&format!("e{seed}-{n}"))
            };
            for round in 0..5 {
                let (mut j, _) = Journal::open(Box::new(store.clone()), size, pushed).unwrap();
                let got: Vec<String> = j
                    .unpushed(10_000)
                    .unwrap()
                    .into_iter()
                    .map(|e| e.1.id)
                    .collect();
                let expected = &stored[pushed as usize..];
                assert!(
                    got.len() >= expected.len() && &got[..expected.len()] == expected,
                    "seed {seed} round {round}: lost acknowledged events: pushed {pushed}, expected {expected:?}, got {got:?}"
                );
                let survivors = &got[expected.len()..];
                assert!(
                    survivors.len() <= doomed.len() && survivors == &doomed[..survivors.len()],
                    "seed {seed} round {round}: invented events {survivors:?}"
                );
                stored.extend(survivors.iter().cloned());
                let batches = 1 + disk.lock().unwrap().next() % 4;
                for _ in 0..batches {
                    let count = 1 + (disk.lock().unwrap().next() % 5) as usize;
                    let batch: Vec<_> = (0..count).map(|_| fresh(&mut n)).collect();
                    j.append(&batch).unwrap();
                    stored.extend(batch.into_iter().map(|e| e.id));
                }
                if disk.lock().unwrap().next() % 3 == 0 {
                    pushed = pushed.max(stored.len() as u64 / 2);
                    j.mark_pushed(pushed);
                }
                // A commit in flight when the power goes.
                disk.lock().unwrap().failing_syncs = true;
                let batch: Vec<_> = (0..3).map(|_| fresh(&mut n)).collect();
                assert!(j.append(&batch).is_err());
                doomed = batch.into_iter().map(|e| e.id).collect();
                drop(j);
                disk.lock().unwrap().power_cut();
            }
        }
    }
}
