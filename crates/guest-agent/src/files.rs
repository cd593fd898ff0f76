//! The `Files` service: a sandbox's files, read and written as its user.
//!
//! Every operation runs on a blocking thread whose file-system uid and gid
//! are the request's user for the length of the operation (`setfsuid` is per
//! thread), so the kernel's own permission checks apply and what is created
//! belongs to that user, without a process per call. Files stream in chunks
//! through bounded channels: a large file is never held whole.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use neurovisor_proto::guest::files_server::Files;
use neurovisor_proto::v1::{
    EntryInfo, FileChunk, FileType, FsEvent, FsEventType, ListDirRequest, ListDirResponse, MoveRequest,
    PathRequest, ReadFileRequest, RemoveResponse, WatchDirRequest, WriteFileRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::exec::{SANDBOX_GID, SANDBOX_HOME, SANDBOX_UID, SANDBOX_USER};

/// The largest piece of a file in one message.
pub const CHUNK: usize = 1 << 20;
/// The most entries one `ListDir` returns.
pub const MAX_LIST_ENTRIES: usize = 10_000;

/// Who an operation acts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    User,
    Root,
}

impl Account {
    pub fn parse(name: &str) -> Result<Self, Status> {
        match name {
            "" | SANDBOX_USER => Ok(Self::User),
            "root" => Ok(Self::Root),
            other => Err(Status::invalid_argument(format!(
                "unknown user '{other}'; use \"{SANDBOX_USER}\" (the default) or \"root\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::User => SANDBOX_USER,
            Self::Root => "root",
        }
    }

    pub fn home(self) -> &'static str {
        match self {
            Self::User => SANDBOX_HOME,
            Self::Root => "/root",
        }
    }

    /// An absolute path: as given, or relative to the user's home.
    pub fn resolve(self, path: &str) -> Result<PathBuf, Status> {
        if path.is_empty() {
            return Err(Status::invalid_argument(
                "path is empty; name a file or directory",
            ));
        }
        if path.contains('\0') {
            return Err(Status::invalid_argument("path contains a NUL byte"));
        }
        let p = Path::new(path);
        Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            Path::new(self.home()).join(p)
        })
    }
}

/// The thread acts as the user until dropped. The kernel drops the
/// file-system capabilities (DAC override and the like) while the fsuid is
/// not 0 and gives them back when it is 0 again.
struct FsIdentity(Account);

impl FsIdentity {
    fn enter(a: Account) -> Self {
        if a == Account::User {
            // SAFETY: plain syscalls on this thread's own credentials.
            unsafe {
                libc::setfsgid(SANDBOX_GID);
                libc::setfsuid(SANDBOX_UID);
            }
        }
        Self(a)
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        if self.0 == Account::User {
            // SAFETY: as above; back to the agent's own identity.
            unsafe {
                libc::setfsuid(0);
                libc::setfsgid(0);
            }
        }
    }
}

/// Runs `f` on a blocking thread as `account`.
async fn as_account<T: Send + 'static>(
    account: Account,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, std::io::Error> {
    tokio::task::spawn_blocking(move || {
        let _id = FsIdentity::enter(account);
        f()
    })
    .await
    .map_err(std::io::Error::other)?
}

/// An I/O error as a status that names the operation and the path.
fn status_of(what: &str, path: &Path, e: std::io::Error) -> Status {
    use std::io::ErrorKind as K;
    let msg = format!("{what} {}: {e}", path.display());
    match e.kind() {
        K::NotFound => Status::not_found(msg),
        K::PermissionDenied => Status::permission_denied(msg),
        K::AlreadyExists => Status::already_exists(msg),
        K::InvalidInput | K::IsADirectory | K::NotADirectory | K::DirectoryNotEmpty => {
            Status::failed_precondition(msg)
        }
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => Status::resource_exhausted(msg),
        _ => Status::internal(msg),
    }
}

fn permissions(mode: u32, t: FileType) -> String {
    let mut s = String::with_capacity(10);
    s.push(match t {
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::Other => '?',
        _ => '-',
    });
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| gid.to_string())
}

/// What is at `path` (not following a final symlink).
pub fn entry_info(path: &Path) -> std::io::Result<EntryInfo> {
    let md = std::fs::symlink_metadata(path)?;
    let ft = md.file_type();
    let t = if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Directory
    } else if ft.is_file() {
        FileType::File
    } else {
        FileType::Other
    };
    let mode = md.mode() & 0o7777;
    Ok(EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        path: path.to_string_lossy().into_owned(),
        r#type: t as i32,
        size: md.len(),
        mode,
        permissions: permissions(mode, t),
        owner: user_name(md.uid()),
        group: group_name(md.gid()),
        modified_unix_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        symlink_target: if ft.is_symlink() {
            std::fs::read_link(path)
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            String::new()
        },
    })
}

/// Entries under `root`, breadth first, `depth` levels down (symlinked
/// directories are listed, not entered).
fn list(root: &Path, depth: u32) -> std::io::Result<Vec<EntryInfo>> {
    let md = std::fs::metadata(root)?;
    if !md.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    let mut out = Vec::new();
    let mut level = vec![root.to_path_buf()];
    for _ in 0..depth.max(1) {
        let mut next = Vec::new();
        for dir in level {
            let mut names: Vec<PathBuf> = match std::fs::read_dir(&dir) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                // The top level must be readable; deeper ones are skipped.
                Err(e) if dir == root => return Err(e),
                Err(_) => continue,
            };
            names.sort();
            for p in names {
                let Ok(info) = entry_info(&p) else { continue };
                if info.r#type == FileType::Directory as i32 {
                    next.push(p);
                }
                out.push(info);
                if out.len() > MAX_LIST_ENTRIES {
                    return Err(std::io::Error::other(format!(
                        "more than {MAX_LIST_ENTRIES} entries; list a narrower directory or a smaller depth"
                    )));
                }
            }
        }
        level = next;
    }
    Ok(out)
}

const UPLOAD_PART: &str = ".nv-upload-";

/// A write's file until it is complete (see [`open_upload`]).
fn is_upload_part(name: &std::ffi::OsStr) -> bool {
    let n = name.as_encoded_bytes();
    n.starts_with(b".") && n.windows(UPLOAD_PART.len()).any(|w| w == UPLOAD_PART.as_bytes())
}

/// A file removed when this goes.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where a write's bytes go until the last one came: a new file beside the
/// target (`.NAME.nv-upload-N`) that replaces it at the end, so a write that
/// breaks off leaves the old file (or none), never a part. It gets an
/// existing file's mode (and, for root, owner). A target that is not a
/// regular file (a device, a FIFO, a symlink) is written in place.
fn open_upload(path: &Path, account: Account) -> std::io::Result<(std::fs::File, Option<PathBuf>)> {
    create_parents(path)?;
    let in_place = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(path)
    };
    let existing = match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => return Ok((in_place()?, None)),
        Ok(m) => {
            // The same permission check as writing it in place would make
            // (as the file-system uid; opening it would be seen by watchers).
            nix::unistd::faccessat(
                nix::fcntl::AT_FDCWD,
                path,
                nix::unistd::AccessFlags::W_OK,
                nix::fcntl::AtFlags::AT_EACCESS,
            )
            .map_err(std::io::Error::from)?;
            Some(m)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let temp = path.with_file_name(format!(
        ".{}{UPLOAD_PART}{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&temp)?;
    if let Some(m) = existing {
        let kept = file
            .set_permissions(m.permissions())
            .and_then(|()| match account {
                Account::Root => std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid())),
                Account::User => Ok(()),
            });
        if let Err(e) = kept {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
    }
    Ok((file, Some(temp)))
}

fn create_parents(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => std::fs::create_dir_all(p),
        _ => Ok(()),
    }
}

fn remove(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

fn make_dir(path: &Path) -> std::io::Result<EntryInfo> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "already exists",
        ));
    }
    std::fs::create_dir_all(path)?;
    entry_info(path)
}

#[derive(Default)]
pub struct FilesService;

type ChunkTx = mpsc::Sender<Result<FileChunk, Status>>;

/// Reads the open file into the stream, a chunk at a time; stops when the
/// host goes away.
fn pump_file(mut file: std::fs::File, path: PathBuf, tx: ChunkTx) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let chunk = FileChunk {
                    data: Bytes::copy_from_slice(&buf[..n]),
                };
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(status_of("read", &path, e)));
                return;
            }
        }
    }
}

/// The most directories one recursive watch follows.
const MAX_WATCHED_DIRS: usize = 10_000;

/// An inotify instance and the directory each of its watches is on
/// (relative to the watched root).
struct Watch {
    inotify: nix::sys::inotify::Inotify,
    dirs: HashMap<nix::sys::inotify::WatchDescriptor, PathBuf>,
    root: PathBuf,
    recursive: bool,
}

fn watch_mask() -> nix::sys::inotify::AddWatchFlags {
    use nix::sys::inotify::AddWatchFlags as F;
    F::IN_CREATE
        | F::IN_MODIFY
        | F::IN_CLOSE_WRITE
        | F::IN_DELETE
        | F::IN_MOVED_FROM
        | F::IN_MOVED_TO
        | F::IN_ATTRIB
}

impl Watch {
    /// Watches `rel` (relative to the root) and, when recursive, what is under it.
    fn add(&mut self, rel: PathBuf) -> std::io::Result<()> {
        let mut todo = vec![rel];
        while let Some(rel) = todo.pop() {
            if self.dirs.len() >= MAX_WATCHED_DIRS {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_WATCHED_DIRS} directories; watch a narrower one"
                )));
            }
            let abs = self.root.join(&rel);
            let wd = match self.inotify.add_watch(&abs, watch_mask()) {
                Ok(wd) => wd,
                // The top must be watchable; a subdirectory may be gone or closed.
                Err(e) if rel.as_os_str().is_empty() => return Err(e.into()),
                Err(_) => continue,
            };
            self.dirs.insert(wd, rel.clone());
            if self.recursive {
                if let Ok(rd) = std::fs::read_dir(&abs) {
                    for e in rd.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            todo.push(rel.join(e.file_name()));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn fs_event(ev: &nix::sys::inotify::InotifyEvent, dir: &Path) -> Option<FsEvent> {
    use nix::sys::inotify::AddWatchFlags as F;
    let name = ev.name.as_ref()?;
    let t = if ev.mask.intersects(F::IN_CREATE | F::IN_MOVED_TO) {
        FsEventType::Create
    } else if ev.mask.intersects(F::IN_MODIFY | F::IN_CLOSE_WRITE) {
        FsEventType::Write
    } else if ev.mask.contains(F::IN_DELETE) {
        FsEventType::Remove
    } else if ev.mask.contains(F::IN_MOVED_FROM) {
        FsEventType::Rename
    } else if ev.mask.contains(F::IN_ATTRIB) {
        FsEventType::Chmod
    } else {
        return None;
    };
    Some(FsEvent {
        name: dir.join(name).to_string_lossy().into_owned(),
        r#type: t as i32,
        started: false,
    })
}

struct RawFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for RawFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// Sends the watch's events until the caller leaves.
async fn follow(mut w: Watch, account: Account, tx: mpsc::Sender<Result<FsEvent, Status>>) {
    use std::os::fd::{AsFd, AsRawFd};
    // SAFETY: the fd is the inotify instance's, owned by `w`, a parameter:
    // dropped after this local, so it stays open while registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            RawFd(w.inotify.as_fd().as_raw_fd()),
            tokio::io::Interest::READABLE,
        )
    };
    let Ok(fd) = registered else {
        return;
    };
    // The cookie of an upload part's rename into place.
    let mut part_moved: Option<u32> = None;
    loop {
        let mut guard = tokio::select! {
            g = fd.readable() => match g { Ok(g) => g, Err(_) => return },
            _ = tx.closed() => return,
        };
        let events = match w.inotify.read_events() {
            Ok(evs) => evs,
            Err(nix::errno::Errno::EAGAIN) => {
                guard.clear_ready();
                continue;
            }
            Err(_) => return,
        };
        for ev in events {
            let Some(dir) = w.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            if w.recursive
                && ev.mask.contains(nix::sys::inotify::AddWatchFlags::IN_ISDIR)
                && ev.mask.intersects(
                    nix::sys::inotify::AddWatchFlags::IN_CREATE
                        | nix::sys::inotify::AddWatchFlags::IN_MOVED_TO,
                )
            {
                if let Some(name) = &ev.name {
                    // As the user: only what it may read is followed.
                    let _id = FsIdentity::enter(account);
                    let _ = w.add(dir.join(name));
                }
            }
            // An upload's part is ours, not the user's: its events are
            // left out, and its rename into place is the file's creation
            // and write.
            use nix::sys::inotify::AddWatchFlags as F;
            if ev.name.as_deref().is_some_and(is_upload_part) {
                if ev.mask.contains(F::IN_MOVED_FROM) {
                    part_moved = Some(ev.cookie);
                }
                continue;
            }
            let mut out: Vec<FsEvent> = fs_event(&ev, &dir).into_iter().collect();
            if ev.mask.contains(F::IN_MOVED_TO) && part_moved.take() == Some(ev.cookie) {
                out.extend(out.first().map(|e| FsEvent {
                    r#type: FsEventType::Write as i32,
                    ..e.clone()
                }));
            }
            for e in out {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Files for FilesService {
    type ReadStream = ReceiverStream<Result<FileChunk, Status>>;
    type WatchDirStream = ReceiverStream<Result<FsEvent, Status>>;

    async fn watch_dir(
        &self,
        request: Request<WatchDirRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        let r = request.into_inner();
        let account = Account::parse(&r.user)?;
        let path = account.resolve(&r.path)?;
        let root = path.clone();
        let recursive = r.recursive;
        let w = as_account(account, move || {
            if !std::fs::metadata(&root)?.is_dir() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    "not a directory",
                ));
            }
            let inotify = nix::sys::inotify::Inotify::init(
                nix::sys::inotify::InitFlags::IN_NONBLOCK | nix::sys::inotify::InitFlags::IN_CLOEXEC,
            )?;
            let mut w = Watch {
                inotify,
                dirs: HashMap::new(),
                root,
                recursive,
            };
            w.add(PathBuf::new())?;
            Ok(w)
        })
        .await
        .map_err(|e| status_of("watch", &path, e))?;
        let (tx, rx) = mpsc::channel(256);
        let _ = tx
            .send(Ok(FsEvent {
                started: true,
                ..Default::default()
            }))
            .await;
        tokio::spawn(follow(w, account, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn read(&self, request: Request<ReadFileRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let r = request.into_inner();
        let account = Account::parse(&r.user)?;
        let path = account.resolve(&r.path)?;
        let p = path.clone();
        let file = as_account(account, move || {
            let f = std::fs::File::open(&p)?;
            if f.metadata()?.is_dir() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    "is a directory",
                ));
            }
            Ok(f)
        })
        .await
        .map_err(|e| status_of("read", &path, e))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || pump_file(file, path, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<EntryInfo>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty write: the first message names the file"))??;
        let account = Account::parse(&first.user)?;
        let path = account.resolve(&first.path)?;
        let p = path.clone();
        let (file, temp) = as_account(account, move || open_upload(&p, account))
            .await
            .map_err(|e| status_of("write", &path, e))?;
        // Removes the part if this call is dropped (its client reset it);
        // after the rename there is nothing left to remove.
        let _part = temp.clone().map(RemoveOnDrop);
        // Writes happen on one blocking thread fed by a small queue, so a
        // slow disk holds the sender back instead of filling memory.
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut file = file;
            while let Some(data) = rx.blocking_recv() {
                file.write_all(&data)?;
            }
            file.flush()
        });
        // The host's last message says the upload is complete; a stream
        // that ends without it broke off.
        let mut complete = first.complete;
        let fed: Result<(), Status> = async {
            if !first.data.is_empty() && tx.send(first.data).await.is_err() {
                return Ok(());
            }
            while let Some(msg) = stream.next().await {
                let msg = msg?;
                complete |= msg.complete;
                if msg.data.len() > CHUNK {
                    return Err(Status::invalid_argument(format!(
                        "a write chunk of {} bytes is over the {CHUNK}-byte limit",
                        msg.data.len()
                    )));
                }
                if tx.send(msg.data).await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        .await;
        drop(tx);
        let written = writer.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        // Complete: the file takes its place; broken off (the caller's
        // stream failed or a write did): the part goes.
        let fed = fed.and_then(|()| {
            if complete {
                Ok(())
            } else {
                Err(Status::aborted(
                    "the upload broke off before its end; the file was not changed",
                ))
            }
        });
        let ok = fed.is_ok() && written.is_ok();
        let p = path.clone();
        let placed = as_account(account, move || match temp {
            Some(t) if ok => std::fs::rename(&t, &p).inspect_err(|_| {
                let _ = std::fs::remove_file(&t);
            }),
            Some(t) => std::fs::remove_file(&t),
            None => Ok(()),
        })
        .await;
        fed?;
        written.map_err(|e| status_of("write", &path, e))?;
        placed.map_err(|e| status_of("write", &path, e))?;
        let p = path.clone();
        let info = as_account(account, move || entry_info(&p))
            .await
            .map_err(|e| status_of("stat", &path, e))?;
        Ok(Response::new(info))
    }

    async fn list_dir(&self, request: Request<ListDirRequest>) -> Result<Response<ListDirResponse>, Status> {
        let r = request.into_inner();
        let account = Account::parse(&r.user)?;
        let path = account.resolve(&r.path)?;
        let p = path.clone();
        let entries = as_account(account, move || list(&p, r.depth))
            .await
            .map_err(|e| status_of("list", &path, e))?;
        Ok(Response::new(ListDirResponse { entries }))
    }

    async fn stat(&self, request: Request<PathRequest>) -> Result<Response<EntryInfo>, Status> {
        let r = request.into_inner();
        let account = Account::parse(&r.user)?;
        let path = account.resolve(&r.path)?;
        let p = path.clone();
        as_account(account, move || entry_info(&p))
            .await
            .map(Response::new)
            .map_err(|e| status_of("stat", &path, e))
    }

    async fn make_dir(&self, request: Request<PathRequest>) -> Result<Response<EntryInfo>, Status> {
        let r = request.into_inner();
        let account = Account::parse(&r.user)?;
        let path = account.resolve(&r.path)?;
        let p = path.clone();
        as_account(account, move || make_dir(&p))
            .await
            .map(Response::new)
            .map_err(|e| status_of("make directory", &path, e))
    }

    async fn remove(&self, request: Request<PathRequest>) -> Result<Response<RemoveResponse>, Status> {
        let r = request.into_inner();
        let account = Account::parse(&r.user)?;
        let path = account.resolve(&r.path)?;
        if path == Path::new("/") {
            return Err(Status::invalid_argument("refusing to remove /"));
        }
        let p = path.clone();
        as_account(account, move || remove(&p))
            .await
            .map(|()| Response::new(RemoveResponse {}))
            .map_err(|e| status_of("remove", &path, e))
    }

    async fn r#move(&self, request: Request<MoveRequest>) -> Result<Response<EntryInfo>, Status> {
        let r = request.into_inner();
        let account = Account::parse(&r.user)?;
        let from = account.resolve(&r.source)?;
        let to = account.resolve(&r.destination)?;
        let (f, t) = (from.clone(), to.clone());
        as_account(account, move || {
            std::fs::symlink_metadata(&f)?;
            create_parents(&t)?;
            std::fs::rename(&f, &t)?;
            entry_info(&t)
        })
        .await
        .map(Response::new)
        .map_err(|e| status_of(&format!("move {} to", from.display()), &to, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_under_the_users_home() {
        assert_eq!(
            Account::User.resolve("a/b").unwrap(),
            PathBuf::from("/home/user/a/b")
        );
        assert_eq!(Account::Root.resolve("x").unwrap(), PathBuf::from("/root/x"));
        assert_eq!(Account::User.resolve("/etc").unwrap(), PathBuf::from("/etc"));
        assert!(Account::User.resolve("").is_err());
        assert_eq!(
            Account::parse("bob").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn lists_depth_first_level_then_deeper_and_names_types() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b/c")).unwrap();
        std::fs::write(d.path().join("a/f.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("a", d.path().join("link")).unwrap();
        let one = list(d.path(), 1).unwrap();
        let names: Vec<_> = one.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "link"]);
        assert_eq!(one[1].r#type, FileType::Symlink as i32);
        assert_eq!(one[1].symlink_target, "a");
        let two = list(d.path(), 2).unwrap();
        let f = two.iter().find(|e| e.name == "f.txt").unwrap();
        assert_eq!((f.size, f.r#type), (5, FileType::File as i32));
        assert!(f.permissions.starts_with("-rw"), "{}", f.permissions);
        assert!(!two.iter().any(|e| e.name == "c"));
        assert_eq!(list(d.path(), 3).unwrap().len(), 5);
        let e = list(&d.path().join("a/f.txt"), 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotADirectory);
    }

    #[tokio::test]
    async fn a_recursive_watch_sees_changes_in_new_subdirectories() {
        use tokio_stream::StreamExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (as the guest agent is)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path().to_string_lossy().into_owned();
        let watch = |recursive| WatchDirRequest {
            path: root.clone(),
            user: "root".into(),
            recursive,
            ..Default::default()
        };
        let mut s = FilesService
            .watch_dir(Request::new(watch(true)))
            .await
            .unwrap()
            .into_inner();
        assert!(s.next().await.unwrap().unwrap().started);
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(
            (first.name.as_str(), first.r#type()),
            ("sub", FsEventType::Create)
        );
        // The new directory is watched once its create event is handled.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        std::fs::write(d.path().join("sub/x.txt"), b"hi").unwrap();
        std::fs::remove_file(d.path().join("sub/x.txt")).unwrap();
        let mut seen = Vec::new();
        while seen.last().map(|(_, t)| *t) != Some(FsEventType::Remove) {
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
                .await
                .expect("an event")
                .unwrap()
                .unwrap();
            seen.push((e.name.clone(), e.r#type()));
        }
        assert!(
            seen.contains(&("sub/x.txt".to_string(), FsEventType::Create)),
            "{seen:?}"
        );
        assert!(
            seen.contains(&("sub/x.txt".to_string(), FsEventType::Write)),
            "{seen:?}"
        );
        let e = FilesService
            .watch_dir(Request::new(WatchDirRequest {
                path: format!("{root}/nope"),
                user: "root".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    }

    /// An upload goes to a part beside the file and takes the file's place
    /// (with its mode) when complete: a watcher sees the file created and
    /// written, never the part.
    #[tokio::test]
    async fn an_upload_replaces_its_file_at_the_end_and_watchers_see_only_the_file() {
        use std::os::unix::fs::PermissionsExt;
        use tokio_stream::StreamExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (as the guest agent is)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("f.txt");
        std::fs::write(&target, b"old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut s = FilesService
            .watch_dir(Request::new(WatchDirRequest {
                path: d.path().to_string_lossy().into_owned(),
                user: "root".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(s.next().await.unwrap().unwrap().started);
        let (mut f, part) = open_upload(&target, Account::Root).unwrap();
        let part = part.expect("a regular file is replaced, not written in place");
        assert!(is_upload_part(part.file_name().unwrap()), "{}", part.display());
        f.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"old", "written in place");
        std::fs::rename(&part, &target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
                .await
                .expect("an event")
                .unwrap()
                .unwrap();
            seen.push((e.name.clone(), e.r#type()));
        }
        assert_eq!(
            seen,
            [
                ("f.txt".to_string(), FsEventType::Create),
                ("f.txt".to_string(), FsEventType::Write)
            ]
        );
        // A FIFO is written in place.
        let fifo = d.path().join("p");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let (_, part) = open_upload(&fifo, Account::Root).unwrap();
        assert!(part.is_none());
        drop(reader);
    }

    #[test]
    fn make_dir_refuses_what_exists() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x/y");
        assert_eq!(make_dir(&p).unwrap().r#type, FileType::Directory as i32);
        assert_eq!(
            make_dir(&p).unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        remove(&d.path().join("x")).unwrap();
        assert!(!d.path().join("x").exists());
    }
}
