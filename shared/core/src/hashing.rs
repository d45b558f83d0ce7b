//! SHA-256 as lowercase hex: the one hashing primitive behind identity hashes and event ids.

use sha2::{Digest, Sha256};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// SHA-256 of `input`'s UTF-8 bytes as 64 lowercase hex characters (the form both Meta and
/// Google expect).
pub fn sha256_hex(input: &str) -> String {
    hex(&Sha256::digest(input.as_bytes()))
}

/// SHA-256 over several parts joined by `|`, without building the joined string first.
pub fn sha256_hex_joined(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(b"|");
        }
        h.update(p.as_bytes());
    }
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

/// Decodes lowercase or uppercase hex; `None` on odd length or a non-hex character.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    b.chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

/// True for exactly 64 hex characters: the shape of a SHA-256 digest.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn joined_equals_hash_of_joined_string() {
        assert_eq!(sha256_hex_joined(&["a", "b", "c"]), sha256_hex("a|b|c"));
        assert_eq!(sha256_hex_joined(&["only"]), sha256_hex("only"));
    }

    #[test]
    fn hex_round_trip() {
        let h = sha256_hex("x");
        assert_eq!(hex(&unhex(&h).unwrap()), h);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
        assert!(is_sha256_hex(&h));
        assert!(!is_sha256_hex(&h[1..]));
    }
}
