//! Guest RAM that outlives its VM: the memory of a snapshot template, shared
//! copy-on-write by every VM restored from it.
//!
//! It is a memfd. The template VM maps it shared (its RAM *is* the memfd),
//! so a migration with `x-ignore-shared` saves only device state. Once the
//! template VM is gone the memfd is sealed against writes, growing and
//! shrinking; a restored VM maps it private (`share=off`): reads share the
//! template's pages, writes copy them. Because of the seals a VM process —
//! even a compromised one, which can reopen the memfd read-write through
//! `/proc/self/fd` — cannot change what its siblings start from: `write`,
//! `ftruncate` and shared writable mappings fail. The VMM inherits it as a
//! file descriptor (`mem-path=/proc/self/fd/N`), so no path to it exists in
//! a jail.
//!
//! On disk (the template cache) it is a sparse file: only the pages the
//! guest touched take space, and loading copies only those.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum GuestMemoryError {
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("memory file {path} holds {found} bytes; a VM of this size needs {want}")]
    Size { path: String, found: u64, want: u64 },
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestMemoryError {
    let what = what.into();
    move |source| GuestMemoryError::Os { what, source }
}

/// One guest RAM image in a memfd (close-on-exec; see [`GuestMemory::inherit`]).
#[derive(Debug)]
pub struct GuestMemory {
    fd: OwnedFd,
    size: u64,
}

impl GuestMemory {
    /// Zeroed RAM of `size` bytes, writable, for a template VM.
    pub fn create(size: u64) -> Result<Self, GuestMemoryError> {
        // SAFETY: a valid C string; the fd is owned at once.
        let raw = unsafe {
            libc::memfd_create(
                c"neurovisor-guest-ram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(os("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: a new fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let f = File::from(fd);
        f.set_len(size).map_err(os("size the guest RAM memfd"))?;
        Ok(Self { fd: f.into(), size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The path a VMM opens to reach it, once inherited.
    pub fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }

    /// Seals it: nobody can write, grow or shrink it any more. Fails while a
    /// process still maps it shared and writable (the template VM).
    pub fn seal(&self) -> Result<(), GuestMemoryError> {
        let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own fd.
        if unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(os("seal the guest RAM memfd")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Whether it is sealed against writes.
    pub fn is_sealed(&self) -> bool {
        // SAFETY: fcntl on our own fd.
        let s = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GET_SEALS) };
        s >= 0 && s & libc::F_SEAL_WRITE != 0
    }

    /// Writes it to `path` as a sparse file (only the data, holes stay holes).
    pub fn save(&self, path: &Path) -> Result<(), GuestMemoryError> {
        let mut out = File::create(path).map_err(os(format!("create {}", path.display())))?;
        out.set_len(self.size)
            .map_err(os(format!("size {}", path.display())))?;
        let src = self.fd.try_clone().map_err(os("dup the guest RAM memfd"))?;
        copy_data(&mut File::from(src), &mut out, self.size)
            .map_err(os(format!("write {}", path.display())))?;
        out.sync_all().map_err(os(format!("sync {}", path.display())))
    }

    /// Reads a RAM image saved by [`GuestMemory::save`] (or a user's memory
    /// file) of exactly `size` bytes, then seals it.
    pub fn load(path: &Path, size: u64) -> Result<Self, GuestMemoryError> {
        let mut src = File::open(path).map_err(os(format!("open {}", path.display())))?;
        let found = src
            .metadata()
            .map_err(os(format!("stat {}", path.display())))?
            .len();
        if found != size {
            return Err(GuestMemoryError::Size {
                path: path.display().to_string(),
                found,
                want: size,
            });
        }
        let mem = Self::create(size)?;
        let dst = mem.fd.try_clone().map_err(os("dup the guest RAM memfd"))?;
        copy_data(&mut src, &mut File::from(dst), size).map_err(os(format!("read {}", path.display())))?;
        mem.seal()?;
        Ok(mem)
    }
}

impl AsFd for GuestMemory {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Copies the data regions of `src` (SEEK_DATA/SEEK_HOLE) to the same
/// offsets of `dst`, which is already `len` bytes of holes.
fn copy_data(src: &mut File, dst: &mut File, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at: u64 = 0;
    while at < len {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(src.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (data as u64, (hole as u64).min(len));
        src.seek(SeekFrom::Start(start))?;
        dst.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            src.read_exact(&mut buf[..n])?;
            dst.write_all(&buf[..n])?;
            left -= n as u64;
        }
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn saved_sparse_loaded_sealed_and_unwritable() {
        let size = 64 << 20;
        let mem = GuestMemory::create(size).expect("create");
        {
            let mut f = File::from(mem.fd.try_clone().expect("dup"));
            f.seek(SeekFrom::Start(3 << 20)).expect("seek");
            f.write_all(b"template page").expect("write");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mem");
        mem.save(&path).expect("save");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), size);
        assert!(
            meta.blocks() * 512 < 4 << 20,
            "not sparse: {} blocks",
            meta.blocks()
        );

        let loaded = GuestMemory::load(&path, size).expect("load");
        assert!(loaded.is_sealed());
        // Reopened read-write the way a VMM would, it still cannot be changed.
        let mut rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", loaded.raw_fd()))
            .expect("reopen");
        let mut got = [0u8; 13];
        rw.seek(SeekFrom::Start(3 << 20)).expect("seek");
        rw.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"template page");
        rw.seek(SeekFrom::Start(0)).expect("seek");
        assert!(rw.write_all(b"x").is_err(), "a sealed memfd took a write");
        assert!(rw.set_len(size / 2).is_err(), "a sealed memfd shrank");

        let e = GuestMemory::load(&path, size * 2).unwrap_err();
        assert!(matches!(e, GuestMemoryError::Size { .. }), "{e}");
    }
}
