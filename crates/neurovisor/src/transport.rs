//! How clients reach the daemon, and who may: the Unix socket in the state
//! directory (access control by file permissions and the `neurovisor`
//! group), the optional TCP listener's bearer token, and the ownership
//! checks on the state directory both sides rely on.
//!
//! - `<state>/neurovisor.sock`: the default endpoint, mode 0660 with group
//!   `neurovisor` (0600 without the group). No token: whoever can open the
//!   socket may use the daemon.
//! - `<state>/token`: 256 random bits in hex, mode 0600, made at the first
//!   start with `--listen`; TCP requests send it as `authorization: Bearer`.
//! - The state directory is created 0750 (group `neurovisor`); the daemon
//!   refuses one that is a symlink, not ours, or writable by group/other.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

/// The daemon's socket, in the state directory.
pub const SOCKET_NAME: &str = "neurovisor.sock";
/// The TCP listener's token, in the state directory.
pub const TOKEN_NAME: &str = "token";
/// The group whose members may use the daemon's socket.
pub const DEFAULT_SOCKET_GROUP: &str = "neurovisor";
/// The environment variable clients take the TCP token from.
pub const TOKEN_ENV: &str = "NEUROVISOR_TOKEN";
/// Where a root daemon lives (clients also look there when not root).
pub const SYSTEM_STATE_DIR: &str = "/run/neurovisor";

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join(TOKEN_NAME)
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Unsafe(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TransportError {
    let path = path.to_path_buf();
    move |source| TransportError::Io { what, path, source }
}

/// The gid of `name`, when that group exists.
pub fn group_gid(name: &str) -> Option<Gid> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Some(g.gid),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("cannot look up group {name}: {e}");
            None
        }
    }
}

/// Checks, without following a symlink, that `dir` is a directory owned by
/// us that neither its group nor others can write.
/// `fix_mode` is the mode the error suggests.
pub fn check_own_dir(dir: &Path, what: &str, fix_mode: u32) -> Result<std::fs::Metadata, TransportError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io("directory", dir))?;
    let d = dir.display();
    if meta.file_type().is_symlink() {
        return Err(TransportError::Unsafe(format!(
            "{what} {d} is a symbolic link; pass --state-dir with the real directory"
        )));
    }
    if !meta.is_dir() {
        return Err(TransportError::Unsafe(format!(
            "{what} {d} is not a directory; remove it or pass --state-dir"
        )));
    }
    let me = Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(TransportError::Unsafe(format!(
            "{what} {d} belongs to uid {}, not to us (uid {me}); chown {me} {d} or pass --state-dir",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TransportError::Unsafe(format!(
            "{what} {d} is writable by others (mode {mode:04o}); chmod {fix_mode:04o} {d} or pass --state-dir"
        )));
    }
    Ok(meta)
}

/// Creates the daemon's state directory (0750, group `group` when given) or
/// checks the existing one with [`check_own_dir`].
pub fn prepare_state_dir(dir: &Path, group: Option<(&str, Gid)>) -> Result<(), TransportError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(io("cannot create the state directory's parent", parent))?;
            }
            match std::fs::DirBuilder::new().mode(0o750).create(dir) {
                Ok(()) => {
                    if let Some((_, gid)) = group {
                        std::os::unix::fs::lchown(dir, None, Some(gid.as_raw()))
                            .map_err(io("cannot set the group of the state directory", dir))?;
                    }
                    // The umask may have taken bits away.
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
                        .map_err(io("cannot set the mode of the state directory", dir))?;
                }
                // Someone made it meanwhile: check it like any existing one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("cannot create the state directory", dir)(e)),
            }
            check_own_dir(dir, "state directory", 0o750).map(|_| ())
        }
        Err(e) => Err(io("state directory", dir)(e)),
        Ok(_) => {
            let meta = check_own_dir(dir, "state directory", 0o750)?;
            if let Some((name, gid)) = group {
                let reachable = if meta.gid() == gid.as_raw() {
                    meta.mode() & 0o010 != 0
                } else {
                    meta.mode() & 0o001 != 0
                };
                if !reachable {
                    tracing::warn!(
                        "members of the group {name} cannot reach {}: chgrp {name} {d} && chmod 0750 {d}",
                        socket_path(dir).display(),
                        d = dir.display()
                    );
                }
            }
            Ok(())
        }
    }
}

/// Creates `<state>/daemon` (0700) or checks the existing one.
pub fn prepare_daemon_dir(dir: &Path) -> Result<(), TransportError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create the daemon directory", dir)(e)),
    }
    check_own_dir(dir, "daemon directory", 0o700).map(|_| ())
}

/// The TCP listener's token, as written in `<state>/token`.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with what a client sent.
    pub fn matches(&self, sent: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(sent.as_bytes()).into()
    }

    fn random() -> Result<Self, TransportError> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| TransportError::Unsafe(format!("cannot get random bytes for the token: {e}")))?;
        Ok(Self(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    fn parse(text: &str, path: &Path) -> Result<Self, TransportError> {
        let t = text.trim();
        if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(t.to_ascii_lowercase()))
        } else {
            Err(TransportError::Unsafe(format!(
                "token file {} does not hold a 64-digit hex token; remove it and a new one is made at the next start",
                path.display()
            )))
        }
    }

    /// Reads `<state>/token`, or makes it (mode 0600) when missing. Refuses a
    /// symlink, a file that is not ours or not regular, or one its group or
    /// others can read.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, TransportError> {
        let path = token_path(state_dir);
        let p = path.display();
        let open = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path);
        let mut file = match open {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::create(&path),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(TransportError::Unsafe(format!(
                    "token file {p} is a symbolic link; remove it and a new token is made at the next start"
                )))
            }
            Err(e) => return Err(io("cannot open the token file", &path)(e)),
        };
        let meta = file.metadata().map_err(io("cannot read the token file", &path))?;
        let me = Uid::effective().as_raw();
        if !meta.is_file() {
            return Err(TransportError::Unsafe(format!(
                "token file {p} is not a regular file; remove it and a new token is made at the next start"
            )));
        }
        if meta.uid() != me {
            return Err(TransportError::Unsafe(format!(
                "token file {p} belongs to uid {}, not to us (uid {me}); remove it and a new token is made at the next start",
                meta.uid()
            )));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TransportError::Unsafe(format!(
                "token file {p} can be read by others (mode {mode:04o}); chmod 0600 {p}, or remove it and restart for a new token"
            )));
        }
        let mut text = String::new();
        (&mut file)
            .take(256)
            .read_to_string(&mut text)
            .map_err(io("cannot read the token file", &path))?;
        Self::parse(&text, &path)
    }

    fn create(path: &Path) -> Result<Self, TransportError> {
        let token = Self::random()?;
        let mut f: File = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io("cannot create the token file", path))?;
        writeln!(f, "{}", token.0)
            .and_then(|_| f.sync_all())
            .map_err(io("cannot write the token file", path))?;
        tracing::info!("made a new token for the TCP listener in {}", path.display());
        Ok(token)
    }
}

/// A client's token for a TCP daemon: `NEUROVISOR_TOKEN`, else the daemon's
/// token file in `state_dir` when we may read it.
pub fn client_token(state_dir: &Path) -> Option<String> {
    if let Some(t) = std::env::var(TOKEN_ENV).ok().filter(|t| !t.trim().is_empty()) {
        return Some(t.trim().to_string());
    }
    let path = token_path(state_dir);
    let mut text = String::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))?
        .take(256)
        .read_to_string(&mut text)
        .ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// Is the socket at `path` one a client may trust: a socket owned by root or
/// by us, in a directory owned by root or by us that neither its group nor
/// others can write (so nobody else can have planted or replaced it)?
/// `Err` says why not.
pub fn check_trusted_socket(path: &Path) -> Result<(), String> {
    let me = Uid::effective().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == me;
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_socket() {
        return Err(format!("{} is not a socket", path.display()));
    }
    if !trusted(meta.uid()) {
        return Err(format!(
            "{} belongs to uid {}, neither root nor us",
            path.display(),
            meta.uid()
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let dmeta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !dmeta.is_dir() {
        return Err(format!("{} is not a directory (a symbolic link?)", dir.display()));
    }
    if !trusted(dmeta.uid()) {
        return Err(format!(
            "its directory {} belongs to uid {}, neither root nor us",
            dir.display(),
            dmeta.uid()
        ));
    }
    if dmeta.mode() & 0o022 != 0 {
        return Err(format!(
            "its directory {} is writable by others (mode {:04o})",
            dir.display(),
            dmeta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn state_dir_is_made_0750_and_unsafe_ones_are_refused() {
        let t = tmp();
        let dir = t.path().join("a/state");
        prepare_state_dir(&dir, None).expect("created");
        let m = std::fs::metadata(&dir).expect("meta");
        assert_eq!(m.mode() & 0o7777, 0o750);
        prepare_state_dir(&dir, None).expect("existing is fine");

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = prepare_state_dir(&dir, None).unwrap_err().to_string();
        assert!(e.contains("is writable by others (mode 0777); chmod 0750"), "{e}");

        let link = t.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        let e = prepare_state_dir(&link, None).unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
    }

    #[test]
    fn token_is_made_once_kept_and_checked() {
        let t = tmp();
        let a = Token::load_or_create(t.path()).expect("made");
        assert_eq!(a.as_str().len(), 64);
        let m = std::fs::metadata(token_path(t.path())).expect("meta");
        assert_eq!(m.mode() & 0o777, 0o600);
        let b = Token::load_or_create(t.path()).expect("kept");
        assert!(a.matches(b.as_str()));
        assert!(!a.matches("x") && !a.matches(&"0".repeat(64)));

        std::fs::set_permissions(token_path(t.path()), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let e = Token::load_or_create(t.path()).unwrap_err().to_string();
        assert!(e.contains("can be read by others (mode 0644); chmod 0600"), "{e}");

        let u = tmp();
        std::os::unix::fs::symlink(token_path(t.path()), token_path(u.path())).expect("symlink");
        let e = Token::load_or_create(u.path()).unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
    }

    #[test]
    fn only_sockets_in_safe_directories_are_trusted() {
        let t = tmp();
        let sock = t.path().join(SOCKET_NAME);
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        check_trusted_socket(&sock).expect("ours, in a 0700 dir");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = check_trusted_socket(&sock).unwrap_err();
        assert!(e.contains("writable by others"), "{e}");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let file = t.path().join("file");
        std::fs::write(&file, "").expect("write");
        assert!(check_trusted_socket(&file).unwrap_err().contains("not a socket"));
    }
}
