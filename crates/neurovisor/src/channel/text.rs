//! Guest text made safe for host text.
//!
//! Everything a guest sends is untrusted: error messages, Health fields, its
//! console. Before such text reaches a log line, an API error or a terminal it
//! goes through [`sanitize_guest_text`]: control characters (C0 including
//! newline and tab, DEL, C1) and the Unicode characters that reorder or break
//! lines (bidi controls, line/paragraph separators) become visible escapes like
//! `\u{1b}`, so a guest can neither forge a log line nor drive the terminal,
//! and the length is capped.

/// The most bytes of guest text kept (then `…`).
pub const MAX_GUEST_TEXT: usize = 1024;

/// True for the characters escaped by [`sanitize_guest_text`].
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{2028}' | '\u{2029}'           // line / paragraph separator
            | '\u{200e}' | '\u{200f}'         // LRM, RLM
            | '\u{202a}'..='\u{202e}'         // bidi embeddings and overrides
            | '\u{2066}'..='\u{2069}'         // bidi isolates
            | '\u{feff}')
}

/// Escapes controls and caps the result at [`MAX_GUEST_TEXT`] bytes (plus `…`).
pub fn sanitize_guest_text(s: &str) -> String {
    sanitize_capped(s, MAX_GUEST_TEXT)
}

/// [`sanitize_guest_text`] with another cap (in bytes of the result).
pub fn sanitize_capped(s: &str, cap: usize) -> String {
    let mut out = String::with_capacity(s.len().min(cap) + 4);
    for c in s.chars() {
        let before = out.len();
        if needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
        if out.len() > cap {
            out.truncate(before);
            out.push('…');
            break;
        }
    }
    out
}

/// Guest bytes (not necessarily UTF-8) as sanitized text.
pub fn sanitize_guest_bytes(b: &[u8]) -> String {
    sanitize_guest_text(&String::from_utf8_lossy(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_visible_escapes() {
        let forged = "bad\x1b[31mred\x1b[0m\n2026-01-01T00:00:00Z ERROR forged log line\r\t\x7f\u{9b}";
        let s = sanitize_guest_text(forged);
        assert_eq!(
            s,
            "bad\\u{1b}[31mred\\u{1b}[0m\\u{a}2026-01-01T00:00:00Z ERROR forged log line\\u{d}\\u{9}\\u{7f}\\u{9b}"
        );
        assert!(!s.chars().any(char::is_control), "{s:?}");
        assert_eq!(
            sanitize_guest_text("a\u{202e}b\u{2028}c"),
            "a\\u{202e}b\\u{2028}c"
        );
        // Ordinary text, including non-ASCII, passes unchanged.
        assert_eq!(
            sanitize_guest_text("unknown language 'cöbol' ✓"),
            "unknown language 'cöbol' ✓"
        );
        assert_eq!(sanitize_guest_bytes(b"\xff\x00ok"), "\u{fffd}\\u{0}ok");
    }

    #[test]
    fn length_is_capped_on_a_char_boundary() {
        let s = sanitize_guest_text(&"é".repeat(5000));
        assert!(s.len() <= MAX_GUEST_TEXT + '…'.len_utf8(), "{}", s.len());
        assert!(s.ends_with('…'));
        // An escape is never cut in half.
        let s = sanitize_capped(&"\x1b".repeat(100), 20);
        assert_eq!(s, "\\u{1b}\\u{1b}\\u{1b}…");
        assert_eq!(sanitize_capped("short", 20), "short");
    }
}
