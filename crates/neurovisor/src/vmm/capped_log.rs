//! Log files a guest can write to, with a cap.
//!
//! A VM's serial console (and its VMM's own output) is guest-driven: a guest
//! printing to `/dev/console` forever would fill the disk. So VM processes
//! never write log files themselves: their stdout/stderr are pipes whose read
//! ends the host owns, and a small task per pipe copies into a [`CappedLog`]
//! up to its cap; past it the bytes are read (the VMM never blocks on a full
//! pipe), counted and dropped. The file keeps the head, then one line saying
//! it was capped, and, when the last pipe closes, how much was dropped. The
//! file is created mode 0600 by the host.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The cap of a VM's console log and of its VMM log.
pub const CONSOLE_LOG_CAP: u64 = 1 << 20;

/// One capped log file, shared by any number of pipes (clones share it).
#[derive(Debug, Clone)]
pub struct CappedLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    cap: u64,
    file: Mutex<std::fs::File>,
    /// Bytes of data written (notes not counted), at most `cap`.
    written: AtomicU64,
    discarded: AtomicU64,
    /// Pipes still being copied.
    open_pipes: AtomicUsize,
}

impl CappedLog {
    /// Creates (or appends to) `path`, mode 0600.
    pub fn create(path: &Path, cap: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                cap,
                file: Mutex::new(file),
                written: AtomicU64::new(0),
                discarded: AtomicU64::new(0),
                open_pipes: AtomicUsize::new(0),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Bytes dropped past the cap so far.
    pub fn discarded(&self) -> u64 {
        self.inner.discarded.load(Ordering::Relaxed)
    }

    /// Copies `pipe` into the log until it closes (on the current runtime).
    pub fn attach<R>(&self, pipe: R) -> tokio::task::JoinHandle<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let log = self.clone();
        log.inner.open_pipes.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move { log.copy(pipe).await })
    }

    async fn copy<R: AsyncRead + Unpin>(self, mut pipe: R) {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => self.write(&buf[..n]),
            }
        }
        if self.inner.open_pipes.fetch_sub(1, Ordering::SeqCst) == 1 {
            let dropped = self.discarded();
            if dropped > 0 {
                self.note(&format!(
                    "\n[neurovisor: {dropped} more bytes were discarded after the cap]\n"
                ));
            }
        }
    }

    /// Writes what fits under the cap, counts the rest.
    fn write(&self, data: &[u8]) {
        let i = &self.inner;
        let len = data.len() as u64;
        // Reserve room atomically: several pipes may write at once.
        let before = i
            .written
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| Some((w + len).min(i.cap)))
            .unwrap_or(i.cap);
        let room = i.cap.saturating_sub(before).min(len) as usize;
        if room > 0 {
            if let Ok(mut f) = i.file.lock() {
                if let Err(e) = f.write_all(&data[..room]) {
                    tracing::debug!(path = %i.path.display(), "log write failed: {e}");
                }
            }
        }
        let rest = len - room as u64;
        if rest > 0 {
            let was = i.discarded.fetch_add(rest, Ordering::SeqCst);
            if was == 0 {
                self.note(&format!(
                    "\n[neurovisor: log capped at {} bytes; the rest is discarded]\n",
                    i.cap
                ));
                tracing::debug!(path = %i.path.display(), cap = i.cap, "VM log reached its cap");
            }
        }
    }

    fn note(&self, text: &str) {
        if let Ok(mut f) = self.inner.file.lock() {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn keeps_the_head_and_says_how_much_was_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let log = CappedLog::create(&path, 1000).expect("create");
        let (a, b) = (
            std::io::Cursor::new(vec![b'a'; 700]),
            std::io::Cursor::new(vec![b'b'; 5000]),
        );
        let t1 = log.attach(a);
        t1.await.expect("copy");
        let t2 = log.attach(b);
        t2.await.expect("copy");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with(&format!("{}{}", "a".repeat(700), "b".repeat(300))),
            "{text}"
        );
        assert!(text.contains("log capped at 1000 bytes"), "{text}");
        assert!(
            text.ends_with("[neurovisor: 4700 more bytes were discarded after the cap]\n"),
            "{text}"
        );
        assert!(text.len() < 1200, "{}", text.len());
        assert_eq!(log.discarded(), 4700);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn under_the_cap_nothing_is_added() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmm.log");
        let log = CappedLog::create(&path, 1000).expect("create");
        log.attach(&b"hello\n"[..]).await.expect("copy");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "hello\n");
    }
}
