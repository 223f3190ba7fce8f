//! Reading arguments from C and writing results back, with every length bounded.
//!
//! C hands us raw pointers whose only promise is the one in `lib739kv.h`: input strings are
//! NUL-terminated and output buffers have room for `MAX_VALUE_SIZE + 1` bytes. Nothing here
//! reads more than one byte past the longest valid argument, so an unterminated or oversized
//! input is rejected instead of being scanned to the end of memory.

use std::ffi::c_char;

/// Longest key the kv739 API accepts (`MAX_KEY_SIZE` in the header).
pub const MAX_KEY_SIZE: usize = 128;
/// Longest value the kv739 API accepts or returns (`MAX_VALUE_SIZE` in the header).
pub const MAX_VALUE_SIZE: usize = 2048;
/// Longest `host:port` entry `kv739_init` reads; a DNS name is at most 253 bytes.
pub const MAX_SERVER_ADDR: usize = 300;
/// Most entries `kv739_init` reads before deciding the list is not NULL-terminated.
pub const MAX_SERVERS: usize = 1024;

/// Reads a NUL-terminated string of at most `max` bytes (terminator excluded).
///
/// Returns `None` for a NULL pointer or when no NUL appears within `max + 1` bytes.
///
/// # Safety
/// `ptr` is NULL or points to readable memory that holds a NUL within `max + 1` bytes, or
/// that is at least `max + 1` bytes long.
pub unsafe fn bounded_cstr<'a>(ptr: *const c_char, max: usize) -> Option<&'a [u8]> {
    if ptr.is_null() {
        return None;
    }
    let bytes = ptr.cast::<u8>();
    // Byte-by-byte, like strnlen: stop at the first NUL so we never touch memory past the
    // caller's string, even when it is shorter than `max`.
    for len in 0..=max {
        // SAFETY: the caller guarantees bytes up to the NUL (or up to max + 1) are readable.
        if unsafe { *bytes.add(len) } == 0 {
            // SAFETY: the `len` bytes before the NUL were just read.
            return Some(unsafe { std::slice::from_raw_parts(bytes, len) });
        }
    }
    None
}

/// True for the bytes kv739 keys and values may hold: printable ASCII except `[` and `]`
/// (the course drivers use brackets as delimiters in their own output).
pub fn is_allowed_byte(b: u8) -> bool {
    (0x20..=0x7e).contains(&b) && b != b'[' && b != b']'
}

/// A valid key: 1 to `MAX_KEY_SIZE` allowed bytes.
pub fn is_valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_SIZE && key.iter().copied().all(is_allowed_byte)
}

/// A valid value: 0 to `MAX_VALUE_SIZE` allowed bytes (the empty value is a value).
pub fn is_valid_value(value: &[u8]) -> bool {
    value.len() <= MAX_VALUE_SIZE && value.iter().copied().all(is_allowed_byte)
}

/// Copies `value` and a NUL into `out`, which has room for `MAX_VALUE_SIZE + 1` bytes.
///
/// Returns false (and writes nothing) when `value` could not come back through kv739:
/// longer than `MAX_VALUE_SIZE`, or holding bytes a kv739 value may not hold. Such values
/// can only have been stored by another kind of client (e.g. the `replikv` CLI).
///
/// # Safety
/// `out` is non-NULL and writable for `MAX_VALUE_SIZE + 1` bytes.
pub unsafe fn write_value(out: *mut c_char, value: &[u8]) -> bool {
    if !is_valid_value(value) {
        return false;
    }
    let out = out.cast::<u8>();
    // SAFETY: value.len() <= MAX_VALUE_SIZE, so value plus NUL fits the caller's buffer;
    // `value` is our own memory and cannot overlap it.
    unsafe {
        std::ptr::copy_nonoverlapping(value.as_ptr(), out, value.len());
        *out.add(value.len()) = 0;
    }
    true
}

/// Makes `out` the empty string, if it is non-NULL.
///
/// # Safety
/// `out` is NULL or writable for at least one byte.
pub unsafe fn clear(out: *mut c_char) {
    if !out.is_null() {
        // SAFETY: checked non-NULL; the caller guarantees one writable byte.
        unsafe { *out = 0 };
    }
}

/// Parses one `host:port` entry of the server list.
///
/// The host may be a name, an IPv4 address or a bracketed IPv6 address; the port is a
/// decimal in 1..=65535. Anything else is malformed, so `kv739_init` can fail at once
/// instead of after its deadline.
pub fn parse_server(entry: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(entry).ok()?;
    let (host, port) = text.rsplit_once(':')?;
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    };
    (port_ok && host_ok).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    #[test]
    fn bounded_cstr_stops_at_nul_and_at_max() {
        let s = CString::new("abc").unwrap();
        // SAFETY: `s` is a valid NUL-terminated string.
        assert_eq!(unsafe { bounded_cstr(s.as_ptr(), 3) }, Some(&b"abc"[..]));
        // SAFETY: as above; the scan stops at byte max + 1 = 3 (the NUL is index 3).
        assert_eq!(unsafe { bounded_cstr(s.as_ptr(), 2) }, None);
        // SAFETY: NULL is accepted.
        assert_eq!(unsafe { bounded_cstr(std::ptr::null(), 10) }, None);
        let empty = CString::new("").unwrap();
        // SAFETY: valid empty string.
        assert_eq!(unsafe { bounded_cstr(empty.as_ptr(), 0) }, Some(&b""[..]));
    }

    #[test]
    fn keys_and_values_follow_the_kv739_rules() {
        assert!(is_valid_key(b"k"));
        assert!(is_valid_key(&[b'a'; MAX_KEY_SIZE]));
        assert!(is_valid_key(b"with space, comma ~"));
        assert!(!is_valid_key(b""));
        assert!(!is_valid_key(&[b'a'; MAX_KEY_SIZE + 1]));
        assert!(!is_valid_key(b"a[b"));
        assert!(!is_valid_key(b"a]b"));
        assert!(!is_valid_key(b"tab\there"));
        assert!(!is_valid_key(b"\x7f"));
        assert!(!is_valid_key("é".as_bytes()));

        assert!(is_valid_value(b""));
        assert!(is_valid_value(&[b'v'; MAX_VALUE_SIZE]));
        assert!(!is_valid_value(&[b'v'; MAX_VALUE_SIZE + 1]));
        assert!(!is_valid_value(b"new\nline"));
        assert!(!is_valid_value(b"[x]"));
    }

    #[test]
    fn write_value_refuses_what_would_not_fit_or_is_not_kv739() {
        let mut buf = vec![b'#' as c_char; MAX_VALUE_SIZE + 2];
        // SAFETY: buf has MAX_VALUE_SIZE + 2 writable bytes.
        assert!(unsafe { write_value(buf.as_mut_ptr(), b"hi") });
        assert_eq!(&buf[..3], &[b'h' as c_char, b'i' as c_char, 0]);

        let mut buf = vec![b'#' as c_char; MAX_VALUE_SIZE + 2];
        let full = vec![b'x'; MAX_VALUE_SIZE];
        // SAFETY: as above.
        assert!(unsafe { write_value(buf.as_mut_ptr(), &full) });
        assert_eq!(buf[MAX_VALUE_SIZE], 0);
        assert_eq!(
            buf[MAX_VALUE_SIZE + 1],
            b'#' as c_char,
            "wrote past the buffer"
        );

        let mut buf = vec![b'#' as c_char; MAX_VALUE_SIZE + 2];
        let long = vec![b'x'; MAX_VALUE_SIZE + 1];
        // SAFETY: as above.
        assert!(!unsafe { write_value(buf.as_mut_ptr(), &long) });
        // SAFETY: as above.
        assert!(!unsafe { write_value(buf.as_mut_ptr(), b"\x00\x01") });
        assert!(
            buf.iter().all(|&b| b == b'#' as c_char),
            "refused values write nothing"
        );
    }

    #[test]
    fn server_entries_are_host_colon_port() {
        assert_eq!(
            parse_server(b"localhost:5000").as_deref(),
            Some("localhost:5000")
        );
        assert!(parse_server(b"127.0.0.1:1").is_some());
        assert!(parse_server(b"[::1]:65535").is_some());
        assert!(parse_server(b"db-1.example_x:80").is_some());
        for bad in [
            &b""[..],
            b"localhost",
            b"localhost:",
            b":5000",
            b"host:0",
            b"host:65536",
            b"host:+80",
            b"host:80x",
            b"ho st:80",
            b"[::1:80",
            b"[nope]:80",
            b"http://host:80",
        ] {
            assert!(
                parse_server(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
