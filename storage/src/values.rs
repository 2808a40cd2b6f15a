//! Bulk payloads (audio, speech) kept beside sled, in append-only value files.
//!
//! sled copies a record's value into its tree's leaf page and rewrites the leaf whole when it
//! splits or is consolidated. For 1–100 KB audio records that wrote each byte several times over
//! (leaves of 17 speech segments, 1–2 MB, went out as blob files on the async runtime's threads).
//! A bulk topic's payload is instead written once, to the end of the current value file, and the
//! tree keeps a 29-byte pointer to it:
//!
//! `0xFF ‖ appended_at (i64 BE µs) ‖ file (u32 BE) ‖ position (u64 BE) ‖ length (u32 BE) ‖ crc32`
//!
//! An inline value starts with `appended_at`'s first byte, which is 0 until the year 4254, so the
//! two forms never mix up and logs written before value files existed read as they did.
//!
//! Durability: the committer syncs the value files before it flushes sled, and records in sled's
//! `__meta` how far that sync reached (the mark). An acknowledged record's bytes are therefore
//! always on disk. A pointer sled made durable on its own (its background flush, or a flush that
//! failed half way) may point past the mark at bytes that never got there; such a record was never
//! acknowledged nor shown to a reader, and opening the log drops it (see `truncate_unsynced`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::log::StorageError;

/// First byte of a pointer.
pub(crate) const TAG: u8 = 0xFF;
/// A pointer's length.
pub(crate) const POINTER_LEN: usize = 1 + 8 + 4 + 8 + 4 + 4;
/// A value file is closed for writing once it is this long.
const FILE_BYTES: u64 = 64 << 20;

/// Where a value is: file and position. Ordered as the files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Mark {
    pub file: u32,
    pub pos: u64,
}

impl Mark {
    pub(crate) fn encode(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&self.file.to_be_bytes());
        b[4..].copy_from_slice(&self.pos.to_be_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        let file = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
        let pos = u64::from_be_bytes(b.get(4..12)?.try_into().ok()?);
        Some(Self { file, pos })
    }
}

/// A decoded pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pointer {
    pub appended_at: i64,
    pub at: Mark,
    pub len: u32,
    pub crc: u32,
}

impl Pointer {
    pub(crate) fn encode(&self) -> [u8; POINTER_LEN] {
        let mut b = [0u8; POINTER_LEN];
        b[0] = TAG;
        b[1..9].copy_from_slice(&self.appended_at.to_be_bytes());
        b[9..13].copy_from_slice(&self.at.file.to_be_bytes());
        b[13..21].copy_from_slice(&self.at.pos.to_be_bytes());
        b[21..25].copy_from_slice(&self.len.to_be_bytes());
        b[25..29].copy_from_slice(&self.crc.to_be_bytes());
        b
    }

    /// `Some` if `stored` is a pointer (`None`: an inline value).
    pub(crate) fn decode(stored: &[u8]) -> Option<Result<Self, ()>> {
        if stored.first() != Some(&TAG) {
            return None;
        }
        if stored.len() != POINTER_LEN {
            return Some(Err(()));
        }
        let be4 = |r: std::ops::Range<usize>| u32::from_be_bytes(stored[r].try_into().unwrap_or([0; 4]));
        let be8 = |r: std::ops::Range<usize>| u64::from_be_bytes(stored[r].try_into().unwrap_or([0; 8]));
        Some(Ok(Self {
            appended_at: be8(1..9) as i64,
            at: Mark { file: be4(9..13), pos: be8(13..21) },
            len: be4(21..25),
            crc: be4(25..29),
        }))
    }

    /// Where the value ends: everything before it must be synced for the record to be kept.
    pub(crate) fn end(&self) -> Mark {
        Mark { file: self.at.file, pos: self.at.pos + u64::from(self.len) }
    }
}

struct Writer {
    file: u32,
    /// Created on the first write (a log only read, as by `voxgate replay`, leaves no file).
    handle: Option<Arc<File>>,
    len: u64,
    /// Files closed for writing since the last sync (they still need one).
    rolled: Vec<Arc<File>>,
}

/// The value files of one log directory.
pub(crate) struct Values {
    dir: PathBuf,
    writer: Mutex<Writer>,
    files: RwLock<BTreeMap<u32, Arc<File>>>,
    /// What the last sync covered.
    synced: Mutex<Mark>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Engine(format!("{what} {}: {e}", path.display()))
}

fn file_name(id: u32) -> String {
    format!("{id:010}.values")
}

impl Values {
    /// Opens the value files under `dir` (creating it) and starts a new one for writing.
    pub(crate) fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
            let entry = entry.map_err(|e| io("listing", dir, e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".values")).and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let f = OpenOptions::new().read(true).open(&path).map_err(|e| io("opening", &path, e))?;
            files.insert(id, Arc::new(f));
        }
        // Never append after what a crash may have left at a file's end: a fresh file each open,
        // created on the first write.
        let id = files.keys().next_back().map_or(0, |last| last + 1);
        Ok(Self {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer { file: id, handle: None, len: 0, rolled: Vec::new() }),
            files: RwLock::new(files),
            synced: Mutex::new(Mark { file: id, pos: 0 }),
        })
    }

    /// Writes `payload` at the end of the current file; the pointer to it. Callers write a
    /// partition's values in its offset order (under its lock).
    pub(crate) fn append(&self, appended_at: i64, payload: &[u8]) -> Result<Pointer, StorageError> {
        let len = u32::try_from(payload.len()).map_err(|_| StorageError::Engine("value over 4 GiB".into()))?;
        let mut w = self.writer.lock().map_err(|_| StorageError::Closed)?;
        if w.len > 0 && w.len + u64::from(len) > FILE_BYTES {
            self.roll_writer(&mut w)?;
        }
        let handle = match &w.handle {
            Some(h) => h.clone(),
            None => {
                let h = self.create(w.file)?;
                w.handle = Some(h.clone());
                h
            }
        };
        let at = Mark { file: w.file, pos: w.len };
        // A failed write leaves `len` where it was: no pointer refers to what it left behind.
        handle
            .write_all_at(payload, at.pos)
            .map_err(|e| StorageError::Unavailable(format!("writing a value file: {e}")))?;
        w.len += u64::from(len);
        Ok(Pointer { appended_at, at, len, crc: crc32fast::hash(payload) })
    }

    /// Goes on writing in a new file (after a write failure, nothing more goes after bytes whose
    /// sync may have failed).
    pub(crate) fn roll(&self) -> Result<(), StorageError> {
        let mut w = self.writer.lock().map_err(|_| StorageError::Closed)?;
        self.roll_writer(&mut w)
    }

    fn roll_writer(&self, w: &mut Writer) -> Result<(), StorageError> {
        // A file never written to stays the one to write.
        if let Some(old) = w.handle.take() {
            w.rolled.push(old);
            w.file += 1;
            w.len = 0;
        }
        Ok(())
    }

    /// Creates value file `id` for writing and makes it readable.
    fn create(&self, id: u32) -> Result<Arc<File>, StorageError> {
        let path = self.dir.join(file_name(id));
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| StorageError::Unavailable(format!("creating {}: {e}", path.display())))?,
        );
        self.files.write().map_err(|_| StorageError::Closed)?.insert(id, f.clone());
        Ok(f)
    }

    /// Makes every value written so far durable; how far that reached.
    pub(crate) fn sync(&self) -> Result<Mark, StorageError> {
        let (mark, handle, rolled) = {
            let mut w = self.writer.lock().map_err(|_| StorageError::Closed)?;
            let mark = Mark { file: w.file, pos: w.len };
            if *self.synced.lock().map_err(|_| StorageError::Closed)? == mark {
                return Ok(mark);
            }
            (mark, w.handle.clone(), std::mem::take(&mut w.rolled))
        };
        for f in rolled.iter().chain(handle.as_ref()) {
            f.sync_data().map_err(|e| StorageError::Flush(format!("syncing a value file: {e}")))?;
        }
        let mut s = self.synced.lock().map_err(|_| StorageError::Closed)?;
        if mark > *s {
            *s = mark;
        }
        Ok(mark)
    }

    /// Reads the value `p` points at into `out` (appended to it), checking its checksum.
    pub(crate) fn read(&self, p: &Pointer, out: &mut Vec<u8>) -> Result<(), StorageError> {
        let f = self
            .files
            .read()
            .map_err(|_| StorageError::Closed)?
            .get(&p.at.file)
            .cloned()
            .ok_or_else(|| StorageError::Corrupt(format!("value file {} is missing", file_name(p.at.file))))?;
        let start = out.len();
        out.resize(start + p.len as usize, 0);
        f.read_exact_at(&mut out[start..], p.at.pos)
            .map_err(|e| StorageError::Corrupt(format!("reading {} at {}: {e}", file_name(p.at.file), p.at.pos)))?;
        if crc32fast::hash(&out[start..]) != p.crc {
            return Err(StorageError::Corrupt(format!(
                "value in {} at {} fails its checksum",
                file_name(p.at.file),
                p.at.pos
            )));
        }
        Ok(())
    }

    /// Deletes the files wholly before `keep` (no record points into them any more), except the
    /// one being written. Returns how many.
    pub(crate) fn remove_before(&self, keep: u32) -> Result<usize, StorageError> {
        let current = self.writer.lock().map_err(|_| StorageError::Closed)?.file;
        let mut files = self.files.write().map_err(|_| StorageError::Closed)?;
        let old: Vec<u32> = files.range(..keep.min(current)).map(|(id, _)| *id).collect();
        for id in &old {
            files.remove(id);
            let path = self.dir.join(file_name(*id));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a value file no record uses");
            }
        }
        Ok(old.len())
    }

    /// The file being written (records appended from now on point into it or later ones).
    pub(crate) fn current_file(&self) -> u32 {
        self.writer.lock().map(|w| w.file).unwrap_or(0)
    }

    /// Bytes in the value files.
    pub(crate) fn size_on_disk(&self) -> u64 {
        let files = match self.files.read() {
            Ok(f) => f,
            Err(_) => return 0,
        };
        files.values().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_round_trip_and_never_look_inline() {
        let p = Pointer { appended_at: 1_764_000_000_000_000, at: Mark { file: 7, pos: 123_456 }, len: 800, crc: 42 };
        let b = p.encode();
        assert_eq!(Pointer::decode(&b), Some(Ok(p)));
        assert_eq!(p.end(), Mark { file: 7, pos: 124_256 });
        // An inline value: appended_at's first byte.
        let mut inline = 1_764_000_000_000_000i64.to_be_bytes().to_vec();
        inline.extend_from_slice(b"payload");
        assert_eq!(Pointer::decode(&inline), None);
        assert_eq!(Pointer::decode(&b[..20]), Some(Err(())));
    }

    #[test]
    fn values_are_read_back_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let v = Values::open(dir.path()).unwrap();
        let a = v.append(1, b"first value").unwrap();
        let b = v.append(2, &[7u8; 5000]).unwrap();
        assert!(a.end() <= b.at);
        let mark = v.sync().unwrap();
        assert_eq!(mark, b.end());
        assert_eq!(v.sync().unwrap(), mark, "nothing new to sync");
        let mut out = Vec::new();
        v.read(&b, &mut out).unwrap();
        assert_eq!(out, vec![7u8; 5000]);
        out.clear();
        v.read(&a, &mut out).unwrap();
        assert_eq!(out, b"first value");
        let bad = Pointer { crc: a.crc ^ 1, ..a };
        assert!(matches!(v.read(&bad, &mut Vec::new()), Err(StorageError::Corrupt(_))));
    }

    #[test]
    fn files_roll_and_old_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let v = Values::open(dir.path()).unwrap();
        let big = vec![1u8; (FILE_BYTES / 2 + 1) as usize];
        let first = v.append(1, &big).unwrap();
        let second = v.append(2, &big).unwrap();
        assert_eq!((first.at.file, second.at.file), (0, 1));
        v.sync().unwrap();
        assert_eq!(v.remove_before(second.at.file).unwrap(), 1);
        assert!(matches!(v.read(&first, &mut Vec::new()), Err(StorageError::Corrupt(_))));
        v.read(&second, &mut Vec::new()).unwrap();
        // Reopened: the files left are read, and writing goes on in a new one, created only once
        // something is written.
        drop(v);
        let v = Values::open(dir.path()).unwrap();
        assert_eq!(v.current_file(), 2);
        v.read(&second, &mut Vec::new()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        v.roll().unwrap();
        assert_eq!(v.current_file(), 2, "an unwritten file is not skipped");
        let third = v.append(3, b"x").unwrap();
        assert_eq!(third.at.file, 2);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
