//! Making a restored VM unlike its siblings: every VM restored from one
//! snapshot starts with the same kernel CRNG state, the same clock and the
//! same interpreters, so before any code runs the host hands it fresh
//! entropy and the time (`Reseed`).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// The least the host must send: one CRNG key's worth.
pub const MIN_ENTROPY: usize = 32;
/// More than this is not more entropy, only a bigger request.
pub const MAX_ENTROPY: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ReseedError {
    #[error("the host sent {0} bytes of entropy; {MIN_ENTROPY}..={MAX_ENTROPY} are needed")]
    EntropySize(usize),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Mixes `bytes` into the kernel's pool, credited as entropy, and reseeds
/// the CRNG at once so that `getrandom` and `/dev/urandom` diverge from
/// every sibling before the next read (needs CAP_SYS_ADMIN: the agent runs
/// as root).
pub fn add_entropy(bytes: &[u8]) -> Result<(), ReseedError> {
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&bytes.len()) {
        return Err(ReseedError::EntropySize(bytes.len()));
    }
    let os = |what| move |source| ReseedError::Os { what, source };
    let f = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(os("open /dev/urandom"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // Keep the u32 array whole.
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    // SAFETY: `info` is a rand_pool_info of `bytes.len()` bytes, alive for the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(os("RNDADDENTROPY")(std::io::Error::last_os_error()));
    }
    // SAFETY: an argument-less ioctl on our fd.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(os("RNDRESEEDCRNG")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the wall clock (it stood still while the snapshot was on disk).
pub fn set_clock(unix_time_ns: u64) -> Result<u64, ReseedError> {
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(ReseedError::Os {
            what: "clock_settime",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(now_ns())
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_outside_the_bounds_is_refused_before_any_ioctl() {
        assert!(matches!(add_entropy(&[0; 8]), Err(ReseedError::EntropySize(8))));
        assert!(matches!(
            add_entropy(&[0; 4096]),
            Err(ReseedError::EntropySize(4096))
        ));
    }
}
