//! The viewer-to-server half of the RFB (VNC) protocol, read far enough to
//! drop input: a view-only viewer's keys, pointer, clipboard and resize
//! requests never reach the guest, whatever its page does.
//!
//! The guest's server offers RFB 3.8 with security type None (it is reached
//! only through the agent); the filter holds the viewer to that handshake
//! and to the client messages it knows the length of. Anything else closes
//! the connection (fail closed): an unknown message could not be skipped.

/// Why a viewer's stream was cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VNC viewer: {0}")]
pub struct RfbError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Version,
    Security,
    ClientInit,
    Messages,
}

/// The most a dropped clipboard message may carry (it is skipped, not kept).
const MAX_CUT_TEXT: u32 = 1 << 20;

/// Client-to-server filter for view-only viewers (feed it bytes as they
/// come; it returns what may go on).
#[derive(Debug)]
pub struct ViewOnly {
    phase: Phase,
    buf: Vec<u8>,
    /// Bytes of a dropped message still to skip.
    skip: usize,
}

impl Default for ViewOnly {
    fn default() -> Self {
        Self::new()
    }
}

impl ViewOnly {
    pub fn new() -> Self {
        Self {
            phase: Phase::Version,
            buf: Vec::new(),
            skip: 0,
        }
    }

    /// What of `data` (with what came before) may reach the server.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, RfbError> {
        let mut out = Vec::new();
        let mut data = data;
        if self.skip > 0 {
            let n = self.skip.min(data.len());
            self.skip -= n;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.buf.len());
                self.buf.drain(..n);
                self.skip -= n;
                if self.skip > 0 {
                    break;
                }
            }
            match self.step()? {
                // A message that passes goes on whole (the longest, a list
                // of encodings, is 256 KiB); a dropped one is skipped as it comes.
                Some((len, true)) if self.buf.len() < len => break,
                Some((len, pass)) => {
                    let msg: Vec<u8> = self.buf.drain(..len.min(self.buf.len())).collect();
                    if pass {
                        out.extend_from_slice(&msg);
                    }
                    if len > msg.len() {
                        // A dropped message longer than what is here.
                        self.skip = len - msg.len();
                    }
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// The next message at the head of the buffer: (its length, whether it
    /// passes), or `None` until more bytes come.
    fn step(&mut self) -> Result<Option<(usize, bool)>, RfbError> {
        let b = &self.buf;
        let need = |n: usize| b.len() >= n;
        match self.phase {
            Phase::Version => {
                if !need(12) {
                    return Ok(None);
                }
                if &b[..12] != b"RFB 003.008\n" {
                    return Err(RfbError(format!(
                        "protocol version {:?}; only RFB 003.008 is served",
                        String::from_utf8_lossy(&b[..12]).trim()
                    )));
                }
                self.phase = Phase::Security;
                Ok(Some((12, true)))
            }
            Phase::Security => {
                if !need(1) {
                    return Ok(None);
                }
                if b[0] != 1 {
                    return Err(RfbError(format!(
                        "security type {}; only None (1) is served",
                        b[0]
                    )));
                }
                self.phase = Phase::ClientInit;
                Ok(Some((1, true)))
            }
            Phase::ClientInit => {
                if !need(1) {
                    return Ok(None);
                }
                // Shared: a watcher never disconnects the other viewers.
                self.buf[0] = 1;
                self.phase = Phase::Messages;
                Ok(Some((1, true)))
            }
            Phase::Messages => {
                if !need(1) {
                    return Ok(None);
                }
                let be16 = |i: usize| usize::from(u16::from_be_bytes([b[i], b[i + 1]]));
                Ok(match b[0] {
                    // SetPixelFormat
                    0 => need(20).then_some((20, true)),
                    // SetEncodings
                    2 => need(4).then(|| (4 + 4 * be16(2), true)),
                    // FramebufferUpdateRequest
                    3 => need(10).then_some((10, true)),
                    // KeyEvent, PointerEvent: dropped.
                    4 => need(8).then_some((8, false)),
                    5 => need(6).then_some((6, false)),
                    // ClientCutText: dropped (an extended one has a negative length).
                    6 => {
                        if !need(8) {
                            None
                        } else {
                            let len = i32::from_be_bytes([b[4], b[5], b[6], b[7]]).unsigned_abs();
                            if len > MAX_CUT_TEXT {
                                return Err(RfbError(format!("a clipboard message of {len} bytes")));
                            }
                            Some((8 + len as usize, false))
                        }
                    }
                    // EnableContinuousUpdates
                    150 => need(10).then_some((10, true)),
                    // ClientFence: up to 64 bytes of payload.
                    248 => {
                        if !need(9) {
                            None
                        } else if b[8] > 64 {
                            return Err(RfbError("a fence of more than 64 bytes".into()));
                        } else {
                            Some((9 + usize::from(b[8]), true))
                        }
                    }
                    // xvp (shutdown/reboot requests): dropped.
                    250 => need(4).then_some((4, false)),
                    // SetDesktopSize: dropped.
                    251 => need(8).then(|| (8 + 16 * usize::from(b[6]), false)),
                    // QEMU extended key event: dropped; other QEMU messages are unknown.
                    255 => {
                        if !need(2) {
                            None
                        } else if b[1] == 0 {
                            Some((12, false))
                        } else {
                            return Err(RfbError(format!("QEMU client message subtype {}", b[1])));
                        }
                    }
                    other => return Err(RfbError(format!("client message type {other}"))),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake() -> Vec<u8> {
        let mut v = b"RFB 003.008\n".to_vec();
        v.push(1); // security None
        v.push(0); // ClientInit, exclusive
        v
    }

    #[test]
    fn input_is_dropped_and_the_rest_passes_in_any_pieces() {
        let mut all = handshake();
        let update = [3u8, 0, 0, 0, 0, 0, 0x05, 0, 0x03, 0x20];
        let key = [4u8, 1, 0, 0, 0, 0, 0, 0x61];
        let pointer = [5u8, 1, 0, 10, 0, 20];
        let mut cut = vec![6u8, 0, 0, 0, 0, 0, 0, 5];
        cut.extend_from_slice(b"hello");
        let mut enc = vec![2u8, 0, 0, 2];
        enc.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0x21]);
        let qemu_key = [255u8, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 0x1e];
        let fence = [248u8, 0, 0, 0, 0, 0, 0, 1, 2, 7, 7];
        for m in [
            &update[..],
            &key,
            &pointer,
            &cut,
            &enc,
            &qemu_key,
            &fence,
            &update,
        ] {
            all.extend_from_slice(m);
        }
        let mut expected = handshake();
        expected[13] = 1; // forced shared
        for m in [&update[..], &enc, &fence, &update] {
            expected.extend_from_slice(m);
        }
        // Whole, byte by byte, and in uneven pieces: the same result.
        for piece in [all.len(), 1, 3, 7] {
            let mut f = ViewOnly::new();
            let mut out = Vec::new();
            for chunk in all.chunks(piece) {
                out.extend(f.feed(chunk).unwrap());
            }
            assert_eq!(out, expected, "pieces of {piece}");
        }
    }

    #[test]
    fn what_it_cannot_read_closes_the_stream() {
        let mut f = ViewOnly::new();
        assert!(f.feed(b"RFB 003.003\n").unwrap_err().0.contains("version"));
        let mut f = ViewOnly::new();
        let mut v = b"RFB 003.008\n".to_vec();
        v.push(2); // VNC authentication
        assert!(f.feed(&v).unwrap_err().0.contains("security type 2"));
        let mut f = ViewOnly::new();
        let mut v = handshake();
        v.push(77);
        assert!(f.feed(&v).unwrap_err().0.contains("type 77"));
        let mut f = ViewOnly::new();
        let mut v = handshake();
        v.extend_from_slice(&[6, 0, 0, 0, 0x7f, 0, 0, 0]);
        assert!(f.feed(&v).unwrap_err().0.contains("clipboard"));
    }
}
