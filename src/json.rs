//! Writing JSON by hand where it is on every kernel start: the forwarded `env` and the audit
//! record. serde_json escapes a string one byte at a time through its formatter; names and
//! values almost never hold a byte that needs escaping, so [`write_str`] checks a string eight
//! bytes at a time and copies it whole, and leaves the rare string that needs escaping to
//! serde_json. The output is byte for byte what serde_json writes (tests hold it to that).

/// Appends `s` as a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing into a Vec cannot fail.
        serde_json::to_writer(&mut *out, s).expect("serializing a string into memory");
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Appends `s` as a JSON string, or `null`.
pub fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Whether serde_json would escape any byte of `b`: a control character, `"` or `\`.
fn needs_escape(b: &[u8]) -> bool {
    // Eight bytes at a time (names and values are short, too short for vector loops); the last
    // word overlaps the one before it rather than being padded through memory.
    let word = |w: &[u8]| word_needs_escape(u64::from_le_bytes(w.try_into().expect("8 bytes")));
    if b.len() < 8 {
        return b.iter().any(|&x| x < 0x20 || x == b'"' || x == b'\\');
    }
    b.chunks_exact(8).any(word) || word(&b[b.len() - 8..])
}

/// Whether any byte of `w` is under 0x20, `"` or `\`. Each test is exact as a yes/no answer
/// (the classic "has a zero byte" and "has a byte less than n" bit tricks).
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (below_space | zero_byte(w ^ (ONES * u64::from(b'"'))) | zero_byte(w ^ (ONES * u64::from(b'\\')))) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(s: &str) -> String {
        let mut out = Vec::new();
        write_str(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_byte_in_every_lane_of_a_word() {
        let bad = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        for b in 0..=255u8 {
            assert_eq!(word_needs_escape(u64::from_le_bytes([b; 8])), bad(b), "{b:#x} everywhere");
            for lane in 0..8 {
                for fill in [b'a', 0x80, 0xff, b'!', b'#', b'['] {
                    let mut w = [fill; 8];
                    w[lane] = b;
                    assert_eq!(
                        word_needs_escape(u64::from_le_bytes(w)),
                        bad(b),
                        "{b:#x} in lane {lane}, fill {fill:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn writes_what_serde_json_writes() {
        let mut cases: Vec<String> =
            ["", "plain", "a\"b", "back\\slash", "tab\there", "nul\0", "é ü 日本 🙂", "\u{7f}", "\u{2028}"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        // every byte value at every position of a string longer than one chunk
        for b in 0u8..128 {
            for at in [0, 5, 31, 32, 33, 63, 70] {
                let mut s = "x".repeat(71);
                s.replace_range(at..at + 1, std::str::from_utf8(&[b]).unwrap());
                cases.push(s);
            }
        }
        for s in &cases {
            assert_eq!(ours(s), serde_json::to_string(s).unwrap(), "{s:?}");
        }
        let mut out = Vec::new();
        write_opt_str(&mut out, None);
        write_opt_str(&mut out, Some("a"));
        assert_eq!(out, b"null\"a\"");
    }
}
